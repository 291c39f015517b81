"""Every handler of a ServiceHost runs inside the guard, however it was registered (the
generated add_XServicer_to_server, generic handlers, registered method handlers): a caller
whose role the access table does not allow is refused before the handler runs, on every call,
and the handler sees the caller the claims header names (runtime/interceptors.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from opentelemetry import baggage, trace

from runtime.access import Principal, Role
from runtime.errors import error_info
from runtime.interceptors import current_principal
from runtime.server import ServiceHost
from televote.vote.v1 import vote_service_pb2, vote_service_pb2_grpc
from tests.slow_service import SlowConfig

LIST_PACKAGES = "/televote.vote.v1.VoteService/ListVotePackages"


class _Packages(vote_service_pb2_grpc.VoteServiceServicer):
    """Answers with the caller's subject as the one package's id, and counts its calls."""

    calls = 0

    async def ListVotePackages(self, request: Any, context: Any) -> Any:
        _Packages.calls += 1
        return vote_service_pb2.ListVotePackagesResponse(
            packages=[{"package_id": current_principal().subject}])


async def _whoami(request: bytes, context: Any) -> bytes:
    return current_principal().subject.encode()


async def _trace(request: bytes, context: Any) -> bytes:
    """The trace this call's span is in, and any baggage that became the call's."""
    trace_id = trace.get_current_span().get_span_context().trace_id
    return f"{trace_id:032x} {baggage.get_all()}".encode()


@pytest.fixture
async def port() -> AsyncIterator[int]:
    host = ServiceHost(SlowConfig(televote_drain_announce_seconds=0, televote_grace_seconds=0),
                       storage=None, service_roles={
                           "televote.vote.v1.VoteService": frozenset({Role.VOTER}),
                           "test.Generic": frozenset({Role.VOTER}),
                           "test.Registered": frozenset({Role.VOTER}),
                           "test.Trace": frozenset(Role)})
    host.add(vote_service_pb2_grpc.add_VoteServiceServicer_to_server, _Packages(),
             vote_service_pb2.DESCRIPTOR.services_by_name["VoteService"])
    whoami = grpc.unary_unary_rpc_method_handler(_whoami)
    host.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "test.Generic", {"WhoAmI": whoami}),))
    host.server.add_registered_method_handlers(  # type: ignore[attr-defined]
        "test.Registered", {"WhoAmI": whoami})
    host.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "test.Trace", {"Trace": grpc.unary_unary_rpc_method_handler(_trace)}),))
    port = host.bind()
    await host.start()
    try:
        yield port
    finally:
        await host.stop()


async def _refusal(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call
    info = error_info(refused.value)
    assert info is not None
    return refused.value.code(), info.reason


async def test_a_generated_servicer_is_guarded_on_every_call(port: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        packages = vote_service_pb2_grpc.VoteServiceStub(channel).ListVotePackages
        request = vote_service_pb2.ListVotePackagesRequest()
        calls = _Packages.calls
        reply = await packages(request, metadata=Principal(Role.VOTER, "v1").to_metadata())
        assert [package.package_id for package in reply.packages] == ["v1"]
        # The next calls on the same connection are judged on their own headers.
        assert await _refusal(packages(
            request, metadata=Principal(Role.OPERATOR, "op").to_metadata())) == (
            grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
        assert await _refusal(packages(request)) == (
            grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")
        reply = await packages(request, metadata=Principal(Role.VOTER, "v2").to_metadata())
        assert [package.package_id for package in reply.packages] == ["v2"]
        assert _Packages.calls == calls + 2  # the refused calls never reached the handler


@pytest.mark.parametrize("service", ["test.Generic", "test.Registered"])
async def test_handlers_added_directly_are_guarded(port: int, service: str) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        whoami = channel.unary_unary(f"/{service}/WhoAmI")
        assert await whoami(b"", metadata=Principal(Role.VOTER, "v3").to_metadata()) == b"v3"
        assert await _refusal(whoami(b"", metadata=Principal(
            Role.CARRIER, "c").to_metadata())) == (
            grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")


async def test_a_call_is_a_span_of_its_callers_trace_without_the_callers_baggage(
        port: int) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await channel.unary_unary("/test.Trace/Trace")(b"", metadata=(
            ("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01"),
            ("baggage", "tenant=someone-else")))
    assert reply.decode() == f"{trace_id} {{}}"
