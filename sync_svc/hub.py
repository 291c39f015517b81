"""Fan-out of show events to every watcher, on every replica.

A change committed on any replica is published once to Redis (`keys.show_channel`); each
replica holds one pattern subscription and hands each event to the watchers of that episode
it serves. Countdown ticks are not published at all: every replica derives them from the open
round's close time and the Redis server clock, so all watchers see the same ticks at the same
moments without any cross-replica traffic.

A watcher that falls behind never holds up the others and never grows an unbounded queue:
when its queue is full it is marked stale, its backlog is dropped, and it is sent a fresh
snapshot instead (the same thing a reconnecting client gets).

Every event is serialized once for all watchers (the published bytes as they came from Redis,
each tick once): a watcher's message is its sequence in front of those bytes
(runtime/fanout.py, the same fan-out StreamResults uses). A watcher that sees an episode
version skip (an event published out of order, or replayed later from show.py's outbox) is
sent a snapshot; events it already has are dropped by version, so a replay is harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass, field

from google.protobuf.timestamp_pb2 import Timestamp

from runtime import fanout, keys
from runtime.protoconv import datetime_to_ms, duration, ms_to_datetime, timestamp
from runtime.storage import Storage
from sync_svc.config import SyncConfig
from sync_svc.show import ShowStore
from televote.sync.v1 import show_watch_service_pb2 as watch
from televote.sync.v1 import sync_types_pb2 as types

log = logging.getLogger(__name__)

Event = watch.WatchShowResponse
EventType = watch.ShowEventType
_PATTERN = keys.show_channel("*")


@dataclass(frozen=True, slots=True)
class Frame:
    """A show event as every watcher receives it: serialized once, without a sequence."""

    body: bytes
    type: int
    #: The episode version the event brings (0 for ticks, which change no state).
    version: int
    #: After it a watcher's stream may end (if the episode has nothing more to announce).
    may_end: bool = False

    @classmethod
    def of(cls, event: Event, body: bytes | None = None) -> Frame:
        """`event` as watchers get it; `body` when it is serialized already."""
        may_end = event.type == EventType.SHOW_EVENT_TYPE_RESULTS_READY or (
            event.type == EventType.SHOW_EVENT_TYPE_STATE_CHANGED
            and event.state == types.SHOW_STATE_ENDED)
        return cls(event.SerializeToString() if body is None else body, event.type,
                   event.episode_version, may_end)


@dataclass
class Feed:
    """The watchers of one episode on this replica, and the timing their ticks follow."""

    episode_id: str
    watchers: fanout.Topic[Frame] = field(default_factory=fanout.Topic)
    version: int = 0
    open_round: types.Round | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    ticker: asyncio.Task[None] | None = None
    #: The last snapshot read, shared by the watchers that join before the next change: a
    #: burst of viewers tuning in costs one read of PostgreSQL, not one each.
    snapshot: types.ShowSnapshot | None = None
    snapshot_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: Whether the show had finished as of an event's version, asked once for all watchers.
    finished: tuple[int, asyncio.Task[bool]] | None = None

    def follow(self, version: int, event_type: int, round_: types.Round | None) -> None:
        """Track the open round from the snapshot or events so ticks follow the real close."""
        if version < self.version:
            return
        self.version = version
        if event_type in (EventType.SHOW_EVENT_TYPE_VOTING_OPEN,
                          EventType.SHOW_EVENT_TYPE_VOTING_EXTENDED,
                          EventType.SHOW_EVENT_TYPE_SNAPSHOT):
            self.open_round = (round_ if round_ is not None
                               and round_.state == types.ROUND_STATE_OPEN else None)
        elif event_type == EventType.SHOW_EVENT_TYPE_VOTING_CLOSED:
            self.open_round = None
        self.changed.set()


class Hub:
    """Receives show events from Redis and feeds this replica's watchers."""

    def __init__(self, storage: Storage, store: ShowStore, config: SyncConfig,
                 streams: fanout.Streams | None = None) -> None:
        self.streams = streams if streams is not None else fanout.Streams()
        self._storage = storage
        self._store = store
        self._config = config
        self._feeds: dict[str, Feed] = {}
        self._listener: asyncio.Task[None] | None = None
        self._sampler: asyncio.Task[None] | None = None
        self._clock_offset_ms = 0.0  # Redis clock minus this host's clock
        self._subscribed = asyncio.Event()
        self.on_round_change: list[asyncio.Event] = []  # poked when a window opens or moves

    async def start(self) -> None:
        await self._sync_clock()
        self._listener = asyncio.create_task(self._listen(), name="show-events")
        if self._config.sync_viewer_sample_ms > 0:
            self._sampler = asyncio.create_task(self._sample_viewers(), name="viewer-samples")
        await asyncio.wait_for(self._subscribed.wait(), 10)

    async def stop(self) -> None:
        for feed in self._feeds.values():
            feed.watchers.stop()
        tickers = [feed.ticker for feed in self._feeds.values()]
        for task in [self._listener, self._sampler, *tickers]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    # -- receiving -------------------------------------------------------------------------

    async def _listen(self) -> None:
        while True:
            try:
                pubsub = self._storage.redis.pubsub()
                await pubsub.psubscribe(_PATTERN)
                self._subscribed.set()
                async for message in pubsub.listen():
                    if message["type"] == "pmessage":
                        self._deliver(bytes(message["data"]))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("show event subscription lost; resubscribing")
                await asyncio.sleep(0.5)

    def _deliver(self, data: bytes) -> None:
        event = Event.FromString(data)
        if event.type in (EventType.SHOW_EVENT_TYPE_VOTING_OPEN,
                          EventType.SHOW_EVENT_TYPE_VOTING_EXTENDED):
            for poke in self.on_round_change:
                poke.set()
        feed = self._feeds.get(event.episode_id)
        if feed is None:
            return
        feed.follow(event.episode_version, event.type,
                    event.round if event.HasField("round") else None)
        # The published bytes are the event as watchers get it (minus their sequence).
        feed.watchers.publish(Frame.of(event, data))

    # -- watching --------------------------------------------------------------------------

    def watch(self, episode_id: str) -> Watch:
        """One watcher's stream of the episode: `Watch.next` gives the snapshot, then every
        change and tick, as serialized events. Close it with `Watch.close`."""
        mailbox: fanout.Bounded[Frame] = fanout.Bounded(self._config.sync_watcher_queue)
        self.streams.open(mailbox)  # UNAVAILABLE once this replica drains
        feed = self._feeds.get(episode_id)
        if feed is None:
            feed = self._feeds[episode_id] = Feed(episode_id)
        # Registered before the snapshot is read, so no event can fall between the two.
        feed.watchers.mailboxes.add(mailbox)
        if feed.ticker is None:
            feed.ticker = asyncio.create_task(self._tick(feed), name=f"ticks-{episode_id}")
        return Watch(self, feed, mailbox)

    def _unwatch(self, feed: Feed, mailbox: fanout.Bounded[Frame]) -> None:
        self.streams.close(mailbox)
        feed.watchers.mailboxes.discard(mailbox)
        if not feed.watchers and self._feeds.get(feed.episode_id) is feed:
            del self._feeds[feed.episode_id]
            feed.watchers.stop()
            if feed.ticker is not None:
                feed.ticker.cancel()

    async def _snapshot(self, feed: Feed) -> types.ShowSnapshot:
        """The show as it is now: the feed's shared snapshot if nothing changed since."""
        async with feed.snapshot_lock:
            cached = feed.snapshot
            if cached is None or cached.episode_version < feed.version:
                cached = await self._store.get_snapshot(feed.episode_id)
                feed.follow(cached.episode_version, EventType.SHOW_EVENT_TYPE_SNAPSHOT,
                            cached.current_round if cached.HasField("current_round") else None)
                feed.snapshot = cached
        # Same show, but this moment's clock and time left.
        snapshot = types.ShowSnapshot()
        snapshot.CopyFrom(cached)
        now_ms = int(self._now_ms())
        snapshot.server_time.CopyFrom(_stamp_ms(now_ms))
        if cached.current_round.state == types.ROUND_STATE_OPEN:
            closes_ms = cached.current_round.closes_at.ToMilliseconds()
            snapshot.time_remaining.CopyFrom(duration(max(0, closes_ms - now_ms)))
        return snapshot

    async def _finished(self, feed: Feed, version: int) -> bool:
        """Whether the episode has nothing more to announce, once `version` is out: one read
        of PostgreSQL for all of this replica's watchers of the episode, not one each."""
        asked = feed.finished
        if asked is None or asked[0] != version or _failed(asked[1]):
            asked = feed.finished = (version, asyncio.ensure_future(
                self._store.episode_finished(feed.episode_id)))
        return await asyncio.shield(asked[1])  # a cancelled watcher leaves it to the others

    @staticmethod
    def _snapshot_event(snapshot: types.ShowSnapshot) -> Event:
        return Event(type=EventType.SHOW_EVENT_TYPE_SNAPSHOT,
                     episode_id=snapshot.episode.episode_id, server_time=snapshot.server_time,
                     episode_version=snapshot.episode_version, snapshot=snapshot)

    # -- ticks -----------------------------------------------------------------------------

    def _tick_kinds(self, seconds: int) -> tuple[int, ...]:
        return tick_kinds(self._config, seconds)

    async def _tick(self, feed: Feed) -> None:
        """Send the open round's timing ticks to this replica's watchers of the episode."""
        while True:
            feed.changed.clear()
            round_ = feed.open_round
            if round_ is None:
                await feed.changed.wait()
                continue
            closes_ms = datetime_to_ms(round_.closes_at.ToDatetime())
            now_ms = self._now_ms()
            # The next whole second before the close, strictly in the future, that has a tick.
            seconds = math.ceil((closes_ms - now_ms) / 1000) - 1
            while seconds >= 1 and not self._tick_kinds(seconds):
                seconds -= 1
            if seconds < 1:
                await feed.changed.wait()  # the closer announces VOTING_CLOSED
                continue
            due_ms = closes_ms - seconds * 1000
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(feed.changed.wait(), (due_ms - self._now_ms()) / 1000)
                continue  # the window moved or closed: recompute
            for kind in self._tick_kinds(seconds):
                tick = Event(type=kind, episode_id=feed.episode_id,  # type: ignore[arg-type]
                             server_time=_stamp_ms(due_ms),
                             timing=types.RoundTiming(
                                 round_id=round_.round_id, opens_at=round_.opens_at,
                                 closes_at=round_.closes_at,
                                 channel_closes=round_.channel_closes,
                                 time_remaining=duration(seconds * 1000),
                                 seconds_remaining=seconds))
                feed.watchers.publish(Frame.of(tick))  # serialized once for every watcher

    async def _sample_viewers(self) -> None:
        """Record this replica's open streams per episode at instants every
        SYNC_VIEWER_SAMPLE_MS on the Redis clock, the same instants on every replica, so the
        report's concurrent viewers at an instant are the sum of the replicas' samples (a
        maximum per replica over a period would add peaks that were not at the same time)."""
        every = self._config.sync_viewer_sample_ms
        while True:
            await asyncio.sleep((every - self._now_ms() % every) / 1000)
            sample_ms = round(self._now_ms() / every) * every
            viewers = {episode_id: len(feed.watchers) for episode_id, feed in self._feeds.items()
                       if len(feed.watchers)}
            if not viewers:
                continue
            try:
                await self._store.record_viewers(sample_ms, self._config.televote_replica,
                                                 viewers)
            except Exception:  # a lost sample; the next one is due in a moment
                log.exception("recording the viewer sample failed")

    def _now_ms(self) -> float:
        return time.time() * 1000 + self._clock_offset_ms

    async def _sync_clock(self) -> None:
        before = time.time() * 1000
        server = await keys.server_time_ms(self._storage.redis)
        after = time.time() * 1000
        self._clock_offset_ms = server - (before + after) / 2


