"""The shared runtime on its own: config, errors, access, graceful shutdown."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, ClassVar

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from ops.processes import free_port, wait_serving
from runtime.access import Principal, Role, allowed
from runtime.coalesce import Coalescer
from runtime.config import ConfigError, ServiceConfig
from runtime.errors import ApiError, FieldViolation, invalid_argument
from tests.slow_service import SLEEP_METHOD

REPO = Path(__file__).resolve().parents[2]


class _Config(ServiceConfig):
    service_name: ClassVar[str] = "config_test"
    round_seconds: int = 1800


def test_config_names_the_missing_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("REDIS_URL", "redis://localhost:1/0")
    with pytest.raises(ConfigError, match="DATABASE_URL"):
        _Config.load()


def test_config_names_the_malformed_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://x/y")
    monkeypatch.setenv("REDIS_URL", "redis://localhost:1/0")
    monkeypatch.setenv("ROUND_SECONDS", "thirty")
    with pytest.raises(ConfigError, match="ROUND_SECONDS"):
        _Config.load()


def test_config_is_frozen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://x/y")
    monkeypatch.setenv("REDIS_URL", "redis://localhost:1/0")
    config = _Config.load()
    assert config.round_seconds == 1800
    with pytest.raises(Exception, match="frozen"):
        config.round_seconds = 5  # type: ignore[misc]


def test_config_reads_secrets_from_files_named_after_their_variables(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A Kubernetes Secret mounted as files (deploy/): the value comes from the file, and the
    environment still wins where it says something."""
    (tmp_path / "DATABASE_URL").write_text("postgresql://svc:s3cret@db/televote\n")
    (tmp_path / "REDIS_URL").write_text("redis://svc:pw@redis:6379/0")
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("REDIS_URL", "redis://from-env:1/0")
    monkeypatch.setenv("TELEVOTE_SECRETS_DIR", str(tmp_path))
    config = _Config.load()
    assert config.database_url == "postgresql://svc:s3cret@db/televote"
    assert config.redis_url == "redis://from-env:1/0"


def test_api_error_carries_one_error_info_and_bad_request() -> None:
    error = invalid_argument(FieldViolation("count", "must be 1..100"))
    status = rpc_status.to_status  # noqa: F841 - the helper under test builds a grpc.Status
    built = error.to_status()
    assert built.code == grpc.StatusCode.INVALID_ARGUMENT
    details = dict(built.trailing_metadata)["grpc-status-details-bin"]
    from google.rpc import status_pb2

    decoded = status_pb2.Status.FromString(details)
    infos = [d for d in decoded.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    assert len(infos) == 1
    info = error_details_pb2.ErrorInfo()
    infos[0].Unpack(info)
    assert (info.reason, info.domain) == ("INVALID_REQUEST", "televote")
    bad = error_details_pb2.BadRequest()
    next(d for d in decoded.details if d.Is(bad.DESCRIPTOR)).Unpack(bad)
    assert bad.field_violations[0].field == "count"


def test_retry_info_is_attached_for_rate_limits() -> None:
    from google.rpc import status_pb2

    error = ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED", "slow down",
                     retry_after_seconds=1.5)
    decoded = status_pb2.Status.FromString(
        dict(error.to_status().trailing_metadata)["grpc-status-details-bin"])
    retry = error_details_pb2.RetryInfo()
    next(d for d in decoded.details if d.Is(retry.DESCRIPTOR)).Unpack(retry)
    assert retry.retry_delay.ToMilliseconds() == 1500


def test_principal_round_trips_through_metadata() -> None:
    principal = Principal(Role.VOTER, "user-42")
    assert Principal.from_metadata(dict(principal.to_metadata())) == principal
    assert Principal.from_metadata({"x-jwt-payload": "not-base64-json"}).role is Role.ANONYMOUS


