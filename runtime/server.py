"""Server bootstrap shared by every service: one way to build, start and stop a service.

A service's own `server.py` has `create_server(config) -> (ServiceHost, port)` that builds its
servicers and binds, `serve()` that runs it until SIGTERM, and a thin `main()`; tests call
`create_server` with port 0 and drive the host directly.

Lifecycle: bind -> health NOT_SERVING (liveness SERVING) -> start -> connect storage ->
SERVING -> ... ->
SIGTERM/SIGINT -> NOT_SERVING (load balancers stop sending) -> a short announce period ->
on_drain hooks (end open streams so their clients reconnect elsewhere) -> stop accepting,
drain in-flight RPCs for the grace period -> on_stop hooks (flush what is buffered) -> close
storage -> exit.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from runtime.access import SERVICE_ROLES, Role
from runtime.config import ServiceConfig
from runtime.interceptors import GuardedServer, ServiceGuard
from runtime.logs import configure_logging
from runtime.mesh import MeshTls
from runtime.storage import Storage
from runtime.telemetry import configure_telemetry

log = logging.getLogger(__name__)

Hook = Callable[[], Awaitable[None]]

#: The health service name that says SERVING from the moment the server answers until it
#: shuts down, whatever its storage does: a liveness probe's question ("is the process
#: alive?"), where the overall status ("") is a readiness probe's ("may it take calls?"). A
#: replica whose PostgreSQL is unreachable is not ready, and restarting it would not help.
LIVENESS_SERVICE = "televote.liveness"

#: See _SERVER_OPTIONS.
MAX_REQUEST_BYTES = 1024 * 1024

# Streams (countdowns, live results) stay open for a whole show; keepalives let Envoy and
# clients notice a dead peer instead of holding its stream forever.
_SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.max_concurrent_streams", 100_000),
    # The largest message a service takes: a batch of a thousand votes to score is a few
    # hundred KiB; grpc's default (4 MiB) lets any caller make a service buffer far more.
    ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
    # Calls that have arrived but that the asyncio server has not taken yet (it cannot while a
    # countdown second is handed to ten thousand watchers): grpc-core's defaults cancel them
    # beyond ~1,000-3,000, which cut thousands of viewers opening their streams at once.
    ("grpc.server.max_pending_requests", 20_000),
    ("grpc.server.max_pending_requests_hard_limit", 50_000),
]


class ServiceHost:
    """A grpc.aio server with health, reflection, the shared guard (runtime/interceptors.py)
    around every handler, and its storage."""

    def __init__(self, config: ServiceConfig, storage: Storage | None,
                 service_roles: Mapping[str, frozenset[Role]] = SERVICE_ROLES) -> None:
        configure_logging(config.service_name, config.televote_replica, config.televote_log_level)
        configure_telemetry(config.service_name, config.televote_replica)
        self.config = config
        self.storage = storage
        self.tls = MeshTls.of(config.televote_tls_dir)
        if self.tls is None:
            log.warning("no TELEVOTE_TLS_DIR: plaintext, and the claims header of any caller "
                        "is believed (only for a lone service in a test)")
        self.server = GuardedServer(grpc.aio.server(options=_SERVER_OPTIONS), ServiceGuard(
            service_roles, mesh_tls=self.tls is not None,
            anonymous_streams_per_ip=config.televote_anonymous_streams_per_ip))
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        # Kubernetes' grpc probes speak plaintext and present no certificate, and the mesh
        # port requires one: the same health statuses are served on a port of their own.
        # (The alternative, an exec probe running grpc_health_probe with a certificate,
        # forks a process per probe per pod and needs a client key in every pod.)
        self.health_server: grpc.aio.Server | None = None
        if config.televote_health_port is not None:
            self.health_server = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
        self._service_names: list[str] = []
        self._start_hooks: list[Hook] = []
        self._stop_hooks: list[Hook] = []
        self._drain_hooks: list[Callable[[], None]] = []
        self._stopped = asyncio.Event()

    def add(self, register: Callable[[Any, grpc.aio.Server], None], servicer: Any,
            descriptor: ServiceDescriptor) -> None:
        """Register a servicer (with its generated `add_XServicer_to_server`)."""
        register(servicer, self.server)
        self._service_names.append(descriptor.full_name)

    def on_start(self, hook: Hook) -> None:
        """Run `hook` once storage is connected, before the service says SERVING."""
        self._start_hooks.append(hook)

    def on_drain(self, hook: Callable[[], None]) -> None:
        """Run `hook` once load balancers know this replica is going, before in-flight RPCs
        drain: streams that would last the whole show end now (runtime/fanout.Streams.end)
        instead of being cancelled when the grace period runs out."""
        self._drain_hooks.append(hook)

    def on_stop(self, hook: Hook) -> None:
        """Run `hook` after in-flight RPCs have drained, before storage closes."""
        self._stop_hooks.append(hook)

    def bind(self) -> int:
        """Enable reflection and listen; returns the bound port (useful with port 0)."""
        reflection.enable_server_reflection(
            [*self._service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME], self.server)  # a grpc.aio.Server: the async servicer
        address = f"{self.config.televote_host}:{self.config.televote_port}"
        port = (self.server.add_secure_port(address, self.tls.server_credentials())
                if self.tls else self.server.add_insecure_port(address))
        if port == 0:
            raise RuntimeError(f"cannot bind {address}")
        if self.health_server is not None:
            health_address = f"{self.config.televote_host}:{self.config.televote_health_port}"
            if self.health_server.add_insecure_port(health_address) == 0:
                raise RuntimeError(f"cannot bind {health_address}")
        return port

    async def _set_health(self, status: int) -> None:
        for name in ("", *self._service_names):
            await self.health.set(name, status)

    async def start(self) -> None:
        """Start answering (health says NOT_SERVING), connect storage, then say SERVING."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await self.server.start()
        if self.health_server is not None:
            await self.health_server.start()
        if self.storage is not None:
            await self.storage.connect()
        for hook in self._start_hooks:
            await hook()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving", extra={"fields": {"services": self._service_names}})

    async def stop(self) -> None:
        """Graceful shutdown: NOT_SERVING, drain in-flight RPCs, run stop hooks, close."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        await self.health.enter_graceful_shutdown()
        await asyncio.sleep(self.config.televote_drain_announce_seconds)
        for drain in self._drain_hooks:
            drain()
        await self.server.stop(self.config.televote_grace_seconds)
        for hook in self._stop_hooks:
            await hook()
        if self.storage is not None:
            await self.storage.close()
        if self.health_server is not None:
            # Last: probes see NOT_SERVING through the whole drain, not a refused connection.
            await self.health_server.stop(0)
        log.info("stopped")

    async def run_until_signal(self) -> None:
        """Start, then serve until SIGTERM or SIGINT, then stop gracefully."""
        loop = asyncio.get_running_loop()
        stop_requested = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop_requested.set)
        await self.start()
        await stop_requested.wait()
        log.info("signal received, draining")
        await self.stop()


async def serve_forever(create_server: Callable[[Any], tuple[ServiceHost, int]],
                        config: ServiceConfig) -> None:
    """What every service's `serve()` does: build, bind, run until a signal.

    The server is built inside the running loop: grpc.aio binds it to the loop it is made in.
    """
    host, port = create_server(config)
    log.info("listening", extra={"fields": {"port": port}})
    await host.run_until_signal()


def run_service(create_server: Callable[[Any], tuple[ServiceHost, int]],
                config_class: type[ServiceConfig]) -> None:
    """A service's `main()`: load its config (exiting on a bad one) and serve until a signal."""
    config = config_class.load()
    quiet_gc()
    asyncio.run(serve_forever(create_server, config))


#: The collector's young generation in a service process (`quiet_gc`).
GC_YOUNG_OBJECTS = 50_000


def quiet_gc() -> None:
    """Keep the garbage collector's full passes out of the request path.

    What is loaded at start (modules, protobuf descriptors: ~70,000 objects) lives as long as
    the process; frozen, full collections no longer scan it (tens of ms, in the middle of
    some fraud batch). And a burst (an event handed to ten thousand streams, a batch of a
    thousand votes) allocates objects that live until its writes complete: with CPython's
    default young generation (700 allocations) hundreds of young collections promote them,
    and the promoted objects soon trigger full collections over every stream's objects
    (pauses of 0.3-0.9 s, 2 s of a 14 s countdown window with 10,000 WatchShow streams,
    measured with gc.callbacks). With room for a burst they die young. Full collections still
    run when the survivors grow by a quarter (CPython's rule), so cyclic garbage is freed."""
    gc.freeze()
    gc.set_threshold(GC_YOUNG_OBJECTS, *gc.get_threshold()[1:])