def tick_kinds(config: SyncConfig, seconds: int) -> tuple[int, ...]:
    """The ticks due `seconds` before the close: a TIME_UPDATE on every multiple of the update
    period, the WARNING and COUNTDOWN beside it (the seed sends both at 60 s and at 10 s),
    TIME_UPDATE first."""
    kinds: list[int] = []
    if seconds % config.sync_time_update_every_s == 0:
        kinds.append(EventType.SHOW_EVENT_TYPE_TIME_UPDATE)
    if seconds == config.sync_warning_at_s:
        kinds.append(EventType.SHOW_EVENT_TYPE_WARNING)
    if 1 <= seconds <= config.sync_countdown_from_s:
        kinds.append(EventType.SHOW_EVENT_TYPE_COUNTDOWN)
    return tuple(kinds)


class Watch:
    """One WatchShow stream: what it has been sent, and where its next event comes from."""

    __slots__ = ("_done", "_feed", "_hub", "_mailbox", "_seen")

    def __init__(self, hub: Hub, feed: Feed, mailbox: fanout.Bounded[Frame]) -> None:
        self._hub = hub
        self._feed = feed
        self._mailbox = mailbox
        self._seen = -1  # the episode version this watcher's last snapshot had
        self._done = False

    async def next(self) -> bytes | None:
        """The next event to send (serialized, without its sequence), or None at the end."""
        if self._done:
            return None
        if self._seen < 0:
            return await self._snapshot()
        while True:
            frame = await self._mailbox.take()
            if frame is fanout.RESYNC:
                return await self._snapshot()
            if frame.version:
                if frame.version <= self._seen:
                    continue  # already sent (in a snapshot, or announced twice)
                if frame.version > self._seen + 1:
                    # One or more events are still on their way (published out of order, or
                    # replayed from the outbox later): a snapshot is the whole state.
                    return await self._snapshot()
                self._seen = frame.version
            if frame.may_end and await self._hub._finished(self._feed, frame.version):
                self._done = True
            return frame.body

    async def _snapshot(self) -> bytes:
        snapshot = await self._hub._snapshot(self._feed)
        self._seen = int(snapshot.episode_version)
        return self._hub._snapshot_event(snapshot).SerializeToString()

    def close(self) -> None:
        self._hub._unwatch(self._feed, self._mailbox)


def _failed(task: asyncio.Task[bool]) -> bool:
    return task.done() and (task.cancelled() or task.exception() is not None)


def _stamp_ms(ms: float) -> Timestamp:
    stamp = timestamp(ms_to_datetime(int(ms)))
    assert stamp is not None
    return stamp
