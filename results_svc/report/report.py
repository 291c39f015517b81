"""The post-show report of an episode (ReportService.GetEpisodeReport).

Exact, from PostgreSQL, and cheap on show night, whatever the number of votes:

- The rollups (`rollup.py`) fold each ledger row once, as the result checkpoint judges it:
  every round's part (totals, reasons, timeline buckets, contestants, with distinct voters)
  and the episode's figures over its voters (distinct voters by type and channel, the
  votes-per-voter distribution, places, free-vote use, returning voters, the demographic
  segments). A replica extends them every RESULTS_REPORT_ROLLUP_MS (`follow_once`).
- A report first brings the rollups to their checkpoints and commits that (the rollup's own
  work, done once by whoever comes first), then extends them to the rows the checkpoints have
  not judged yet (the last second or so of votes while live) by the same steps, in a
  savepoint it rolls back (`rollup.live_view`),
  reads them, and reads the few other things it shows (moments, revenue, fraud decisions,
  viewer samples): no read grows with the episode's voters.
- Once the episode has ended and every round is finalized, the report is final: the rollups
  are brought to the end of the ledger and stored, the report computed once from them, stored
  (episode_reports) and served as stored; `precompute_once` (every
  RESULTS_REPORT_PRECOMPUTE_MS) does it right after the episode ends, so a report asked for
  after the show is read, not computed.
- Before that a report is provisional (`is_final` false), kept in memory per replica for
  RESULTS_REPORT_PROVISIONAL_MS (or ten times what it took), and one computation serves every
  caller waiting for it.

Nothing per voter leaves this module: places, profiles and vote counts are aggregated, and
buckets of fewer than RESULTS_REPORT_MIN_VOTERS voters merged into "other" (`privacy`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from results_svc.config import ResultsConfig
from results_svc.report import privacy, revenue, rollup, store
from results_svc.report.places import UNKNOWN
from runtime import protoconv
from runtime.errors import ApiError
from runtime.storage import Storage
from televote.results.v1 import report_service_pb2 as pb
from televote.vote.v1 import vote_types_pb2 as vtypes

log = logging.getLogger(__name__)

#: The vote-per-voter buckets, in display order.
DISTRIBUTION = ("1", "2-5", "6-10", "11-50", "51-100", "101+")
#: The profile's dimensions, in display order.
SEGMENTS = store.PROFILE_DIMENSIONS
#: Rounds whose state leaves nothing more to count.
SETTLED = ("FINALIZED", "PENDING")


def _stamp(moment: datetime) -> Timestamp:
    stamp = protoconv.timestamp(moment)
    assert stamp is not None
    return stamp


_stamp_ms = protoconv.timestamp_ms


def _percent(part: int, whole: int) -> float:
    return round(100.0 * part / whole, 1) if whole else 0.0


def _usd(micros: int) -> vtypes.Money:
    return vtypes.Money(currency_code=revenue.USD, amount_micros=micros)


def episode_not_found(episode_id: str) -> ApiError:
    return ApiError(grpc.StatusCode.NOT_FOUND, "EPISODE_NOT_FOUND", f"no episode {episode_id}")


#: A provisional report is recomputed at most once per this many times its last computation
#: took: however often it is asked for, it costs a replica at most a tenth of a core while the
#: show is live (RESULTS_REPORT_PROVISIONAL_MS is the floor).
DUTY_CYCLE = 10


class Figures:
    """The episode's figures as the rollups keep them ({figure: [voters, votes]},
    `store.figures_sql`)."""

    def __init__(self, figures: dict[str, list[int]], free_quota: int) -> None:
        self._figures = figures
        self._quota = free_quota

    def pair(self, name: str) -> tuple[int, int]:
        voters, votes = self._figures.get(name, (0, 0))
        return voters, votes

    def voters(self, name: str) -> int:
        return self.pair(name)[0]

    def prefixed(self, prefix: str) -> list[tuple[str, tuple[int, int]]]:
        return [(key[len(prefix):], (pair[0], pair[1])) for key, pair in self._figures.items()
                if key.startswith(prefix)]

    def used_all_free(self) -> int:
        """Voters with a counted vote who cast at least the quota's free votes."""
        if self._quota <= 0:
            return 0
        return sum(voters for cast, (voters, _) in self.prefixed("free_cast=")
                   if int(cast) >= min(self._quota, rollup.FREE_CAST_CAP))


@dataclass
class _Cached:
    at: float
    took: float
    report: pb.GetEpisodeReportResponse


