"""Show sync with two sync_svc replicas: rounds close exactly once and on time, whoever dies."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import psycopg
import pytest
import pytest_asyncio

from ops.stack import SERVICES, Stack, StackSettings
from runtime.access import Principal, Role
from televote.sync.v1 import show_watch_service_pb2 as watch
from tests.conftest import FAST_SHOW_ENV, redis_cluster_masters
from tests.sync_support import GrpcWatcher, Operator, seconds

#: The issue's bound for an automatic close; measured and printed, asserted with slack for a
#: noisy 2-core machine.
CLOSE_SLACK_MS = 1000


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def replicated(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    replicas = dict.fromkeys(SERVICES, 1) | {"sync_svc": 2}
    mesh = Stack(StackSettings(state_dir=tmp_path_factory.mktemp("replicated"), edge_port=0,
                               replicas=replicas, service_env=FAST_SHOW_ENV,
                               redis_cluster=redis_cluster_masters()))
    await mesh.start()
    try:
        yield mesh
    finally:
        await mesh.stop()


class DirectOperator(Operator):
    """An operator talking to one sync_svc replica directly, as the edge would forward them
    (the edge's certificate, so the claims header is believed)."""

    @property
    def metadata(self) -> Any:
        return Principal(Role.OPERATOR, "producer").to_metadata()


def _replica_channel(stack: Stack, replica: int) -> grpc.aio.Channel:
    return stack.channel("sync_svc", as_holder="edge",
                         replica_address=stack.addresses["sync_svc"][replica])


async def _open_round(operator: Operator, window_s: float) -> tuple[str, str]:
    episode_id, contestants = await operator.episode_with_contestants(2)
    round_ = (await operator.call("CreateRound", episode_id=episode_id,
                                  contestant_ids=contestants)).round
    await operator.call("StartShow", episode_id=episode_id)
    await operator.call("OpenVoting", round_id=round_.round_id, duration=seconds(window_s))
    return episode_id, round_.round_id


async def _close_record(stack: Stack, episode_id: str, round_id: str) -> tuple[int, float]:
    """How many VOTING_CLOSED events were recorded, and how late the close committed (ms)."""
    async with await psycopg.AsyncConnection.connect(stack.database_url) as connection:
        cursor = await connection.execute(
            "SELECT count(*), max(extract(epoch FROM e.recorded_at - r.lines_close_at) * 1000)"
            "  FROM show_events e JOIN rounds r ON r.round_id = %s"
            " WHERE e.episode_id = %s AND e.event_type = 'SHOW_EVENT_TYPE_VOTING_CLOSED'",
            (round_id, episode_id))
        row = await cursor.fetchone()
    assert row is not None
    return int(row[0]), float(row[1] or 0)


async def _wait_closed(stack: Stack, episode_id: str, round_id: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (await _close_record(stack, episode_id, round_id))[0]:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the round never closed")


async def test_auto_close_happens_once_on_time_and_reaches_watchers_of_both_replicas(
        replicated: Stack) -> None:
    async with _replica_channel(replicated, 0) as first, \
            _replica_channel(replicated, 1) as second:
        operator = DirectOperator(replicated, first)
        episode_id, contestants = await operator.episode_with_contestants(2)
        round_id = (await operator.call("CreateRound", episode_id=episode_id,
                                        contestant_ids=contestants)).round.round_id
        watchers = [GrpcWatcher().start(channel, episode_id) for channel in (first, second)]
        for watcher in watchers:
            await watcher.wait_for(watch.SHOW_EVENT_TYPE_SNAPSHOT)
        await operator.call("StartShow", episode_id=episode_id)
        await operator.call("OpenVoting", round_id=round_id, duration=seconds(3))
        # An event applied on replica 0 reaches the watcher on replica 1 through Redis.
        await watchers[1].wait_for(watch.SHOW_EVENT_TYPE_VOTING_OPEN)
        opened = next(e for e in watchers[1].events
                      if e.type == watch.SHOW_EVENT_TYPE_VOTING_OPEN)
        print(f"cross-replica fan-out: VOTING_OPEN arrived "
              f"{time.time() * 1000 - opened.server_time.ToMilliseconds():.0f} ms after the "
              "change began (includes the commit)")

        for watcher in watchers:
            await watcher.wait_for(watch.SHOW_EVENT_TYPE_VOTING_CLOSED, timeout=15)
        # Nothing more may happen: two close polls (SYNC_CLOSE_POLL_MS) of both replicas in
        # which a second, wrong announcement would show up.
        await asyncio.sleep(1)
        for watcher in watchers:
            await watcher.stop()
            assert watcher.types().count("VOTING_CLOSED") == 1
    count, late_ms = await _close_record(replicated, episode_id, round_id)
    print(f"auto-close committed {late_ms:.1f} ms after the lines closed")
    assert count == 1
    assert late_ms < CLOSE_SLACK_MS


async def test_the_round_closes_on_time_when_the_replica_that_opened_it_is_killed(
        replicated: Stack) -> None:
    async with _replica_channel(replicated, 0) as first:
        episode_id, round_id = await _open_round(DirectOperator(replicated, first), 3)
    await replicated.kill("sync_svc", 0)
    try:
        await _wait_closed(replicated, episode_id, round_id, timeout=15)
        count, late_ms = await _close_record(replicated, episode_id, round_id)
        print(f"closed by the surviving replica {late_ms:.1f} ms after the lines closed")
        assert count == 1
        assert late_ms < CLOSE_SLACK_MS
    finally:
        await replicated.restart("sync_svc", 0)


async def test_the_round_closes_once_after_every_sync_replica_restarts(
        replicated: Stack) -> None:
    async with _replica_channel(replicated, 1) as second:
        episode_id, round_id = await _open_round(DirectOperator(replicated, second), 2)
    await replicated.kill("sync_svc", 0)
    await replicated.kill("sync_svc", 1)
    await asyncio.sleep(3)  # the close passes while no sync_svc runs
    assert (await _close_record(replicated, episode_id, round_id))[0] == 0
    await asyncio.gather(replicated.restart("sync_svc", 0), replicated.restart("sync_svc", 1))
    await _wait_closed(replicated, episode_id, round_id, timeout=15)
    await asyncio.sleep(1)  # two close polls of both replicas: a second close would be in
    assert (await _close_record(replicated, episode_id, round_id))[0] == 1
