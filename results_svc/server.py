"""results_svc's server."""

from __future__ import annotations

from typing import ClassVar

from runtime.config import ServiceConfig
from runtime.server import ServiceHost, run_service
from runtime.storage import Storage
from televote.results.v1 import (
    report_service_pb2,
    report_service_pb2_grpc,
    results_service_pb2,
    results_service_pb2_grpc,
)


class ResultsConfig(ServiceConfig):
    service_name: ClassVar[str] = "results_svc"


def create_server(config: ResultsConfig) -> tuple[ServiceHost, int]:
    host = ServiceHost(config, Storage.from_config(config))
    # These RPCs land with their own issues; until then the generated base servicers answer
    # UNIMPLEMENTED.
    host.add(results_service_pb2_grpc.add_ResultsServiceServicer_to_server,
             results_service_pb2_grpc.ResultsServiceServicer(),  # type: ignore[abstract]
             results_service_pb2.DESCRIPTOR.services_by_name["ResultsService"])
    host.add(report_service_pb2_grpc.add_ReportServiceServicer_to_server,
             report_service_pb2_grpc.ReportServiceServicer(),  # type: ignore[abstract]
             report_service_pb2.DESCRIPTOR.services_by_name["ReportService"])
    return host, host.bind()


def main() -> None:
    run_service(create_server, ResultsConfig)
