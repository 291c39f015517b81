"""The hub's promises to watchers, on their own: bounded queues and resync for slow clients."""

from __future__ import annotations

import asyncio

from sync_svc.hub import Feed, Watcher
from televote.sync.v1 import show_watch_service_pb2 as watch
from televote.sync.v1 import sync_types_pb2 as types


def _event(version: int) -> watch.WatchShowResponse:
    return watch.WatchShowResponse(type=watch.SHOW_EVENT_TYPE_STATE_CHANGED,
                                   episode_version=version, state=types.SHOW_STATE_LIVE)


def test_a_watcher_that_falls_behind_gets_a_snapshot_instead_of_a_growing_backlog() -> None:
    slow, fast = Watcher(asyncio.Queue(maxsize=4)), Watcher(asyncio.Queue(maxsize=1000))
    for version in range(1, 101):
        for watcher in (slow, fast):
            watcher.offer(_event(version))
        if fast.queue.qsize():
            fast.queue.get_nowait()  # the fast client keeps up
    assert slow.stale
    assert slow.queue.qsize() == 1  # never more than its bound; just "resync"
    assert slow.queue.get_nowait().type == watch.SHOW_EVENT_TYPE_SNAPSHOT
    assert not fast.stale


def test_the_feed_follows_the_open_round_and_ignores_older_news() -> None:
    feed = Feed("episode")
    opened = types.Round(round_id="r", state=types.ROUND_STATE_OPEN)
    feed.follow(5, watch.SHOW_EVENT_TYPE_VOTING_OPEN, opened)
    assert feed.open_round == opened
    feed.follow(4, watch.SHOW_EVENT_TYPE_VOTING_CLOSED, None)  # stale: older than what it has
    assert feed.open_round == opened
    feed.follow(6, watch.SHOW_EVENT_TYPE_VOTING_CLOSED, None)
    assert feed.open_round is None
