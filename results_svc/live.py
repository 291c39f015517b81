"""Live results: one update per round per tick on each replica, fanned out to every subscriber
(runtime/fanout.py: each view serialized once per tick, one latest-value mailbox per stream).

Each tick reads the provisional counters once (the SHARDS live hashes and the minute buckets
of the last 10 minutes, one pipeline) and builds the round's results once per view (everything;
standings only; hidden). Every subscriber of the round on this replica is handed the same
update. A subscriber's mailbox holds one update, the latest: one that reads slowly skips
updates instead of queueing them, so it never slows the others and never grows memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

from google.protobuf.duration_pb2 import Duration

from results_svc import standings as calc
from results_svc.config import ResultsConfig
from results_svc.final import Finalizer, FinalResult, provisional_counts, read_final
from results_svc.rounds import RoundInfo, load_round, round_not_found
from runtime import fanout, keys
from runtime.access import Role
from runtime.protoconv import timestamp_ms
from runtime.storage import Storage
from televote.results.v1 import results_service_pb2 as rpb
from televote.results.v1 import results_types_pb2 as rtypes
from televote.sync.v1 import sync_types_pb2 as stypes

log = logging.getLogger(__name__)
MINUTE_MS = 60_000

FULL, STANDINGS, HIDDEN = "full", "standings", "hidden"
#: RESULTS_TREND_AFTER_SILENCE.
_AFTER_SILENCE = {"stable": rtypes.TREND_STABLE, "rising_fast": rtypes.TREND_RISING_FAST}


@dataclass(frozen=True)
class Update:
    """One tick's results of a round, in each view."""

    views: dict[str, rpb.RoundResults]
    public_view: str
    final: bool
    #: Each view serialized once per tick, shared by every subscriber's stream.
    encoded: dict[str, bytes] = field(default_factory=dict)

    def for_role(self, role: Role) -> rpb.RoundResults:
        return self.views[self.view_name(role)]

    def view_name(self, role: Role) -> str:
        return FULL if role == Role.OPERATOR else self.public_view

    def stream_message(self, role: Role, sequence: int) -> bytes:
        """A StreamResultsResponse on the wire, built from the shared serialized view: the
        per-stream part (the sequence) is a few bytes in front of it."""
        name = self.view_name(role)
        view = self.encoded.get(name)
        if view is None:  # field 2, results: serialized once per tick and view
            view = self.encoded[name] = fanout.length_delimited(
                2, self.views[name].SerializeToString())
        return fanout.sequence_prefix(sequence) + view


@dataclass(eq=False)
class Feed:
    round_id: str
    subscribers: fanout.Topic[Update] = field(default_factory=fanout.Topic)
    latest: Update | None = None
    ranks: dict[str, int] = field(default_factory=dict)
    rank_changes: dict[str, int] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None


def public_view(info: RoundInfo, final: bool) -> str:
    if info.visibility == stypes.RESULTS_VISIBILITY_HIDDEN and not info.episode_ended:
        return HIDDEN
    if final or info.visibility == stypes.RESULTS_VISIBILITY_PUBLIC_COUNTS \
            or info.episode_ended:
        return FULL
    return STANDINGS


