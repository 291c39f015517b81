"""vote_svc's server: voting for voters, batch submission for gateways, wallet grants."""

from __future__ import annotations

from typing import Any, ClassVar

from runtime.config import ServiceConfig
from runtime.server import ServiceHost, run_service
from runtime.storage import Storage
from televote.vote.v1 import (
    vote_gateway_service_pb2,
    vote_gateway_service_pb2_grpc,
    vote_service_pb2,
    vote_service_pb2_grpc,
    wallet_admin_service_pb2,
    wallet_admin_service_pb2_grpc,
)
from vote_svc.packages import list_packages


class VoteConfig(ServiceConfig):
    service_name: ClassVar[str] = "vote_svc"


class VoteServicer(vote_service_pb2_grpc.VoteServiceServicer):
    """Voters' RPCs. SubmitVote, GetBalance and purchases land with the vote ingestion issue."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage

    async def ListVotePackages(self, request: vote_service_pb2.ListVotePackagesRequest,
                               context: Any) -> vote_service_pb2.ListVotePackagesResponse:
        return vote_service_pb2.ListVotePackagesResponse(
            packages=await list_packages(self._storage))


def create_server(config: VoteConfig) -> tuple[ServiceHost, int]:
    storage = Storage.from_config(config)
    host = ServiceHost(config, storage)
    host.add(vote_service_pb2_grpc.add_VoteServiceServicer_to_server, VoteServicer(storage),  # type: ignore[abstract]
             vote_service_pb2.DESCRIPTOR.services_by_name["VoteService"])
    host.add(vote_gateway_service_pb2_grpc.add_VoteGatewayServiceServicer_to_server,
             vote_gateway_service_pb2_grpc.VoteGatewayServiceServicer(),  # type: ignore[abstract]
             vote_gateway_service_pb2.DESCRIPTOR.services_by_name["VoteGatewayService"])
    host.add(wallet_admin_service_pb2_grpc.add_WalletAdminServiceServicer_to_server,
             wallet_admin_service_pb2_grpc.WalletAdminServiceServicer(),  # type: ignore[abstract]
             wallet_admin_service_pb2.DESCRIPTOR.services_by_name["WalletAdminService"])
    return host, host.bind()


def main() -> None:
    run_service(create_server, VoteConfig)
