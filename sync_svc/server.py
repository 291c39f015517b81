"""sync_svc's server: show control for operators, show watching for everyone, and the closer."""

from __future__ import annotations

from runtime.fanout import Streams, add_servicer
from runtime.server import ServiceHost, run_service
from runtime.storage import Storage
from sync_svc.api import ShowControlServicer, ShowInternalServicer, ShowWatchServicer
from sync_svc.closer import Closer
from sync_svc.config import SyncConfig
from sync_svc.hub import Hub
from sync_svc.show import ShowStore
from televote.sync.v1 import (
    show_control_service_pb2,
    show_control_service_pb2_grpc,
    show_internal_service_pb2,
    show_internal_service_pb2_grpc,
    show_watch_service_pb2,
)


def create_server(config: SyncConfig) -> tuple[ServiceHost, int]:
    storage = Storage.from_config(config)
    host = ServiceHost(config, storage)
    streams = Streams()
    host.on_drain(streams.end)
    store = ShowStore(storage, config)
    hub = Hub(storage, store, config, streams)
    closer = Closer(storage, store, config)
    hub.on_round_change.append(closer.poke)

    async def start_background() -> None:
        await hub.start()
        closer.start()

    async def stop_background() -> None:
        await closer.stop()
        await hub.stop()

    host.on_start(start_background)
    host.on_stop(stop_background)
    host.add(show_control_service_pb2_grpc.add_ShowControlServiceServicer_to_server,
             ShowControlServicer(store),
             show_control_service_pb2.DESCRIPTOR.services_by_name["ShowControlService"])
    watch_service = show_watch_service_pb2.DESCRIPTOR.services_by_name["ShowWatchService"]
    host.add(add_servicer(watch_service, prebuilt=["WatchShow"]), ShowWatchServicer(store, hub),
             watch_service)
    host.add(show_internal_service_pb2_grpc.add_ShowInternalServiceServicer_to_server,
             ShowInternalServicer(store),
             show_internal_service_pb2.DESCRIPTOR.services_by_name["ShowInternalService"])
    return host, host.bind()


def main() -> None:
    run_service(create_server, SyncConfig)