def build_views(info: RoundInfo, counts: dict[str, int], ranks: dict[str, int],
                rank_changes: dict[str, int], trends: dict[str, int], now_ms: float,
                final: bool) -> Update:
    """The round's results in every view, from one reading of the counts."""
    total = sum(counts.get(c, 0) for c in info.contestant_ids)
    order = calc.order_by_rank(info.contestant_ids, ranks)
    by_id = {c.contestant_id: c for c in info.contestants}
    remaining = 0
    if info.closes_ms is not None and info.state == "OPEN":
        remaining = max(0, int(info.closes_ms - now_ms))
    views = {}
    for view in (FULL, STANDINGS, HIDDEN):
        results = rpb.RoundResults(
            round_id=info.round_id, round_state=info.state_enum,  # type: ignore[arg-type]
            visibility=info.visibility,  # type: ignore[arg-type]
            time_remaining=Duration(seconds=remaining // 1000,
                                    nanos=remaining % 1000 * 1_000_000),
            server_time=timestamp_ms(now_ms), is_final=final)
        if info.closes_ms is not None:
            results.closes_at.CopyFrom(timestamp_ms(info.closes_ms))
        if view == FULL:
            results.total_votes = total
        for contestant_id in (info.contestant_ids if view == HIDDEN else order):
            contestant = by_id[contestant_id]
            standing = results.standings.add(
                contestant_id=contestant_id, name=contestant.name,
                photo_url=contestant.photo_url, sms_number=contestant.sms_number)
            if view == HIDDEN:
                continue
            standing.rank = ranks[contestant_id]
            standing.rank_change = rank_changes.get(contestant_id, 0)
            standing.trend = trends.get(contestant_id,  # type: ignore[assignment]
                                        rtypes.TREND_UNSPECIFIED)
            if view == FULL:
                count = counts.get(contestant_id, 0)
                standing.count = count
                standing.percentage = calc.percentage(count, total)
                standing.formatted_count = calc.format_count(count)
        views[view] = results
    return Update(views, public_view(info, final), final)


def final_update(info: RoundInfo, final: FinalResult, now_ms: float) -> Update:
    counts = {c: final.counts.get(c, 0) for c in info.contestant_ids}
    return build_views(info, counts, calc.ranks(counts), {}, {}, now_ms, final=True)


