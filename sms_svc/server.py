"""sms_svc's server."""

from __future__ import annotations

from runtime.server import ServiceHost, run_service
from runtime.storage import Storage
from sms_svc.api import CarrierServicer
from sms_svc.config import SmsConfig
from televote.sms.v1 import (
    carrier_service_pb2,
    carrier_service_pb2_grpc,
)

__all__ = ["SmsConfig", "create_server", "main"]


def create_server(config: SmsConfig) -> tuple[ServiceHost, int]:
    host = ServiceHost(config, Storage.from_config(config))
    host.add(carrier_service_pb2_grpc.add_CarrierServiceServicer_to_server,
             CarrierServicer(),  # type: ignore[abstract]  # every RPC UNIMPLEMENTED
             carrier_service_pb2.DESCRIPTOR.services_by_name["CarrierService"])
    return host, host.bind()


def main() -> None:
    run_service(create_server, SmsConfig)