def test_access_table() -> None:
    assert allowed("televote.sync.v1.ShowControlService", Role.OPERATOR)
    assert not allowed("televote.sync.v1.ShowControlService", Role.VOTER)
    assert allowed("televote.sync.v1.ShowWatchService", Role.ANONYMOUS)
    assert not allowed("televote.fraud.v1.FraudScoringService", Role.OPERATOR)
    assert allowed("televote.fraud.v1.FraudScoringService", Role.INTERNAL)
    assert not allowed("televote.unknown.v1.Whatever", Role.OPERATOR)


async def _logged(stream: asyncio.StreamReader, message: str) -> None:
    """Read a service's JSON log lines until one says `message`."""
    async with asyncio.timeout(10):
        while line := await stream.readline():
            if line.startswith(b"{") and json.loads(line)["message"] == message:
                return
    raise AssertionError(f"the service ended without logging {message!r}")


async def test_sigterm_drains_an_in_flight_rpc_before_exit() -> None:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.slow_service", cwd=REPO,
        env={**os.environ, "TELEVOTE_PORT": str(port), "TELEVOTE_GRACE_SECONDS": "10"},
        stderr=asyncio.subprocess.PIPE)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await wait_serving(f"127.0.0.1:{port}", timeout=10)
            health = health_pb2_grpc.HealthStub(channel)
            sleep = channel.unary_unary(SLEEP_METHOD)
            in_flight = asyncio.ensure_future(sleep(b"1.5", timeout=10))
            assert process.stderr is not None
            await _logged(process.stderr, "sleeping")  # the call is in the server
            watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=10)
            process.send_signal(signal.SIGTERM)
            async for status in watch:
                if status.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
            watch.cancel()
            # Draining: no longer SERVING, yet the call already in flight completes.
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert process.returncode is None
            assert await in_flight == b"slept 1.5"
        assert await asyncio.wait_for(process.wait(), 10) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_probes_reach_health_on_a_plaintext_port_beside_the_mesh_port(
        tmp_path: Path) -> None:
    """Kubernetes' grpc probes present no certificate: a replica in the mesh answers them on
    TELEVOTE_HEALTH_PORT, which serves health and nothing else, while its mesh port still
    refuses a caller without a certificate."""
    from ops import pki
    from runtime.server import LIVENESS_SERVICE
    from tests.slow_service import SlowConfig, create_server

    tls_dir = tmp_path / "tls"
    pki.issue(tmp_path, "vote_svc", tls_dir)
    health_port = free_port()
    host, port = create_server(SlowConfig(televote_tls_dir=tls_dir,
                                          televote_health_port=health_port,
                                          televote_drain_announce_seconds=0))
    await host.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as probe:
            health = health_pb2_grpc.HealthStub(probe)
            for service in ("", LIVENESS_SERVICE):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service),
                                           timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await probe.unary_unary(SLEEP_METHOD)(b"0", timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as plaintext:
            with pytest.raises(grpc.aio.AioRpcError) as no_certificate:
                await health_pb2_grpc.HealthStub(plaintext).Check(
                    health_pb2.HealthCheckRequest(), timeout=5)
            assert no_certificate.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await host.stop()


async def test_a_mesh_channel_spreads_calls_over_every_replica() -> None:
    """A target naming several replicas (or a DNS name with several addresses) gets calls on
    each, not all on the first (grpc's default pick_first)."""
    from runtime import mesh
    from tests.slow_service import SlowConfig, create_server

    hosts = [create_server(SlowConfig(televote_drain_announce_seconds=0)) for _ in range(2)]
    answered: list[str] = []
    for host, port in hosts:
        async def which(request: bytes, context: Any, port: int = port) -> bytes:
            answered.append(str(port))
            return b""
        host.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "test.Slow", {"Port": grpc.unary_unary_rpc_method_handler(which)}),))
        await host.start()
    try:
        target = "ipv4:" + ",".join(f"127.0.0.1:{port}" for _, port in hosts)
        async with mesh.channel(target, "slow_test_svc", None) as channel:
            for _ in range(10):
                await channel.unary_unary("/test.Slow/Port")(b"", timeout=5)
        assert set(answered) == {str(port) for _, port in hosts}
    finally:
        for host, _ in hosts:
            await host.stop()


