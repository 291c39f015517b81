"""A Redis Cluster master killed during a load test (run with TELEVOTE_TEST_REDIS_CLUSTER=3,
see tests/conftest.py; skipped on a single Redis).

Its replica is promoted, every acknowledged vote is in the ledger, admission recovers (what a
client sees meanwhile: vote_svc/README.md, "Redis Cluster failover"), and the load test's
verifier passes: the final result equals a recount of the ledger.
"""

from __future__ import annotations

import asyncio
import time

import psycopg
import pytest

from loadtest.funding import StoreFunding
from loadtest.plan import LoadConfig
from loadtest.run import Target, run
from loadtest.transports import ERROR, OK
from ops.stack import Stack
from tests.conftest import FakeStores


async def _votes_since(database_url: str, since_ms: int) -> int:
    async with await psycopg.AsyncConnection.connect(database_url) as connection:
        cursor = await connection.execute(
            "SELECT count(*) FROM votes WHERE admitted_ms >= %s", (since_ms,))
        row = await cursor.fetchone()
        return int(row[0]) if row else 0


async def test_a_master_killed_during_a_load_test_loses_no_acknowledged_vote(
        stack: Stack, fake_stores: FakeStores, tmp_path_factory: pytest.TempPathFactory,
) -> None:
    cluster = stack.redis_nodes
    if cluster is None:
        pytest.skip("the stack runs one Redis (set TELEVOTE_TEST_REDIS_CLUSTER=3)")
    # Not the seed node: a process that starts later finds the cluster through it.
    victim = next(node for node in cluster.masters_now() if node is not cluster.nodes[0])
    # 60 voters x 10 votes over a 20 s window (600 show seconds at 30x), retried on errors
    # with the same request id, as an app does: the failover falls inside the window.
    config = LoadConfig(scenario="retries", users=60, votes_per_user=10, window_s=600,
                        compress=30)
    started_ms = int(time.time() * 1000)
    load = asyncio.create_task(run(
        config, Target.of(stack, own=False), tmp_path_factory.mktemp("failover"), workers=2,
        live=False, log=lambda _: None,
        stores=StoreFunding(fake_stores.apple, fake_stores.google, 0.34)))
    try:
        while await _votes_since(stack.database_url, started_ms) < 50:
            assert not load.done(), "the load test ended before votes reached the ledger"
            await asyncio.sleep(0.2)
        killed_at = time.time()
        await cluster.kill(victim)
        took = await cluster.wait_healthy()
        healthy_at = time.time()
        assert victim not in cluster.masters_now()
        assert len(cluster.masters_now()) == cluster.masters  # its replica took over
        result = await load
    finally:
        if not load.done():
            load.cancel()
        # The old master rejoins as a replica, so the next tests find a whole cluster.
        await cluster.restart(victim)
        await cluster.wait_healthy()

    errors = [attempt for attempt in result.attempts if attempt.outcome == ERROR]
    print(f"failover: replica promoted {took:.1f}s after kill -9; of "
          f"{len(result.attempts)} attempts {len(errors)} errors, sent at (s after the kill) "
          + ", ".join(f"{attempt.sent - killed_at:+.1f} {attempt.reason}"
                      for attempt in sorted(errors, key=lambda attempt: attempt.sent)))
    assert result.verdict.ok, result.verdict.failures
    verification = result.figures["verification"]
    assert verification["acknowledged"] > 0
    assert sum(verification["final_counts"].values()) == verification["ledger_rows"]
    # Admission came back: votes sent after the cluster was whole again were acknowledged.
    assert any(attempt.outcome == OK and attempt.sent >= healthy_at
               for attempt in result.attempts)
