"""One client address without a token holds at most so many server streams open on a replica
(runtime/interceptors.AnonymousStreams); other addresses and token holders are not held to
it, and a closed stream frees its slot."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from runtime.access import Principal, Role
from runtime.errors import error_info
from runtime.interceptors import CLIENT_IP_HEADER
from runtime.server import ServiceHost
from tests.slow_service import SlowConfig

WATCH = "/test.Watch/Watch"


async def _watch(request: bytes, context: Any) -> AsyncIterator[bytes]:
    yield b"hello"
    await asyncio.Event().wait()  # a show-long stream: until the caller goes


@pytest.fixture
async def host() -> AsyncIterator[ServiceHost]:
    config = SlowConfig(televote_anonymous_streams_per_ip=3, televote_drain_announce_seconds=0,
                        televote_grace_seconds=0.1)
    host = ServiceHost(config, storage=None, service_roles={"test.Watch": frozenset(Role)})
    host.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "test.Watch", {"Watch": grpc.unary_stream_rpc_method_handler(_watch)}),))
    host.port = host.bind()  # type: ignore[attr-defined]
    await host.start()
    try:
        yield host
    finally:
        await host.stop()


async def _open(channel: grpc.aio.Channel, address: str,
                extra: tuple[tuple[str, str], ...] = ()) -> Any:
    stream = channel.unary_stream(WATCH)(b"", metadata=((CLIENT_IP_HEADER, address), *extra),
                                         timeout=10)
    assert await stream.read() == b"hello"
    return stream


async def test_one_address_holds_at_most_its_cap_of_anonymous_streams(host: Any) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{host.port}") as channel:
        held = [await _open(channel, "203.0.113.7") for _ in range(3)]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _open(channel, "203.0.113.7")
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        info = error_info(refused.value)
        assert info is not None and info.reason == "TOO_MANY_STREAMS"
        # Another address, and a voter behind the same one, are not held to it.
        others = [await _open(channel, "198.51.100.1"),
                  await _open(channel, "203.0.113.7", Principal(Role.VOTER, "v").to_metadata())]
        # A closed stream frees its slot.
        held[0].cancel()
        for _ in range(50):
            try:
                held[0] = await _open(channel, "203.0.113.7")
                break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.05)  # the server has not seen the cancel yet
        else:
            raise AssertionError("the slot of a closed stream was never freed")
        for stream in (*held, *others):
            stream.cancel()
