"""Fixtures shared by every test: the real mesh, started once per session.

`stack` is the same code path as `televote up`: PostgreSQL and Redis from their wheels (or the
servers named by TELEVOTE_TEST_DATABASE_URL / TELEVOTE_TEST_REDIS_URL; a Redis Cluster of N
masters with TELEVOTE_TEST_REDIS_CLUSTER=N), migrations, every service as its own process,
Envoy in front. Later issues' tests take `stack` and call through
`stack.edge_target` (native gRPC), `stack.edge_url` (JSON, gRPC-Web) or a service directly.

Tests live by what they need: tests/unit (no stack), tests/integration (real grpc.aio servers
against real PostgreSQL and Redis), tests/e2e (through Envoy, the whole mesh). The `stack`
marker is not written by hand: it is set here from the fixtures a test uses, so
`pytest -m "not stack"` and `pytest tests/unit` start nothing.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from fakestores import FakeAppStore, FakePlayStore, stack_environment
from ops import tokens
from ops.stack import Stack, StackSettings
from runtime.access import Role

#: Real durations are minutes; tests run a whole show in seconds. Ticks: TIME_UPDATE every 4 s,
#: WARNING at 6 s, COUNTDOWN from 3; windows may be as short as 1 s.
FAST_SHOW_ENV = {
    "TELEVOTE_GRACE_SECONDS": "2",
    "TELEVOTE_DRAIN_ANNOUNCE_SECONDS": "0.2",
    "SYNC_MIN_WINDOW_MS": "1000",
    "SYNC_TIME_UPDATE_EVERY_S": "4",
    "SYNC_WARNING_AT_S": "6",
    "SYNC_COUNTDOWN_FROM_S": "3",
    "SYNC_CLOSE_POLL_MS": "500",
    # Receipt proofs come from blocks of leaves: small blocks, so tests cross block edges.
    "RESULTS_RECEIPT_BLOCK_LEAVES": "4",
    # The report: small audiences in tests, and provisional reports as fresh as the ledger.
    "RESULTS_REPORT_MIN_VOTERS": "3",
    "RESULTS_REPORT_PROVISIONAL_MS": "0",
    "RESULTS_REPORT_PRECOMPUTE_MS": "300",
    "RESULTS_REPORT_ROLLUP_MS": "300",
    # Viewer samples often enough for a test to see one.
    "SYNC_VIEWER_SAMPLE_MS": "500",
    # A killed sms_svc's messages are taken over by a carrier's redelivery after 2 s, not 10.
    "SMS_PROCESSING_LEASE_MS": "2000",
    # Each SMS test binds 1255 to a show of its own, one right after the other.
    "SMS_BINDING_CACHE_MS": "0",
    # A store slower than this is unavailable; tests make the stand-in slower on purpose.
    "VOTE_STORE_TIMEOUT_MS": "1500",
}


TESTS = Path(__file__).resolve().parent
#: Folders whose tests run our services (some start their own, e.g. `televote up`).
SERVICE_TIERS = (TESTS / "integration", TESTS / "e2e")


#: What CI runs again on a Redis Cluster (TELEVOTE_TEST_REDIS_CLUSTER=3, `-m redis_cluster`):
#: the vote path's invariants, fraud, results, the load test's verifier, the services' Redis
#: users and a master's failover. Node id prefixes.
REDIS_CLUSTER_TESTS = (
    "tests/integration/test_vote_concurrency.py",
    "tests/integration/test_vote_ledger.py",
    "tests/e2e/test_close_race.py",
    "tests/integration/test_fraud.py",
    "tests/e2e/test_vote_fraud.py",
    "tests/e2e/test_results.py",
    "tests/e2e/test_loadtest.py::test_compressed_seed_scenario_passes_end_to_end",
    "tests/integration/test_least_privilege.py::"
    "test_each_service_has_its_own_redis_user_without_admin_commands",
    "tests/e2e/test_redis_failover.py",
    # Show events reach the watchers of every sync_svc replica through Redis pub/sub.
    "tests/integration/test_sync_replicas.py::"
    "test_auto_close_happens_once_on_time_and_reaches_watchers_of_both_replicas",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that needs running services `stack`: it takes the `stack` fixture
    (`fixturenames` is the closure, so fixtures built on `stack` count) or lives in a service
    tier. A unit test that reaches for the stack is a collection error, not a slow unit run."""
    for item in items:
        uses_stack = "stack" in getattr(item, "fixturenames", ())
        if uses_stack and (TESTS / "unit") in item.path.parents:
            raise pytest.UsageError(f"{item.nodeid} uses the stack: it belongs in "
                                    "tests/integration or tests/e2e, not tests/unit")
        if uses_stack or any(tier in item.path.parents for tier in SERVICE_TIERS):
            item.add_marker(pytest.mark.stack)
        if item.nodeid.startswith(REDIS_CLUSTER_TESTS):
            item.add_marker(pytest.mark.redis_cluster)


def redis_cluster_masters() -> int:
    """TELEVOTE_TEST_REDIS_CLUSTER=3: the tests' meshes run on a Redis Cluster of 3 masters
    with a replica each (ops/redis_cluster.py); `-m redis_cluster` picks the tests CI runs
    so. 0: one Redis."""
    return int(os.environ.get("TELEVOTE_TEST_REDIS_CLUSTER") or 0)


@dataclass(frozen=True)
class FakeStores:
    """The app stores the session's mesh sells through (fakestores/)."""

    apple: FakeAppStore
    google: FakePlayStore


@pytest.fixture(scope="session")
def fake_stores() -> Iterator[FakeStores]:
    # Apple with its OCSP responder: vote_svc verifies with online checks on, as in production.
    stores = FakeStores(FakeAppStore(ocsp=True), FakePlayStore())
    yield stores
    stores.apple.close()
    stores.google.close()


@pytest_asyncio.fixture(scope="session")
async def stack(tmp_path_factory: pytest.TempPathFactory, fake_stores: FakeStores,
                ) -> AsyncIterator[Stack]:
    state_dir = tmp_path_factory.mktemp("televote-state")
    settings = StackSettings(
        state_dir=state_dir,
        edge_port=0,
        database_url=os.environ.get("TELEVOTE_TEST_DATABASE_URL"),
        redis_url=os.environ.get("TELEVOTE_TEST_REDIS_URL"),
        redis_cluster=redis_cluster_masters(),
        service_env={**FAST_SHOW_ENV, **stack_environment(
            fake_stores.apple, fake_stores.google, state_dir / "stores")},
        # The SMS tests go through a real Kannel; it is installed where the suite runs
        # (scripts/install), so its tests never skip.
        kannel=True,
    )
    mesh = Stack(settings)
    await mesh.start()
    try:
        yield mesh
    finally:
        await mesh.stop()


def bearer(state_dir: Path, role: Role, subject: str) -> tuple[tuple[str, str]]:
    """gRPC call metadata carrying a token the edge accepts."""
    return (("authorization", f"Bearer {tokens.mint(state_dir, role, subject)}"),)


@pytest_asyncio.fixture(scope="session")
async def edge_channel(stack: Stack) -> AsyncIterator[grpc.aio.Channel]:
    """A native gRPC channel to the edge."""
    async with grpc.aio.insecure_channel(stack.edge_target) as channel:
        yield channel
