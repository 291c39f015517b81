"""A service built on the shared runtime whose one RPC takes a while, to watch a drain.

Run as `python -m tests.slow_service`; it serves `/test.Slow/Sleep` (raw bytes in and out)
and needs no storage, so the graceful-shutdown test exercises only the runtime.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, ClassVar

import grpc

from runtime.access import Role
from runtime.config import ServiceConfig
from runtime.server import ServiceHost, serve_forever

SLEEP_METHOD = "/test.Slow/Sleep"


class SlowConfig(ServiceConfig):
    service_name: ClassVar[str] = "slow_test_svc"
    database_url: str = "unused"
    redis_url: str = "unused"


async def _sleep(request: bytes, context: Any) -> bytes:
    logging.getLogger(__name__).info("sleeping")
    await asyncio.sleep(float(request.decode()))
    logging.getLogger(__name__).info("slept")
    return b"slept " + request


def create_server(config: SlowConfig) -> tuple[ServiceHost, int]:
    # A test-only service is not in the platform's access table: anyone may call it.
    host = ServiceHost(config, storage=None, service_roles={"test.Slow": frozenset(Role)})
    handler = grpc.method_handlers_generic_handler(
        "test.Slow", {"Sleep": grpc.unary_unary_rpc_method_handler(_sleep)})
    host.server.add_generic_rpc_handlers((handler,))
    return host, host.bind()


if __name__ == "__main__":
    asyncio.run(serve_forever(create_server, SlowConfig.load()))
