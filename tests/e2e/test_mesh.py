"""The mesh stands up: reflection, health, the edge's three protocols, authn and RBAC."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import urllib.error
import urllib.request

import grpc
import pytest

from ops.stack import SERVICES, Stack
from runtime.access import SERVICE_ROLES, Role
from runtime.errors import error_info
from televote.fraud.v1 import fraud_scoring_service_pb2, fraud_scoring_service_pb2_grpc
from televote.results.v1 import report_service_pb2, report_service_pb2_grpc
from televote.sync.v1 import show_control_service_pb2, show_control_service_pb2_grpc
from televote.vote.v1 import vote_service_pb2, vote_service_pb2_grpc
from tests.conftest import bearer

GRPCURL = shutil.which("grpcurl") or os.path.join(os.path.dirname(os.sys.executable), "grpcurl")


def _http(stack: Stack, method: str, path: str, *, token: str | None = None,
          body: bytes | None = None, content_type: str = "application/json",
          ) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(f"{stack.edge_url}{path}", data=body, method=method)
    request.add_header("content-type", content_type)
    if token:
        request.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def _grpcurl_tls(stack: Stack, process: str) -> list[str]:
    """grpcurl's flags for an operator reaching `process` (README: "Calling it")."""
    operator = stack.tls_dir("operator")
    return ["-cacert", str(operator / "ca.pem"), "-cert", str(operator / "cert.pem"),
            "-key", str(operator / "key.pem"), "-servername", process.replace("_", "-")]


def _token(stack: Stack, role: Role, subject: str = "tester") -> str:
    return bearer(stack.settings.state_dir, role, subject)[0][1].removeprefix("Bearer ")


def test_every_service_lists_its_services_through_reflection_and_is_serving(
        stack: Stack) -> None:
    for process in SERVICES:
        for host, port in stack.addresses[process]:
            tls = _grpcurl_tls(stack, process)
            listed = subprocess.run([GRPCURL, *tls, f"{host}:{port}", "list"],
                                    capture_output=True, text=True, check=True).stdout.split()
            expected = {name for name in SERVICE_ROLES if name.split(".")[1] == process[:-4]}
            assert expected <= set(listed), (process, listed)
            assert "grpc.health.v1.Health" in listed
            health = subprocess.run(
                [GRPCURL, *tls, f"{host}:{port}", "grpc.health.v1.Health/Check"],
                capture_output=True, text=True, check=True).stdout
            assert json.loads(health)["status"] == "SERVING"


async def test_one_rpc_through_native_grpc(stack: Stack, edge_channel: grpc.aio.Channel) -> None:
    stub = vote_service_pb2_grpc.VoteServiceStub(edge_channel)
    reply = await stub.ListVotePackages(
        vote_service_pb2.ListVotePackagesRequest(),
        metadata=bearer(stack.settings.state_dir, Role.VOTER, "user-1"), timeout=5)
    assert [package.total_votes for package in reply.packages] == [10, 60, 250, 1200]


def test_one_rpc_through_json(stack: Stack) -> None:
    status, _, body = _http(stack, "GET", "/v1/vote-packages", token=_token(stack, Role.VOTER))
    assert status == 200, body
    packages = json.loads(body)["packages"]
    # The specification's catalogue: its ids and store SKUs, its prices and bonuses (USD).
    assert [(p["packageId"], p["appleProductId"], p["googleProductId"], p["votes"],
             p["bonusVotes"], p["totalVotes"], p["price"]["currencyCode"],
             p["price"]["amountMicros"]) for p in packages] == [
        ("vote_pack_10", "com.hangmeas.votes.10", "votes_10", 10, 0, 10, "USD", "990000"),
        ("vote_pack_50", "com.hangmeas.votes.50", "votes_50", 50, 10, 60, "USD", "3990000"),
        ("vote_pack_200", "com.hangmeas.votes.200", "votes_200", 200, 50, 250, "USD",
         "9990000"),
        ("vote_pack_1000", "com.hangmeas.votes.1000", "votes_1000", 1000, 200, 1200, "USD",
         "39990000")]