async def test_calls_are_traced_and_logs_carry_the_trace_id() -> None:
    """OTEL_TRACES_EXPORTER switches export on; here the console exporter prints the spans."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.slow_service", cwd=REPO,
        env={**os.environ, "TELEVOTE_PORT": str(port), "OTEL_TRACES_EXPORTER": "console",
             "TELEVOTE_DRAIN_ANNOUNCE_SECONDS": "0"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await wait_serving(f"127.0.0.1:{port}", timeout=10)
            assert await channel.unary_unary(SLEEP_METHOD)(b"0", timeout=5) == b"slept 0"
        process.send_signal(signal.SIGTERM)
        stdout, stderr = await asyncio.wait_for(process.communicate(), 15)
    finally:
        if process.returncode is None:
            process.kill()
    spans = stdout.decode()
    assert f"\"name\": \"{SLEEP_METHOD.lstrip('/')}\"" in spans
    logs = [json.loads(line) for line in stderr.decode().splitlines() if line.startswith("{")]
    slept = next(entry for entry in logs if entry["message"] == "slept")
    assert slept["service"] == "slow_test_svc"
    assert slept["trace_id"] in spans.replace("0x", "")


def test_every_service_keeps_full_garbage_collections_out_of_its_requests(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Frozen startup objects and a young generation sized for a burst (runtime.server)."""
    import gc

    from runtime import server

    seen: list[tuple[int, int]] = []

    def serve(coroutine: Any) -> None:
        coroutine.close()
        seen.append((gc.get_freeze_count(), gc.get_threshold()[0]))

    monkeypatch.setattr(server.asyncio, "run", serve)
    monkeypatch.setenv("DATABASE_URL", "postgresql://unused")
    monkeypatch.setenv("REDIS_URL", "redis://unused")
    before = gc.get_threshold()
    gc.unfreeze()
    try:
        server.run_service(lambda config: (None, 0), ServiceConfig)  # type: ignore[arg-type,return-value]
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
    assert seen and seen[0][0] > 10_000 and seen[0][1] == server.GC_YOUNG_OBJECTS


async def test_coalescer_sends_concurrent_requests_as_one_batch_and_answers_each() -> None:
    batches: list[list[int]] = []

    async def run(items: list[int]) -> list[int | BaseException]:
        batches.append(items)
        return [ValueError(item) if item < 0 else item * 10 for item in items]

    coalescer: Coalescer[int, int] = Coalescer(run)
    first = [coalescer.submit(item) for item in (1, -2, 3)]
    results = await asyncio.gather(*first, return_exceptions=True)
    assert batches == [[1, -2, 3]]
    assert results[0] == 10 and results[2] == 30
    assert isinstance(results[1], ValueError)  # only that caller's request failed

    # A request that may wait rides along with the next urgent one ...
    patient = coalescer.submit(4, wait_ms=10_000)
    await asyncio.sleep(0.01)  # time in which a wrongly urgent batch would leave
    assert len(batches) == 1 and not patient.done()
    assert await coalescer.submit(5) == 50
    assert await patient == 40
    assert batches[1] == [4, 5]
    # ... and leaves on its own once its time is up.
    assert await asyncio.wait_for(coalescer.submit(6, wait_ms=20), 1) == 60
    assert batches[2] == [6]


async def test_a_full_batch_leaves_at_once() -> None:
    batches: list[list[int]] = []

    async def run(items: list[int]) -> list[int | BaseException]:
        batches.append(items)
        return items

    coalescer: Coalescer[int, int] = Coalescer(run, max_batch=2)
    replies = await asyncio.wait_for(asyncio.gather(
        *(coalescer.submit(item, wait_ms=60_000) for item in range(4))), 1)
    assert replies == [0, 1, 2, 3]
    assert batches == [[0, 1], [2, 3]]


