"""results_svc's server: live and final results, receipts and proofs, reports."""

from __future__ import annotations

from results_svc.api import ResultsServicer, register
from results_svc.config import ResultsConfig
from results_svc.final import Finalizer
from results_svc.live import Live
from results_svc.proofs import Proofs
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
    streams = Streams()
    host.on_drain(streams.end)
    signer = Signer.load_or_create(config.televote_state_dir)
    finalizer = Finalizer(storage, config, signer)
    live = Live(storage, config, finalizer, streams)

    async def start_background() -> None:
        await live.start()
        await finalizer.start()

    async def stop_background() -> None:
        await finalizer.stop()
        await live.stop()

    host.on_start(start_background)
    host.on_stop(stop_background)
    host.add(register, ResultsServicer(storage, live, Proofs(storage, config), signer),
             results_service_pb2.DESCRIPTOR.services_by_name["ResultsService"])
    # ReportService is not implemented: the base servicer answers UNIMPLEMENTED.
    host.add(report_service_pb2_grpc.add_ReportServiceServicer_to_server,
             report_service_pb2_grpc.ReportServiceServicer(),  # type: ignore[abstract]
             report_service_pb2.DESCRIPTOR.services_by_name["ReportService"])
    return host, host.bind()


def main() -> None:
    run_service(create_server, ResultsConfig)