def test_one_rpc_through_grpc_web(stack: Stack) -> None:
    message = vote_service_pb2.ListVotePackagesRequest().SerializeToString()
    frame = b"\x00" + struct.pack(">I", len(message)) + message
    status, headers, body = _http(
        stack, "POST", "/televote.vote.v1.VoteService/ListVotePackages",
        token=_token(stack, Role.VOTER), body=frame, content_type="application/grpc-web+proto")
    assert status == 200
    assert headers["content-type"].startswith("application/grpc-web")
    frames = []
    while body:
        flag, length = body[0], struct.unpack(">I", body[1:5])[0]
        frames.append((flag, body[5:5 + length]))
        body = body[5 + length:]
    data = [payload for flag, payload in frames if flag == 0]
    trailers = b"".join(payload for flag, payload in frames if flag & 0x80).decode()
    assert "grpc-status:0" in trailers.replace(" ", "")
    reply = vote_service_pb2.ListVotePackagesResponse.FromString(data[0])
    assert len(reply.packages) == 4


def test_no_token_is_401_and_unauthenticated(stack: Stack) -> None:
    status, _, _ = _http(stack, "GET", "/v1/vote-packages")
    assert status == 401


async def test_no_token_over_grpc_is_unauthenticated(edge_channel: grpc.aio.Channel) -> None:
    stub = vote_service_pb2_grpc.VoteServiceStub(edge_channel)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.ListVotePackages(vote_service_pb2.ListVotePackagesRequest(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_forged_claims_header_is_ignored(edge_channel: grpc.aio.Channel) -> None:
    stub = vote_service_pb2_grpc.VoteServiceStub(edge_channel)
    forged = (("x-jwt-payload", "eyJyb2xlIjoidm90ZXIiLCJzdWIiOiJ4In0"),)  # {"role":"voter",...}
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.ListVotePackages(vote_service_pb2.ListVotePackagesRequest(),
                                    metadata=forged, timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_voter_calling_an_operator_rpc_is_denied(
        stack: Stack, edge_channel: grpc.aio.Channel) -> None:
    stub = show_control_service_pb2_grpc.ShowControlServiceStub(edge_channel)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.CreateShow(show_control_service_pb2.CreateShowRequest(),
                              metadata=bearer(stack.settings.state_dir, Role.VOTER, "v"),
                              timeout=5)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_voter_calling_an_operator_rpc_over_json_is_403(stack: Stack) -> None:
    status, _, _ = _http(stack, "POST", "/v1/shows", token=_token(stack, Role.VOTER),
                         body=b'{"name": "X Factor"}')
    assert status == 403


@pytest.mark.parametrize("role", [Role.VOTER, Role.OPERATOR, Role.CARRIER])
async def test_fraud_scoring_is_unreachable_from_the_edge(
        stack: Stack, edge_channel: grpc.aio.Channel, role: Role) -> None:
    stub = fraud_scoring_service_pb2_grpc.FraudScoringServiceStub(edge_channel)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.ScoreVotes(fraud_scoring_service_pb2.ScoreVotesRequest(),
                              metadata=bearer(stack.settings.state_dir, role, "x"), timeout=5)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_the_service_itself_refuses_a_role_the_table_does_not_allow(stack: Stack) -> None:
    """Defence in depth: a caller inside the mesh is held to the same table as the edge."""
    from runtime.access import Principal

    # Past the edge with the edge's own certificate: the claims are believed, and the table
    # still keeps a voter out of the internal scoring service.
    async with stack.channel("fraud_svc", as_holder="edge") as channel:
        stub = fraud_scoring_service_pb2_grpc.FraudScoringServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ScoreVotes(fraud_scoring_service_pb2.ScoreVotesRequest(),
                                  metadata=Principal(Role.VOTER, "v").to_metadata(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    info = error_info(refused.value)
    assert info is not None and info.reason == "PERMISSION_DENIED"


async def test_an_rpc_whose_issue_has_not_landed_is_unimplemented(
        stack: Stack, edge_channel: grpc.aio.Channel) -> None:
    stub = report_service_pb2_grpc.ReportServiceStub(edge_channel)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.GetEpisodeReport(report_service_pb2.GetEpisodeReportRequest(),
                                    metadata=bearer(stack.settings.state_dir, Role.OPERATOR, "op"),
                                    timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
    info = error_info(refused.value)
    assert info is not None and info.reason == "NOT_IMPLEMENTED"
