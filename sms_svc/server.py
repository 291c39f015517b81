"""sms_svc's server."""

from __future__ import annotations

from typing import ClassVar

from runtime.config import ServiceConfig
from runtime.server import ServiceHost, run_service
from runtime.storage import Storage
from televote.sms.v1 import (
    carrier_service_pb2,
    carrier_service_pb2_grpc,
)


class SmsConfig(ServiceConfig):
    service_name: ClassVar[str] = "sms_svc"


def create_server(config: SmsConfig) -> tuple[ServiceHost, int]:
    host = ServiceHost(config, Storage.from_config(config))
    # These RPCs land with their own issues; until then the generated base servicers answer
    # UNIMPLEMENTED.
    host.add(carrier_service_pb2_grpc.add_CarrierServiceServicer_to_server,
             carrier_service_pb2_grpc.CarrierServiceServicer(),  # type: ignore[abstract]
             carrier_service_pb2.DESCRIPTOR.services_by_name["CarrierService"])
    return host, host.bind()


def main() -> None:
    run_service(create_server, SmsConfig)
