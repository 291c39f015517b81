"""sms_svc's servicers."""

from __future__ import annotations

from televote.sms.v1 import carrier_service_pb2_grpc


class CarrierServicer(carrier_service_pb2_grpc.CarrierServiceServicer):
    """CarrierService. No RPC is implemented: each answers UNIMPLEMENTED (the generated
    base's behaviour)."""
