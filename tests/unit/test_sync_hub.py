"""The hub's promises to watchers, on their own: bounded queues and resync for slow clients."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from runtime import fanout
from runtime.errors import ApiError
from sync_svc.config import SyncConfig
from sync_svc.hub import Feed, Frame, Hub
from televote.sync.v1 import show_watch_service_pb2 as watch
from televote.sync.v1 import sync_types_pb2 as types


def _event(version: int) -> watch.WatchShowResponse:
    return watch.WatchShowResponse(type=watch.SHOW_EVENT_TYPE_STATE_CHANGED,
                                   episode_version=version, state=types.SHOW_STATE_LIVE)


async def test_a_watcher_that_falls_behind_gets_a_snapshot_instead_of_a_growing_backlog(
        ) -> None:
    slow: fanout.Bounded[Frame] = fanout.Bounded(4)
    fast: fanout.Bounded[Frame] = fanout.Bounded(1000)
    for version in range(1, 101):
        for watcher in (slow, fast):
            watcher.offer(Frame.of(_event(version)))
        if len(fast):
            await fast.take()  # the fast client keeps up
    assert slow.stale
    assert len(slow) == 1  # never more than its bound; just "resync"
    assert await slow.take() is fanout.RESYNC
    assert not fast.stale
    slow.offer(Frame.of(_event(101)))  # after the resync, events queue again
    assert (await slow.take()).version == 101


async def test_a_draining_server_ends_every_stream_and_refuses_new_ones() -> None:
    streams = fanout.Streams()
    waiting: fanout.Bounded[Frame] = fanout.Bounded(4)
    latest: fanout.Latest[int] = fanout.Latest()
    streams.open(waiting)
    streams.open(latest)
    reader = asyncio.create_task(waiting.take())
    await asyncio.sleep(0)
    streams.end()
    for pending in (reader, latest.take()):
        with pytest.raises(ApiError) as ended:
            await pending
        assert ended.value.code == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(ApiError):
        streams.open(fanout.Latest())


def test_a_shared_event_with_a_sequence_in_front_parses_as_the_numbered_event() -> None:
    event = _event(7)
    body = Frame.of(event).body
    for sequence in (1, 127, 128, 300, 2**40):
        numbered = watch.WatchShowResponse.FromString(fanout.sequence_prefix(sequence) + body)
        assert numbered.sequence == sequence
        event.sequence = sequence
        assert numbered == event


def test_the_feed_follows_the_open_round_and_ignores_older_news() -> None:
    feed = Feed("episode")
    opened = types.Round(round_id="r", state=types.ROUND_STATE_OPEN)
    feed.follow(5, watch.SHOW_EVENT_TYPE_VOTING_OPEN, opened)
    assert feed.open_round == opened
    feed.follow(4, watch.SHOW_EVENT_TYPE_VOTING_CLOSED, None)  # stale: older than what it has
    assert feed.open_round == opened
    feed.follow(6, watch.SHOW_EVENT_TYPE_VOTING_CLOSED, None)
    assert feed.open_round is None


class _CountingStore:
    """Stands in for ShowStore.episode_finished (PostgreSQL) to count how often it is asked."""

    def __init__(self) -> None:
        self.asked = 0

    async def episode_finished(self, episode_id: str) -> bool:
        self.asked += 1
        await asyncio.sleep(0.01)  # a query takes a while: the other callers arrive meanwhile
        return True


async def test_whether_the_show_finished_is_asked_once_per_event_for_all_watchers() -> None:
    store = _CountingStore()
    hub = Hub(None, store, SyncConfig(database_url="unused", redis_url="unused"))  # type: ignore[arg-type]
    feed = Feed("episode")
    assert all(await asyncio.gather(*(hub._finished(feed, 12) for _ in range(1000))))
    assert store.asked == 1  # ten thousand watchers would otherwise ask PostgreSQL each
    assert await hub._finished(feed, 13)  # a later event is asked about again
    assert store.asked == 2

