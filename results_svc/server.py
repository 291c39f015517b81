"""results_svc's server: live and final results, receipts and proofs, reports."""

from __future__ import annotations

import asyncio

from results_svc.api import ResultsServicer, register
from results_svc.config import ResultsConfig
from results_svc.final import Finalizer
from results_svc.live import Live
from results_svc.proofs import Proofs
from results_svc.report import places
from results_svc.report.api import ReportServicer
from results_svc.report.report import Reports
from results_svc.signing import Signer
from runtime.fanout import Streams
from runtime.server import ServiceHost, run_service
from runtime.storage import Storage
from televote.results.v1 import (
    report_service_pb2,
    report_service_pb2_grpc,
    results_service_pb2,
)


def create_server(config: ResultsConfig) -> tuple[ServiceHost, int]:
    storage = Storage.from_config(config)
    host = ServiceHost(config, storage)
    warming: list[asyncio.Future[None]] = []
    streams = Streams()
    host.on_drain(streams.end)
    signer = Signer.load(*config.signing_key_path())
    finalizer = Finalizer(storage, config, signer)
    live = Live(storage, config, finalizer, streams)
    reports = Reports(storage, config)

    async def start_background() -> None:
        await live.start()
        await finalizer.start()
        await reports.start()
        # Off the event loop and not awaited: SERVING does not wait for the gazetteer.
        warming.append(asyncio.ensure_future(asyncio.to_thread(places.warm)))

    async def stop_background() -> None:
        await reports.stop()
        await finalizer.stop()
        await live.stop()

    host.on_start(start_background)
    host.on_stop(stop_background)
    host.add(register, ResultsServicer(storage, live, Proofs(storage, config), signer),
             results_service_pb2.DESCRIPTOR.services_by_name["ResultsService"])
    host.add(report_service_pb2_grpc.add_ReportServiceServicer_to_server,
             ReportServicer(reports),
             report_service_pb2.DESCRIPTOR.services_by_name["ReportService"])
    return host, host.bind()


def main() -> None:
    run_service(create_server, ResultsConfig)
