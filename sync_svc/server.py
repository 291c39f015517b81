"""sync_svc's server: show control for operators, show watching for everyone."""

from __future__ import annotations

from typing import ClassVar

from runtime.config import ServiceConfig
from runtime.server import ServiceHost, run_service
from runtime.storage import Storage
from televote.sync.v1 import (
    show_control_service_pb2,
    show_control_service_pb2_grpc,
    show_watch_service_pb2,
    show_watch_service_pb2_grpc,
)


class SyncConfig(ServiceConfig):
    service_name: ClassVar[str] = "sync_svc"


def create_server(config: SyncConfig) -> tuple[ServiceHost, int]:
    host = ServiceHost(config, Storage.from_config(config))
    # The show control and watch RPCs land with the show sync issue; until then the
    # generated base servicers answer UNIMPLEMENTED.
    host.add(show_control_service_pb2_grpc.add_ShowControlServiceServicer_to_server,
             show_control_service_pb2_grpc.ShowControlServiceServicer(),  # type: ignore[abstract]
             show_control_service_pb2.DESCRIPTOR.services_by_name["ShowControlService"])
    host.add(show_watch_service_pb2_grpc.add_ShowWatchServiceServicer_to_server,
             show_watch_service_pb2_grpc.ShowWatchServiceServicer(),  # type: ignore[abstract]
             show_watch_service_pb2.DESCRIPTOR.services_by_name["ShowWatchService"])
    return host, host.bind()


def main() -> None:
    run_service(create_server, SyncConfig)