class Live:
    """The feeds of the rounds this replica's subscribers watch."""

    def __init__(self, storage: Storage, config: ResultsConfig, finalizer: Finalizer,
                 streams: fanout.Streams | None = None) -> None:
        self.streams = streams if streams is not None else fanout.Streams()
        #: GetResults of rounds nobody streams here: round -> (tick number, its reading), so
        #: a burst of calls in one tick costs one reading.
        self._reads: dict[str, tuple[int, asyncio.Future[Update]]] = {}
        self._storage = storage
        self._config = config
        self._finalizer = finalizer
        self._feeds: dict[str, Feed] = {}
        self._offset_ms = 0.0

    async def start(self) -> None:
        before = time.time() * 1000
        server = await keys.server_time_ms(self._storage.redis)
        self._offset_ms = server - (before + time.time() * 1000) / 2

    async def stop(self) -> None:
        for feed in list(self._feeds.values()):
            feed.subscribers.stop()
            if feed.task is not None:
                feed.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await feed.task

    def now_ms(self) -> float:
        return time.time() * 1000 + self._offset_ms

    @property
    def subscriber_count(self) -> int:
        return sum(len(feed.subscribers) for feed in self._feeds.values())

    async def subscribe(self, round_id: str) -> fanout.Latest[Update]:
        """A subscriber's mailbox of the round's updates: the latest right away, then one per
        tick (or fewer, if it reads slower), until the final update. `unsubscribe` it."""
        if round_id not in self._feeds:
            await self._round(round_id)  # NOT_FOUND before anything is set up
        mailbox: fanout.Latest[Update] = fanout.Latest()
        self.streams.open(mailbox)  # UNAVAILABLE once this replica drains
        feed = self._feeds.setdefault(round_id, Feed(round_id))
        feed.subscribers.mailboxes.add(mailbox)
        if feed.latest is not None:
            mailbox.offer(feed.latest)
        if feed.task is None:
            feed.task = asyncio.create_task(self._tick(feed), name=f"results-{round_id}")
        return mailbox

    def unsubscribe(self, round_id: str, mailbox: fanout.Latest[Update]) -> None:
        self.streams.close(mailbox)
        feed = self._feeds.get(round_id)
        if feed is None:
            return
        feed.subscribers.mailboxes.discard(mailbox)
        if not feed.subscribers:
            del self._feeds[round_id]
            feed.subscribers.stop()
            if feed.task is not None:
                feed.task.cancel()

    async def current(self, round_id: str) -> Update:
        """GetResults: this replica's latest update of the round, or one reading per tick."""
        feed = self._feeds.get(round_id)
        if feed is not None and feed.latest is not None:
            return feed.latest
        tick = int(self.now_ms() // self._config.results_tick_ms)
        cached = self._reads.get(round_id)
        if cached is not None and cached[0] == tick:
            return await asyncio.shield(cached[1])
        for stale in [r for r, (t, _) in self._reads.items() if t != tick]:
            del self._reads[stale]
        reading = asyncio.ensure_future(self._compute(Feed(round_id)))
        self._reads[round_id] = (tick, reading)
        try:
            return await asyncio.shield(reading)
        except Exception:
            if self._reads.get(round_id, (0, None))[1] is reading:
                del self._reads[round_id]  # errors (NOT_FOUND) are not remembered
            raise

    async def _round(self, round_id: str) -> RoundInfo:
        async with self._storage.pool.connection() as connection:
            info = await load_round(connection, round_id)
        if info is None:
            raise round_not_found(round_id)
        return info

    async def _tick(self, feed: Feed) -> None:
        tick_ms = self._config.results_tick_ms
        while True:
            try:
                update = await self._compute(feed)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("results tick of %s failed", feed.round_id)
                update = None
            if update is not None:
                feed.latest = update
                feed.subscribers.publish(update)
                if update.final:
                    return
            # Ticks on whole multiples of the tick by the Redis clock: every replica's
            # subscribers see updates at about the same moment.
            now = self.now_ms()
            await asyncio.sleep((tick_ms - now % tick_ms) / 1000)

    async def _compute(self, feed: Feed) -> Update:
        async with self._storage.pool.connection() as connection:
            info = await load_round(connection, feed.round_id)
            if info is None:
                raise round_not_found(feed.round_id)
            final = await read_final(connection, feed.round_id) \
                if info.state == "FINALIZED" else None
        now_ms = self.now_ms()
        if final is not None:
            return final_update(info, final, now_ms)
        counts, minutes = await self._read_counters(info, now_ms)
        counts = {c: counts.get(c, 0) for c in info.contestant_ids}
        ranks = calc.ranks(counts)
        feed.rank_changes = {c: calc.rank_change(feed.ranks.get(c), r)
                             for c, r in ranks.items()}
        feed.ranks = ranks
        current_minute = int(now_ms) - int(now_ms) % MINUTE_MS
        after_silence = _AFTER_SILENCE[self._config.results_trend_after_silence]
        trends = {c: calc.trend(*calc.trend_windows(minutes.get(c, {}), current_minute),
                                after_silence)
                  for c in info.contestant_ids}
        return build_views(info, counts, ranks, feed.rank_changes, trends, now_ms, final=False)

    async def _read_counters(self, info: RoundInfo, now_ms: float
                             ) -> tuple[dict[str, int], dict[str, dict[int, int]]]:
        current_minute = int(now_ms) - int(now_ms) % MINUTE_MS
        wanted = [(current_minute - i * MINUTE_MS, c) for i in range(1, 11)
                  for c in info.contestant_ids]
        fields = [f"{minute}:{c}" for minute, c in wanted]
        counts = await provisional_counts(self._storage, info.round_id)
        minutes: dict[str, dict[int, int]] = {}
        async with self._storage.redis.pipeline(transaction=False) as pipe:
            for shard in range(keys.SHARDS):
                pipe.hmget(keys.live_minutes_key(shard, info.round_id), fields)
            replies = await pipe.execute()
        for reply in replies:
            for (minute, contestant), value in zip(wanted, reply, strict=True):
                if value is not None:
                    bucket = minutes.setdefault(contestant, {})
                    bucket[minute] = bucket.get(minute, 0) + int(value)
        return counts, minutes
