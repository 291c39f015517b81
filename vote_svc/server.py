"""vote_svc's server: voting for voters, batch submission for gateways, wallet grants,
store purchases and the stores' notifications.

See vote_svc/README.md for the design (admission script, ledger, failure handling, recovery
after a Redis loss and which invariants hold while it happens).
"""

from __future__ import annotations

import asyncio

import grpc

from runtime import mesh
from runtime.server import ServiceHost, run_service
from runtime.storage import Storage
from televote.vote.v1 import (
    vote_gateway_service_pb2,
    vote_gateway_service_pb2_grpc,
    vote_service_pb2,
    vote_service_pb2_grpc,
    wallet_admin_service_pb2,
    wallet_admin_service_pb2_grpc,
)
from vote_svc.admission import Scripts
from vote_svc.api import (
    StoreNotificationServicer,
    VoteGatewayServicer,
    VoteServicer,
    WalletAdminServicer,
)
from vote_svc.config import VoteConfig
from vote_svc.fraud import FraudScorer
from vote_svc.ingest import Ingestor
from vote_svc.ledger import Ledger
from vote_svc.packages import PackageCatalogue
from vote_svc.purchases import Purchases
from vote_svc.reconcile import Reconciler
from vote_svc.rescore import Rescorer
from vote_svc.stores import Stores

__all__ = ["VoteConfig", "create_server", "main"]


def create_pipeline(config: VoteConfig, storage: Storage, fraud_channel: grpc.aio.Channel | None,
                    ) -> tuple[Scripts, Ledger, Ingestor]:
    """The vote pipeline as configured (the caller starts the ledger)."""
    scripts = Scripts(storage.redis, max_inflight=config.vote_admit_max_inflight)
    ledger = Ledger(storage.pool, storage.redis, scripts, batch_max=config.vote_batch_max,
                    interval_ms=config.vote_batch_interval_ms,
                    inflight=config.vote_max_inflight_batches,
                    timeout_ms=config.vote_commit_timeout_ms,
                    idempotency_ttl_ms=config.vote_idempotency_ttl_s * 1000)
    scorer = FraudScorer(fraud_channel, batch_ms=config.vote_fraud_batch_ms,
                         timeout_ms=config.vote_fraud_timeout_ms,
                         fail_open=config.vote_fraud_fail_open,
                         retry_ms=config.vote_fraud_retry_ms)
    return scripts, ledger, Ingestor(storage, scripts, ledger, scorer, config)


def create_server(config: VoteConfig) -> tuple[ServiceHost, int]:
    storage = Storage.from_config(config)
    host = ServiceHost(config, storage)
    fraud_channel = (mesh.channel(config.fraud_target, "fraud_svc", host.tls)
                     if config.fraud_target else None)
    scripts, ledger, ingestor = create_pipeline(config, storage, fraud_channel)
    ledger.start()
    watch = asyncio.get_running_loop().create_task(ingestor.recovery.watch_shards())
    background: list[asyncio.Task[None]] = []

    stores = Stores.from_config(config)
    catalogue = PackageCatalogue(storage)
    purchases = Purchases(storage, scripts, stores, catalogue)

    async def start_background() -> None:
        background.extend(_start_background(config, storage, scripts, fraud_channel))
        if stores.google is not None:
            background.append(asyncio.get_running_loop().create_task(
                purchases.run_poller(config.vote_voided_poll_interval_s),
                name="purchase-poller"))

    host.on_start(start_background)

    async def flush() -> None:
        # After in-flight RPCs drained: write what is queued so no admitted vote is dropped.
        watch.cancel()
        for task in background:
            task.cancel()
        await ledger.close()
        stores.close()
        if fraud_channel is not None:
            await fraud_channel.close(None)

    host.on_stop(flush)
    host.add(vote_service_pb2_grpc.add_VoteServiceServicer_to_server,
             VoteServicer(storage, ingestor, catalogue, purchases),
             vote_service_pb2.DESCRIPTOR.services_by_name["VoteService"])
    host.add(vote_service_pb2_grpc.add_StoreNotificationServiceServicer_to_server,
             StoreNotificationServicer(purchases),
             vote_service_pb2.DESCRIPTOR.services_by_name["StoreNotificationService"])
    host.add(vote_gateway_service_pb2_grpc.add_VoteGatewayServiceServicer_to_server,
             VoteGatewayServicer(ingestor),
             vote_gateway_service_pb2.DESCRIPTOR.services_by_name["VoteGatewayService"])
    host.add(wallet_admin_service_pb2_grpc.add_WalletAdminServiceServicer_to_server,
             WalletAdminServicer(storage, scripts),
             wallet_admin_service_pb2.DESCRIPTOR.services_by_name["WalletAdminService"])
    return host, host.bind()


def _start_background(config: VoteConfig, storage: Storage, scripts: Scripts,
                      fraud_channel: grpc.aio.Channel | None) -> list[asyncio.Task[None]]:
    """The reconciler of dead replicas' admissions and, with fraud scoring configured, the
    re-scorer of UNSCORED votes (started once storage is connected)."""
    loop = asyncio.get_running_loop()
    reconciler = Reconciler(storage, scripts, interval_ms=config.vote_reconcile_interval_ms,
                            idempotency_ttl_ms=config.vote_idempotency_ttl_s * 1000)
    tasks = [loop.create_task(reconciler.run(), name="reconciler")]
    if fraud_channel is not None:
        rescorer = Rescorer(storage, fraud_channel, interval_ms=config.vote_rescore_interval_ms,
                            batch=config.vote_rescore_batch,
                            timeout_ms=config.vote_rescore_timeout_ms,
                            replica=config.televote_replica)
        tasks.append(loop.create_task(rescorer.run(), name="rescorer"))
    return tasks


def main() -> None:
    run_service(create_server, VoteConfig)
