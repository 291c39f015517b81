"""sms_svc's server: carriers' messages and delivery reports, operators' short codes.

Wiring only; the life of a message is in sms_svc/inbound.py.
"""

from __future__ import annotations

import aiohttp

from runtime import mesh
from runtime.server import ServiceHost, run_service
from runtime.storage import Storage
from sms_svc.api import CarrierServicer, ShortCodeServicer
from sms_svc.config import SmsConfig
from sms_svc.inbound import InboundProcessor
from sms_svc.kannel import KannelReplies
from sms_svc.outbox import ReplyOutbox
from sms_svc.store import PendingReply, SmsStore
from sms_svc.votes import VoteSender
from televote.sms.v1 import (
    carrier_service_pb2,
    carrier_service_pb2_grpc,
    short_code_service_pb2,
    short_code_service_pb2_grpc,
)

__all__ = ["SmsConfig", "create_server", "main"]


def create_server(config: SmsConfig) -> tuple[ServiceHost, int]:
    storage = Storage.from_config(config)
    host = ServiceHost(config, storage)
    if not config.vote_target:
        raise SystemExit("sms_svc: VOTE_TARGET is not set")
    vote_channel = mesh.channel(config.vote_target, "vote_svc", host.tls)
    votes = VoteSender(vote_channel, wait_ms=config.sms_batch_wait_ms,
                       max_batch=config.sms_batch_max, deadline_ms=config.sms_vote_deadline_ms)
    kannel = KannelReplies.from_config(
        config.sms_kannel_sendsms_url, config.sms_kannel_username, config.sms_kannel_password,
        config.sms_kannel_dlr_urls, config.sms_kannel_smsc_ids)
    store = SmsStore(storage, binding_cache_ms=config.sms_binding_cache_ms,
                     replies_queued=kannel is not None,
                     reply_lease_ms=config.sms_reply_lease_ms)
    outbox: ReplyOutbox | None = None
    sessions: list[aiohttp.ClientSession] = []
    if kannel is not None:
        async def send(reply: PendingReply) -> str | None:
            if not sessions:
                sessions.append(aiohttp.ClientSession())
            return await kannel.send(sessions[0], reply)
        outbox = ReplyOutbox(store, send, poll_ms=config.sms_reply_poll_ms,
                             retry_ms=config.sms_reply_retry_ms)
    inbound = InboundProcessor(
        store, storage.redis, votes, secret=config.msisdn_secret(),
        default_language=config.sms_default_language, lease_ms=config.sms_processing_lease_ms,
        max_age_ms=config.sms_gateway_max_age_ms, deadline_ms=config.sms_vote_deadline_ms,
        replies_recorded=outbox.recorded if outbox is not None else None)

    async def start() -> None:
        if outbox is not None:
            outbox.start()

    async def close() -> None:
        if outbox is not None:
            await outbox.stop()
        for session in sessions:
            await session.close()
        await vote_channel.close(None)

    host.on_start(start)
    host.on_stop(close)
    host.add(carrier_service_pb2_grpc.add_CarrierServiceServicer_to_server,
             CarrierServicer(store, inbound),
             carrier_service_pb2.DESCRIPTOR.services_by_name["CarrierService"])
    host.add(short_code_service_pb2_grpc.add_ShortCodeServiceServicer_to_server,
             ShortCodeServicer(storage, store),
             short_code_service_pb2.DESCRIPTOR.services_by_name["ShortCodeService"])
    return host, host.bind()


def main() -> None:
    run_service(create_server, SmsConfig)