class Reports:
    def __init__(self, storage: Storage, config: ResultsConfig) -> None:
        self._storage = storage
        self._min_voters = config.results_report_min_voters
        self._max_age_ms = config.results_report_provisional_ms
        self._warning = timedelta(seconds=config.results_report_warning_s)
        self._cache: dict[str, _Cached] = {}
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._precompute_ms = config.results_report_precompute_ms
        self._rollup_ms = config.results_report_rollup_ms
        self._rollup_rows = config.results_report_rollup_rows
        self._tasks: list[asyncio.Task[None]] = []

    async def episode_report(self, episode_id: str) -> pb.GetEpisodeReportResponse:
        cached = self._cache.get(episode_id)
        if cached is not None and self._fresh(cached):
            return cached.report
        async with self._locks[episode_id]:  # one computation for every caller waiting
            cached = self._cache.get(episode_id)
            if cached is not None and self._fresh(cached):
                return cached.report
            started = time.monotonic()
            report = await self._report(episode_id)
            now = time.monotonic()
            self._cache[episode_id] = _Cached(now, now - started, report)
            return report

    def _fresh(self, cached: _Cached) -> bool:
        age_ms = (time.monotonic() - cached.at) * 1000
        return cached.report.is_final or \
            age_ms < max(self._max_age_ms, DUTY_CYCLE * cached.took * 1000)

    async def _report(self, episode_id: str) -> pb.GetEpisodeReportResponse:
        async with self._storage.pool.connection() as connection:
            stored = await store.stored_report(connection, episode_id)
            if stored is not None:
                return pb.GetEpisodeReportResponse.FromString(stored)
            cursor = await connection.execute(store.EPISODE_SQL, (episode_id,))
            episode: Any = await cursor.fetchone()
            if episode is None:
                raise episode_not_found(episode_id)
            cursor = await connection.execute(store.ROUNDS_SQL, (episode_id,))
            rounds: list[Any] = await cursor.fetchall()
        final = episode["state"] == "ENDED" and all(r["state"] in SETTLED for r in rounds)
        # The rollups brought to their checkpoints and committed first (a final report's to
        # the end): the rows the checkpoints have judged are folded once, for this report and
        # the rollup alike, and only the rows they have not judged yet (live) are folded in
        # the savepoint below. Live, a replica already at it is waited for there instead.
        await self.follow(episode_id, wait=final)
        async with self._storage.pool.connection() as connection:
            # The rollups extended to the end of the ledger in a savepoint rolled back (a
            # final report's are there already): under the episode's rollup lock, so that no
            # replica's step changes the rows this one changes meanwhile.
            async with rollup.episode_session(connection, episode_id, wait=True), \
                    rollup.snapshot(connection), \
                    connection.transaction(force_rollback=True):
                view = await rollup.live_view(connection, episode_id)
                report = await self._assemble(connection, episode, rounds, view, final)
            if final:
                return pb.GetEpisodeReportResponse.FromString(await store.store_report(
                    connection, episode_id, report.SerializeToString()))
        return report

    async def follow(self, episode_id: str, *, wait: bool) -> bool:
        """Extend the episode's rollups to their targets (`rollup.extend`), one step per
        transaction; False if another replica is at it and `wait` is False."""
        async with self._storage.pool.connection() as connection, rollup.episode_session(
                connection, episode_id, wait=wait) as mine:
            if not mine:
                return False
            while True:
                async with rollup.snapshot(connection):
                    done = await rollup.extend(connection, episode_id, self._rollup_rows)
                if done:
                    return True

    # -- ahead of the request -------------------------------------------------------------

    async def start(self) -> None:
        if self._precompute_ms > 0:
            self._tasks.append(asyncio.create_task(self._precompute_loop(),
                                                   name="report-precompute"))
        if self._rollup_ms > 0:
            self._tasks.append(asyncio.create_task(self._rollup_loop(), name="report-rollup"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def _precompute_loop(self) -> None:
        while True:
            await asyncio.sleep(self._precompute_ms / 1000)
            try:
                while await self.precompute_once():
                    pass
            except Exception:  # the next pass tries again; a request computes it anyway
                log.exception("report precompute failed")

    async def precompute_once(self) -> bool:
        """Do one piece of work a report would otherwise do on request: an ended episode's
        final report. False when there was nothing to do."""
        async with self._storage.pool.connection() as connection:
            cursor = await connection.execute(store.UNREPORTED_EPISODES_SQL)
            episode: Any = await cursor.fetchone()
        if episode is not None:
            await self.episode_report(episode["episode_id"])
            return True
        return False

    async def _rollup_loop(self) -> None:
        while True:
            await asyncio.sleep(self._rollup_ms / 1000)
            try:
                await self.follow_once()
            except Exception:  # the next pass tries again; a live report folds the rest
                log.exception("report rollup failed")

    async def follow_once(self) -> None:
        """Extend the rollups of every episode whose rollups are behind their checkpoints."""
        async with self._storage.pool.connection() as connection:
            cursor = await connection.execute(store.BEHIND_SQL)
            rows: list[Any] = await cursor.fetchall()
        behind = [str(row["episode_id"]) for row in rows]
        for episode_id in behind:
            await self.follow(episode_id, wait=False)

    async def _assemble(self, connection: store.Connection, episode: Any, rounds: list[Any],
                        view: rollup.View, final: bool) -> pb.GetEpisodeReportResponse:
        episode_id = episode["episode_id"]
        round_ids = [r["round_id"] for r in rounds]
        parts = view.parts
        cursor = await connection.execute(store.CONTESTANTS_SQL, (episode_id,))
        names = {row["contestant_id"]: row["name"] for row in await cursor.fetchall()}
        figures = Figures(view.figures, episode["free_vote_quota"])

        report = pb.GetEpisodeReportResponse(
            episode_id=episode_id, is_final=final, generated_at=_stamp(datetime.now(UTC)),
            title=episode["title"], show_name=episode["show_name"],
            episode_state=episode["state"], privacy_min_voters=self._min_voters)
        self._summary(report, parts.values(), figures)
        self._timeline(report, parts.values())
        self._rounds(report, rounds, parts, names)
        await self._moments(connection, report, episode_id, rounds, names)
        self._geography(report, figures)
        self._demographics(report, self._segments(figures))
        await self._revenue(connection, report, episode_id)
        await self._engagement(connection, report, episode_id, rounds, names, figures)
        await self._fraud(connection, report, round_ids, parts.values())
        return report

    def _segments(self, figures: Figures) -> list[tuple[str, str, int, int]]:
        """Voters and votes per profile segment: the figures of the values told, and
        "unknown" for the rest of the episode's voters (no profile, or the field not told)."""
        voters, votes = figures.pair("voters")
        out = []
        for dimension in SEGMENTS:
            known = figures.prefixed(f"profile:{dimension}=")
            out.append((dimension, UNKNOWN, voters - sum(p[0] for _, p in known),
                        votes - sum(p[1] for _, p in known)))
            out.extend((dimension, value, n, v) for value, (n, v) in known)
        return out

    def _summary(self, report: pb.GetEpisodeReportResponse, parts: Any,
                 figures: Figures) -> None:
        summary = report.summary
        by_type: dict[str, int] = defaultdict(int)
        by_channel: dict[str, int] = defaultdict(int)
        invalid: dict[str, int] = defaultdict(int)
        for part in parts:
            summary.ledger_votes += part["ledger_votes"]
            summary.counted_votes += part["counted_votes"]
            for reason, votes in part["invalid"].items():
                invalid[reason] += votes
            for _, channel, vote_type, votes, _ in part["minutes"]:
                by_type[vote_type] += votes
                by_channel[channel] += votes
        summary.invalidated_votes = summary.ledger_votes - summary.counted_votes
        for reason, votes in sorted(invalid.items(), key=lambda item: (-item[1], item[0])):
            summary.invalidated_by_reason.add(reason=reason, votes=votes)
        summary.unique_voters = figures.voters("voters")
        total = summary.counted_votes

        def count(votes: int, voters: int) -> pb.VoteCount:
            return pb.VoteCount(votes=votes, voters=voters, percentage=_percent(votes, total))

        summary.free.CopyFrom(count(by_type["FREE"], figures.voters("free_voters")))
        summary.paid.CopyFrom(count(by_type["PAID"], figures.voters("paid_voters")))
        summary.sms.CopyFrom(count(by_type["PREMIUM_SMS"], figures.voters("sms_voters")))
        summary.app.CopyFrom(count(by_channel["APP"], figures.voters("app_voters")))
        summary.web.CopyFrom(count(by_channel["WEB"], figures.voters("web_voters")))

    def _timeline(self, report: pb.GetEpisodeReportResponse, parts: Any) -> None:
        buckets = []
        per_minute: dict[int, int] = defaultdict(int)
        for part in parts:
            for minute_ms, channel, vote_type, votes, voters in part["minutes"]:
                buckets.append((minute_ms, part["round_id"], channel, vote_type, votes, voters))
                per_minute[minute_ms] += votes
        for minute_ms, round_id, channel, vote_type, votes, voters in sorted(buckets):
            report.timeline.add(
                start_time=_stamp_ms(minute_ms), round_id=round_id,
                channel=protoconv.channel_enum(channel),
                vote_type=vtypes.VoteType.Value(f"VOTE_TYPE_{vote_type}"),
                votes=votes, voters=voters)
        for minute_ms, votes in sorted(per_minute.items(), key=lambda i: (-i[1], i[0]))[:5]:
            report.peaks.add(start_time=_stamp_ms(minute_ms), votes=votes)

    def _rounds(self, report: pb.GetEpisodeReportResponse, rounds: list[Any],
                parts: dict[str, Any], names: dict[str, str]) -> None:
        for row in rounds:
            part = parts.get(row["round_id"])
            summary = report.rounds.add(round_id=row["round_id"], name=row["name"],
                                        state=row["state"],
                                        winner_contestant_ids=row["winner_ids"] or [])
            if part is None:
                continue
            summary.ledger_votes = part["ledger_votes"]
            summary.votes = part["counted_votes"]
            summary.invalidated_votes = part["ledger_votes"] - part["counted_votes"]
            summary.voters = part["voters"]
            for contestant_id in row["contestant_ids"]:
                votes, voters = part["contestants"].get(contestant_id, (0, 0))
                summary.contestants.add(
                    contestant_id=contestant_id, name=names.get(contestant_id, ""),
                    votes=votes, voters=voters,
                    percentage=_percent(votes, part["counted_votes"]))

    async def _moments(self, connection: store.Connection, report: pb.GetEpisodeReportResponse,
                       episode_id: str, rounds: list[Any], names: dict[str, str]) -> None:
        moments: list[tuple[datetime, str, str, str, str]] = []
        cursor = await connection.execute(store.PERFORMANCES_SQL, (episode_id,))
        for row in await cursor.fetchall():
            name = names.get(row["contestant_id"], "")
            moments.append((row["started_at"], "PERFORMANCE_START", name, "",
                            row["contestant_id"]))
            if row["ended_at"] is not None:
                moments.append((row["ended_at"], "PERFORMANCE_END", name, "",
                                row["contestant_id"]))
        for row in rounds:
            if row["opens_at"] is None:
                continue
            moments.append((row["opens_at"], "VOTING_OPEN", row["name"], row["round_id"], ""))
            close = row["closed_at"]
            if row["closes_at"] is not None:
                warning = row["closes_at"] - self._warning
                # Only a warning that was given: before the close, and not in the future.
                if row["opens_at"] < warning < (close or datetime.now(UTC)):
                    moments.append((warning, "VOTING_WARNING", row["name"], row["round_id"],
                                    ""))
            if close is not None:
                moments.append((close, "VOTING_CLOSE", row["name"], row["round_id"], ""))
        for moment, kind, label, round_id, contestant_id in sorted(moments):
            report.moments.add(time=_stamp(moment), kind=kind, label=label, round_id=round_id,
                               contestant_id=contestant_id)

    def _geography(self, report: pb.GetEpisodeReportResponse, figures: Figures) -> None:
        buckets = []
        for key, (voters, votes) in figures.prefixed("place:"):
            country, _, province = key.partition("/")
            buckets.append(privacy.Bucket((country, province), voters, votes))
        for bucket in privacy.merge_small(buckets, self._min_voters,
                                          (privacy.OTHER, "")):
            country, province = bucket.key
            report.geography.add(country_code=country, province=province, votes=bucket.votes,
                                 voters=bucket.voters)

    def _demographics(self, report: pb.GetEpisodeReportResponse,
                      segments: list[tuple[str, str, int, int]]) -> None:
        order = {dimension: n for n, dimension in enumerate(SEGMENTS)}
        buckets = [privacy.Bucket((dimension, value), voters, votes)
                   for dimension, value, voters, votes in
                   sorted(segments, key=lambda s: (order[s[0]], s[1]))]
        for bucket in privacy.grouped(buckets, lambda b: b.key[0],
                                      self._min_voters, lambda d: (d, privacy.OTHER)):
            dimension, value = bucket.key
            report.demographics.add(dimension=dimension, value=value, votes=bucket.votes,
                                    voters=bucket.voters)

    async def _revenue(self, connection: store.Connection, report: pb.GetEpisodeReportResponse,
                       episode_id: str) -> None:
        money = await revenue.revenue(connection, episode_id)
        out = report.revenue
        for target, section in ((out.packages, money.packages), (out.sms, money.sms),
                                (out.refunds, money.refunds)):
            target.available = section.available
            target.note = section.note
            for line in section.lines:
                target.lines.add(source=line.source, tier=line.tier,
                                 transactions=line.transactions,
                                 gross=_usd(line.gross_micros))
            if section.available:
                target.total.CopyFrom(_usd(section.total_micros))
        out.gross.CopyFrom(_usd(money.gross_micros))
        out.complete = money.complete

    async def _engagement(self, connection: store.Connection,
                          report: pb.GetEpisodeReportResponse, episode_id: str,
                          rounds: list[Any], names: dict[str, str], figures: Figures) -> None:
        engagement = report.engagement
        voters = figures.voters("voters")
        if report.peaks:
            engagement.peak_votes_per_minute = report.peaks[0].votes
            engagement.peak_minute.CopyFrom(report.peaks[0].start_time)
        engagement.votes_per_voter = round(report.summary.counted_votes / voters, 2) \
            if voters else 0.0
        engagement.multi_round_voter_percentage = _percent(figures.voters("multi_round"),
                                                           voters)
        engagement.used_all_free_percentage = _percent(figures.used_all_free(), voters)
        engagement.free_to_paid_percentage = _percent(figures.voters("free_to_paid"),
                                                      figures.voters("free_casters"))
        engagement.returning_voters = figures.voters("returning")
        engagement.returning_voter_percentage = _percent(engagement.returning_voters, voters)
        distribution = {label: n for label, (n, _) in figures.prefixed("dist:")}
        buckets = [privacy.Bucket(label, distribution.get(label, 0), 0)
                   for label in DISTRIBUTION]
        kept = {b.key: b.voters for b in privacy.merge_small(buckets, self._min_voters)}
        for label in (*DISTRIBUTION, privacy.OTHER):
            if label in kept:
                engagement.votes_per_voter_distribution.add(label=label, voters=kept[label])
        await self._performances(connection, engagement, episode_id, rounds, names)
        cursor = await connection.execute(store.PEAK_VIEWERS_SQL, (episode_id,))
        peak: Any = await cursor.fetchone()
        if peak is not None:
            engagement.peak_concurrent_viewers = peak["viewers"]
            engagement.peak_viewers_minute.CopyFrom(
                _stamp_ms(peak["sample_ms"] - peak["sample_ms"] % 60_000))

    async def _performances(self, connection: store.Connection, engagement: pb.Engagement,
                            episode_id: str, rounds: list[Any], names: dict[str, str]) -> None:
        cursor = await connection.execute(store.PERFORMANCES_SQL, (episode_id,))
        for row in await cursor.fetchall():
            started_ms = int(row["since_epoch"].total_seconds() * 1000)
            first: int | None = None
            for round_row in rounds:
                if row["contestant_id"] not in round_row["contestant_ids"] or \
                        round_row["opens_at"] is None:
                    continue
                found = await connection.execute(
                    store.FIRST_VOTE_SQL, {"round": round_row["round_id"], "from_ms": started_ms,
                                           "contestant": row["contestant_id"]}, prepare=False)
                hit: Any = await found.fetchone()
                if hit is not None and (first is None or hit["admitted_ms"] < first):
                    first = hit["admitted_ms"]
            response = engagement.performances.add(
                contestant_id=row["contestant_id"], name=names.get(row["contestant_id"], ""),
                started_at=_stamp(row["started_at"]))
            if first is not None:
                response.first_vote_after.FromMilliseconds(first - started_ms)

    async def _fraud(self, connection: store.Connection, report: pb.GetEpisodeReportResponse,
                     round_ids: list[str], parts: Any) -> None:
        fraud = report.fraud
        params = {"rounds": round_ids}
        cursor = await connection.execute(store.FRAUD_REVIEWS_SQL, params)
        states = {row["state"]: row["n"] for row in await cursor.fetchall()}
        fraud.reviewed = sum(states.values())
        fraud.pending = states.get("PENDING", 0)
        fraud.approved = states.get("APPROVED", 0)
        fraud.rejected = states.get("REJECTED", 0)
        cursor = await connection.execute(store.FRAUD_BLOCKED_SQL, params)
        row: Any = await cursor.fetchone()
        fraud.blocked = row["n"]
        fraud.rejected_votes = sum(part["invalid"].get("FRAUD_REJECTED", 0) for part in parts)
        cursor = await connection.execute(store.FRAUD_SIGNALS_SQL, params)
        signals: list[Any] = await cursor.fetchall()
        for signal in sorted(signals, key=lambda s: (-(s["blocked"] + s["reviewed"]),
                                                      s["signal"] or "")):
            fraud.by_signal.add(signal=signal["signal"] or UNKNOWN, blocked=signal["blocked"],
                                reviewed=signal["reviewed"], rejected=signal["rejected"])
