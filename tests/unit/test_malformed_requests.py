"""Bytes that are not the RPC's request message are the caller's mistake: INVALID_ARGUMENT
with a reason, never the UNKNOWN grpc.aio answers a failing deserializer with (invariant 8)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from runtime.access import Role
from runtime.errors import error_info
from runtime.server import ServiceHost
from tests.slow_service import SlowConfig

NOT_A_MESSAGE = b"\xff\xff\xff\xff"  # a field header whose varint never ends


async def _echo(request: Any, context: Any) -> Any:
    return request


async def _stream(request: Any, context: Any) -> AsyncIterator[Any]:
    yield request


@pytest.fixture
async def port() -> AsyncIterator[int]:
    host = ServiceHost(SlowConfig(televote_drain_announce_seconds=0,
                                  televote_grace_seconds=0.1),
                       storage=None, service_roles={"test.Echo": frozenset(Role)})
    parse = health_pb2.HealthCheckRequest.FromString
    host.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", {
        "Echo": grpc.unary_unary_rpc_method_handler(
            _echo, request_deserializer=parse,
            response_serializer=health_pb2.HealthCheckRequest.SerializeToString),
        "Stream": grpc.unary_stream_rpc_method_handler(
            _stream, request_deserializer=parse,
            response_serializer=health_pb2.HealthCheckRequest.SerializeToString)}),))
    bound = host.bind()
    await host.start()
    try:
        yield bound
    finally:
        await host.stop()


@pytest.mark.parametrize("kind", ["unary", "stream"])
async def test_a_request_that_is_not_the_message_is_invalid_argument(port: int, kind: str) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            if kind == "unary":
                await channel.unary_unary("/test.Echo/Echo")(NOT_A_MESSAGE, timeout=5)
            else:
                async for _ in channel.unary_stream("/test.Echo/Stream")(NOT_A_MESSAGE,
                                                                         timeout=5):
                    pass
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        info = error_info(refused.value)
        assert info is not None and info.reason == "INVALID_REQUEST"
        # A well-formed one goes through.
        good = health_pb2.HealthCheckRequest(service="x").SerializeToString()
        assert await channel.unary_unary("/test.Echo/Echo")(good, timeout=5) == good
