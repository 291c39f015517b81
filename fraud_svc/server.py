"""fraud_svc's server."""

from __future__ import annotations

from typing import ClassVar

from runtime.config import ServiceConfig
from runtime.server import ServiceHost, run_service
from runtime.storage import Storage
from televote.fraud.v1 import (
    fraud_review_service_pb2,
    fraud_review_service_pb2_grpc,
    fraud_scoring_service_pb2,
    fraud_scoring_service_pb2_grpc,
)


class FraudConfig(ServiceConfig):
    service_name: ClassVar[str] = "fraud_svc"


def create_server(config: FraudConfig) -> tuple[ServiceHost, int]:
    host = ServiceHost(config, Storage.from_config(config))
    # These RPCs land with their own issues; until then the generated base servicers answer
    # UNIMPLEMENTED.
    host.add(fraud_scoring_service_pb2_grpc.add_FraudScoringServiceServicer_to_server,
             fraud_scoring_service_pb2_grpc.FraudScoringServiceServicer(),  # type: ignore[abstract]
             fraud_scoring_service_pb2.DESCRIPTOR.services_by_name["FraudScoringService"])
    host.add(fraud_review_service_pb2_grpc.add_FraudReviewServiceServicer_to_server,
             fraud_review_service_pb2_grpc.FraudReviewServiceServicer(),  # type: ignore[abstract]
             fraud_review_service_pb2.DESCRIPTOR.services_by_name["FraudReviewService"])
    return host, host.bind()


def main() -> None:
    run_service(create_server, FraudConfig)