async def test_with_max_inflight_a_batch_gathers_while_one_is_out() -> None:
    batches: list[list[int]] = []
    release = asyncio.Event()

    async def run(items: list[int]) -> list[int | BaseException]:
        batches.append(items)
        if len(batches) == 1:
            await release.wait()
        return [item * 10 for item in items]

    coalescer: Coalescer[int, int] = Coalescer(run, max_inflight=1)
    first = coalescer.submit(1)
    await asyncio.sleep(0.01)
    assert batches == [[1]]  # nothing out: it left at once
    later = [coalescer.submit(item) for item in (2, 3)]
    await asyncio.sleep(0.01)
    more = coalescer.submit(4, wait_ms=60_000)  # held with the others, not on its timer
    await asyncio.sleep(0.01)
    assert batches == [[1]] and not any(future.done() for future in [*later, more])
    release.set()  # the first returns: everything queued meanwhile leaves as one batch
    assert await asyncio.wait_for(asyncio.gather(first, *later, more), 1) == [10, 20, 30, 40]
    assert batches == [[1], [2, 3, 4]]
    # Nothing out any more: a request leaves at once again.
    assert await asyncio.wait_for(coalescer.submit(5), 1) == 50
    assert batches[2] == [5]


async def test_a_batch_held_past_full_leaves_in_full_batches() -> None:
    batches: list[list[int]] = []
    release = asyncio.Event()

    async def run(items: list[int]) -> list[int | BaseException]:
        batches.append(items)
        await release.wait()
        return items

    coalescer: Coalescer[int, int] = Coalescer(run, max_batch=2, max_inflight=1)
    replies = [coalescer.submit(item) for item in range(5)]
    await asyncio.sleep(0.01)
    assert batches == [[0, 1]]
    release.set()
    assert await asyncio.wait_for(asyncio.gather(*replies), 1) == [0, 1, 2, 3, 4]
    assert batches == [[0, 1], [2, 3], [4]]


async def test_many_items_under_one_future_share_batches_with_single_callers() -> None:
    batches: list[list[int]] = []

    async def run(items: list[int]) -> list[int | BaseException]:
        batches.append(items)
        if 99 in items:
            raise ConnectionError("down")
        return [ValueError(item) if item < 0 else item * 10 for item in items]

    coalescer: Coalescer[int, int] = Coalescer(run, max_batch=3)
    single = coalescer.submit(1, wait_ms=60_000)
    many = coalescer.submit_many([2, -3, 4, 5], wait_ms=20)
    replies = await asyncio.wait_for(many, 1)
    assert await single == 10
    # A full batch leaves at once, the rest within the wait asked for.
    assert batches == [[1, 2, -3], [4, 5]]
    assert replies[0] == 20 and replies[2] == 40 and replies[3] == 50
    assert isinstance(replies[1], ValueError)  # that item's own failure, the others answered
    assert await coalescer.submit_many([]) == []
    # A batch that raised fails each of its items, in place.
    failed = await asyncio.wait_for(coalescer.submit_many([98, 99]), 1)
    assert all(isinstance(reply, ConnectionError) for reply in failed)


async def test_coalescer_fails_every_caller_of_a_batch_that_raised() -> None:
    async def run(items: list[int]) -> list[int | BaseException]:
        raise ConnectionError("down")

    coalescer: Coalescer[int, int] = Coalescer(run)
    results = await asyncio.gather(coalescer.submit(1), coalescer.submit(2),
                                   return_exceptions=True)
    assert all(isinstance(result, ConnectionError) for result in results)


def test_free_ports_lie_below_the_kernels_ephemeral_range_and_are_never_handed_out_twice() -> None:
    # An outgoing connection takes its local port from the ephemeral range: a listening port
    # chosen there can be taken between the probe and the server's bind (CI saw Envoy fail so).
    ephemeral_from = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(10000 <= port < ephemeral_from for port in ports)
    with_bus = free_port(also_free_at=10000)
    assert with_bus + 10000 < ephemeral_from
