"""The report's rollups, kept as votes commit: each ledger row is read once, in steps behind
the result checkpoint, and folded into

- the round's part (`report_round_parts`: ledger and counted votes, votes not counted by
  reason, the timeline buckets with their distinct voters, votes and voters per contestant),
- the voter's row of the round (`report_round_voters`: their counted votes by type and
  channel, free votes cast, first GPS point and IP place, and what they contributed to each
  bucket of the part, so that they can be taken out again),
- the voter's row of the episode (`report_episode_voters`: the sum of their round rows, their
  place, whether they voted in an earlier episode of the show),
- the episode's figures (`report_episode_figures`: `contributions` of every voter row summed),

so that a report reads a few rows per round and one per episode, whatever the number of votes.

Why a row counts is the result checkpoint's verdict (`round_checkpoint_invalid`, rows below its
watermark; results_svc/checkpoint.py), or the final result's once the round is finalized: the
rollup of a round never passes its checkpoint's watermark, and is final when it has folded
every row with the final verdicts. What changes verdicts already folded is logged by the
checkpoint in its own transaction (`report_rollup_resets`): voters judged again (a late fraud
rejection, a credit) are taken out and their rows folded again; a checkpoint dropped and
rebuilt (or a result recounted in full) starts the episode's rollups over.

Who folds: any results_svc replica (`Rollups.follow`), one per episode at a time (a session
advisory lock), each step one REPEATABLE READ transaction, so the checkpoint, its verdicts,
the ledger rows and the resets are read in one snapshot. A live report does the same steps in
memory, without writing, for the rows the rollup has not reached yet (`tail`), so it is exact
at the moment it is computed.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field, fields
from typing import Any

import orjson
from psycopg import AsyncConnection

from results_svc import store as results_store
from results_svc.report import store
from results_svc.report.places import UNKNOWN, locate, place_of_ip
from runtime import locks

Connection = AsyncConnection[Any]

BEFORE_ALL = -(2**62)
AFTER_ALL = 2**62
#: Free votes cast are counted per value up to this (figures "free_cast=N"), so the share of
#: voters who used a quota of up to this many free votes is exact whatever the quota is when
#: the report is read.
FREE_CAST_CAP = 100


def distribution_bucket(counted: int) -> str:
    """The votes-per-voter bucket of a voter's counted votes (report.DISTRIBUTION)."""
    if counted == 1:
        return "1"
    for top, label in ((5, "2-5"), (10, "6-10"), (50, "11-50"), (100, "51-100")):
        if counted <= top:
            return label
    return "101+"


def _earliest(old: Any, new: Any) -> Any:
    return new if old is None or (new is not None and new < old) else old


@dataclass
class _Counted:
    """A voter's counted votes by type and by channel, and every free vote they cast."""

    counted: int = 0
    free: int = 0
    paid: int = 0
    sms: int = 0
    app: int = 0
    web: int = 0
    free_cast: int = 0

    @classmethod
    def of(cls, row: Any) -> Any:
        return cls(**{name: row[name] for name in _names(cls)})


_FIELD_NAMES: dict[str, tuple[str, ...]] = {}


def _names(cls: type) -> tuple[str, ...]:
    """A dataclass's field names (dataclasses.fields costs microseconds a call)."""
    names = _FIELD_NAMES.get(cls.__name__)
    if names is None:
        names = _FIELD_NAMES[cls.__name__] = tuple(f.name for f in fields(cls))
    return names


#: The counted votes a voter row sums, by type and by channel.
_SUMS = _names(_Counted)


@dataclass
class RoundVoter(_Counted):
    """One voter's row of a round (report_round_voters)."""

    first_gps: list[float] | None = None
    ip_geo_ms: int | None = None
    ip_geo: str | None = None
    buckets: dict[str, int] = field(default_factory=dict)
    contestants: dict[str, int] = field(default_factory=dict)
    invalid: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, row: Any) -> Any:
        return cls(**{name: orjson.loads(row[name]) if name in _JSON else row[name]
                      for name in _names(cls)})


#: RoundVoter's JSON columns.
_JSON = ("buckets", "contestants", "invalid")


@dataclass
class EpisodeVoter(_Counted):
    """One voter's row of an episode (report_episode_voters): the sum of their round rows."""

    rounds: int = 0
    first_gps: list[float] | None = None
    ip_geo_ms: int | None = None
    ip_geo: str | None = None
    place: str = f"{UNKNOWN}/"
    returned: bool = False


#: The voter rows a fold changed: user -> (row before, or None, row after).
Touched = dict[str, tuple["EpisodeVoter | None", "EpisodeVoter"]]


def contributions(voter: EpisodeVoter | None) -> dict[str, tuple[int, int]]:
    """What one voter adds to the episode's figures, {figure: (voters, votes)}: the figures
    are these summed over the episode's voters, so a voter's change is a difference of two of
    these."""
    if voter is None:
        return {}
    out: dict[str, tuple[int, int]] = {}
    if voter.free_cast > 0:
        out["free_casters"] = (1, 0)
        if voter.paid > 0:
            out["free_to_paid"] = (1, 0)
    if voter.counted <= 0:
        return out
    votes = voter.counted
    out["voters"] = (1, votes)
    for name in ("free", "paid", "sms", "app", "web"):
        if getattr(voter, name) > 0:
            out[f"{name}_voters"] = (1, 0)
    if voter.rounds > 1:
        out["multi_round"] = (1, 0)
    if voter.returned:
        out["returning"] = (1, 0)
    out[f"free_cast={min(voter.free_cast, FREE_CAST_CAP)}"] = (1, 0)
    out[f"dist:{distribution_bucket(votes)}"] = (1, votes)
    out[f"place:{voter.place}"] = (1, votes)
    return out


@dataclass
class Part:
    """A round's part (report_round_parts) as folded so far."""

    round_id: str
    episode_id: str
    watermark_ms: int = BEFORE_ALL
    final: bool = False
    ledger_votes: int = 0
    counted_votes: int = 0
    voters: int = 0
    invalid: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    #: "minute_ms|channel|type" -> [votes, voters]
    minutes: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    #: contestant id -> [votes, voters]
    contestants: dict[str, list[int]] = field(
        default_factory=lambda: defaultdict(lambda: [0, 0]))

    @classmethod
    def of(cls, row: Any) -> Part:
        part = cls(row["round_id"], row["episode_id"], row["watermark_ms"], row["final"],
                   row["ledger_votes"], row["counted_votes"], row["voters"])
        part.invalid.update(row["invalid"])
        for minute_ms, channel, vote_type, votes, voters in row["minutes"]:
            part.minutes[f"{minute_ms}|{channel}|{vote_type}"] = [votes, voters]
        for contestant, pair in row["contestants"].items():
            part.contestants[contestant] = list(pair)
        return part

    def row(self) -> dict[str, Any]:
        """The part as it is stored (and EPISODE_PARTS_SQL reads it)."""
        minutes = []
        for key, (votes, voters) in self.minutes.items():
            if votes:
                minute_ms, channel, vote_type = key.split("|")
                minutes.append([int(minute_ms), channel, vote_type, votes, voters])
        minutes.sort()
        return {"round_id": self.round_id, "episode_id": self.episode_id,
                "watermark_ms": self.watermark_ms, "final": self.final,
                "ledger_votes": self.ledger_votes, "counted_votes": self.counted_votes,
                "voters": self.voters,
                "invalid": {r: n for r, n in sorted(self.invalid.items()) if n},
                "minutes": minutes,
                "contestants": {c: pair for c, pair in sorted(self.contestants.items())
                                if pair[0]}}


class Fold:
    """An episode's rollups being extended: the parts of its rounds, the figures, and the
    voter rows the rows being folded touch (loaded as they are met, kept with their value
    before the fold so that only the difference is written)."""

    def __init__(self, episode: Any, earlier: list[str], parts: dict[str, Part],
                 figures: dict[str, list[int]], *, stored_voters: bool = True) -> None:
        self.episode_id: str = episode["episode_id"]
        self.earlier = earlier
        #: False when the stored rollups are being ignored (a checkpoint started over): the
        #: voter rows stored with them must not be read back either, or they count twice.
        self.stored_voters = stored_voters
        self.parts = parts
        self.figures: dict[str, list[int]] = defaultdict(lambda: [0, 0], figures)
        self.round_voters: dict[tuple[str, str], RoundVoter] = {}
        self.episode_voters: dict[str, EpisodeVoter] = {}
        #: The episode rows as stored before this fold (None: no row yet).
        self.before: dict[str, EpisodeVoter | None] = {}

    # -- loading ------------------------------------------------------------------------

    async def load_voters(self, connection: Connection, round_id: str,
                          users: Iterable[str]) -> None:
        """Load the round and episode rows of `users` not loaded yet."""
        wanted = sorted({u for u in users if (round_id, u) not in self.round_voters})
        if wanted and self.stored_voters:
            cursor = await connection.execute(store.ROUND_VOTERS_SQL, (round_id, wanted),
                                              prepare=False)
            for row in await cursor.fetchall():
                self.round_voters[(round_id, row["user_id"])] = RoundVoter.of(row)
        for user in wanted:
            self.round_voters.setdefault((round_id, user), RoundVoter())
        fresh = sorted({u for u in users if u not in self.episode_voters})
        if not fresh:
            return
        rows = []
        if self.stored_voters:
            cursor = await connection.execute(store.EPISODE_VOTERS_SQL,
                                              (self.episode_id, fresh), prepare=False)
            rows = await cursor.fetchall()
        for row in rows:
            voter = EpisodeVoter.of(row)
            self.episode_voters[row["user_id"]] = voter
            # Shallow: fold() replaces a field's value, never changes one in place.
            self.before[row["user_id"]] = copy.copy(voter)
        new = [u for u in fresh if u not in self.episode_voters]
        returning: set[str] = set()
        if new and self.earlier:
            cursor = await connection.execute(store.RETURNING_SQL, (self.earlier, new),
                                              prepare=False)
            returning = {row["user_id"] for row in await cursor.fetchall()}
        for user in new:
            self.episode_voters[user] = EpisodeVoter(returned=user in returning)
            self.before[user] = None

    # -- folding --------------------------------------------------------------------------

    def take_out(self, round_id: str, user: str) -> None:
        """Remove what the voter's rows of the round contributed (before folding them again
        with new verdicts). Their first GPS point and IP place stay: the same rows come back."""
        part = self.parts[round_id]
        voter = self.round_voters[(round_id, user)]
        episode = self.episode_voters[user]
        invalid = sum(voter.invalid.values())
        part.ledger_votes -= voter.counted + invalid
        part.counted_votes -= voter.counted
        for reason, votes in voter.invalid.items():
            part.invalid[reason] -= votes
        for key, votes in voter.buckets.items():
            part.minutes[key][0] -= votes
            part.minutes[key][1] -= 1
        for contestant, votes in voter.contestants.items():
            part.contestants[contestant][0] -= votes
            part.contestants[contestant][1] -= 1
        if voter.counted > 0:
            part.voters -= 1
            episode.rounds -= 1
        for name in _SUMS:
            setattr(episode, name, getattr(episode, name) - getattr(voter, name))
        self.round_voters[(round_id, user)] = RoundVoter(
            first_gps=voter.first_gps, ip_geo_ms=voter.ip_geo_ms, ip_geo=voter.ip_geo)

    def fold(self, round_id: str, row: Any) -> None:
        """Fold one judged ledger row (store.ROWS_SQL) into the part and its voter's rows."""
        part = self.parts[round_id]
        user = row["user_id"]
        voter = self.round_voters[(round_id, user)]
        episode = self.episode_voters[user]
        count, vote_type, channel = row["count"], row["vote_type"], row["channel"]
        admitted_ms = row["admitted_ms"]
        part.ledger_votes += count
        if vote_type == "FREE":
            voter.free_cast += count
            episode.free_cast += count
        if row["latitude"] is not None and row["longitude"] is not None:
            point = [float(admitted_ms), row["latitude"], row["longitude"]]
            voter.first_gps = _earliest(voter.first_gps, point)
            episode.first_gps = _earliest(episode.first_gps, point)
        if row["ip_geo"]:
            if voter.ip_geo_ms is None or admitted_ms < voter.ip_geo_ms:
                voter.ip_geo_ms, voter.ip_geo = admitted_ms, row["ip_geo"]
            if episode.ip_geo_ms is None or admitted_ms < episode.ip_geo_ms:
                episode.ip_geo_ms, episode.ip_geo = admitted_ms, row["ip_geo"]
        reason = row["reason"]
        if reason is not None:
            part.invalid[reason] += count
            voter.invalid[reason] = voter.invalid.get(reason, 0) + count
            return
        if voter.counted == 0:
            part.voters += 1
            episode.rounds += 1
        part.counted_votes += count
        for target in (voter, episode):  # plain branches: this runs once per ledger row
            target.counted += count
            if vote_type == "FREE":
                target.free += count
            elif vote_type == "PAID":
                target.paid += count
            elif vote_type == "PREMIUM_SMS":
                target.sms += count
            if channel == "APP":
                target.app += count
            elif channel == "WEB":
                target.web += count
        bucket = f"{admitted_ms - admitted_ms % 60_000}|{channel}|{vote_type}"
        if bucket not in voter.buckets:
            voter.buckets[bucket] = 0
            part.minutes[bucket][1] += 1
        voter.buckets[bucket] += count
        part.minutes[bucket][0] += count
        contestant = row["contestant_id"]
        if contestant not in voter.contestants:
            voter.contestants[contestant] = 0
            part.contestants[contestant][1] += 1
        voter.contestants[contestant] += count
        part.contestants[contestant][0] += count

    def settle(self) -> Touched:
        """Place the touched episode voters and bring the figures up to date; the touched
        voters' rows before and after."""
        touched = {user: (self.before[user], voter)
                   for user, voter in self.episode_voters.items()
                   if self.before[user] != voter}
        # Locating a point is the costly part (~30 us): only a voter whose first point moved.
        unplaced = [voter for old, voter in touched.values() if voter.first_gps is not None
                    and (old is None or old.first_gps != voter.first_gps)]
        for voter, (country, province) in zip(
                unplaced, locate([(v.first_gps[1], v.first_gps[2])  # type: ignore[index]
                                  for v in unplaced]), strict=True):
            voter.place = f"{country}/{province}"
        for old, voter in touched.values():
            if voter.first_gps is None and (old is None or old.ip_geo != voter.ip_geo):
                country, province = place_of_ip(voter.ip_geo)
                voter.place = f"{country}/{province}"
        for old, new in touched.values():
            for key, (voters, votes) in contributions(old).items():
                self.figures[key][0] -= voters
                self.figures[key][1] -= votes
            for key, (voters, votes) in contributions(new).items():
                self.figures[key][0] += voters
                self.figures[key][1] += votes
        return touched

    def figures_row(self) -> dict[str, list[int]]:
        return {k: v for k, v in sorted(self.figures.items()) if v[0] or v[1]}


# -- reading and writing ------------------------------------------------------------------


async def load_fold(connection: Connection, episode_id: str) -> Fold | None:
    """The episode's rollups as stored (None: no such episode)."""
    cursor = await connection.execute(store.EPISODE_SQL, (episode_id,))
    episode: Any = await cursor.fetchone()
    if episode is None:
        return None
    cursor = await connection.execute(store.EARLIER_EPISODES_SQL, {"episode": episode_id})
    earlier = [row["episode_id"] for row in await cursor.fetchall()]
    cursor = await connection.execute(store.EPISODE_PARTS_SQL, (episode_id,))
    parts = {row["round_id"]: Part.of(row) for row in await cursor.fetchall()}
    cursor = await connection.execute(store.FIGURES_SQL, (episode_id,))
    row: Any = await cursor.fetchone()
    return Fold(episode, earlier, parts, {} if row is None else row["figures"])


@dataclass
class Target:
    """Where a round's rollup may go now and by whose verdicts."""

    round_id: str
    finalized: bool
    #: Rows admitted before this may be folded (the checkpoint's watermark, or all rows).
    upto_ms: int


async def targets(connection: Connection, episode_id: str, live: bool) -> list[Target]:
    """The episode's rounds that take or took votes. `live`: a report's view, every row
    (those the checkpoint has not judged count provisionally); else the rollup's own, never
    past the checkpoint's watermark."""
    cursor = await connection.execute(store.ROLLUP_ROUNDS_SQL, (episode_id,))
    out = []
    for row in await cursor.fetchall():
        finalized = row["stored"]  # the final result's verdicts, whatever the round's state
        if finalized or live:
            upto = AFTER_ALL
        else:
            upto = BEFORE_ALL if row["checkpoint_ms"] is None else row["checkpoint_ms"]
        out.append(Target(row["round_id"], finalized, upto))
    return out


async def resets(connection: Connection, round_ids: list[str]) -> dict[str, set[str | None]]:
    cursor = await connection.execute(store.RESETS_SQL, (round_ids,))
    out: dict[str, set[str | None]] = defaultdict(set)
    for row in await cursor.fetchall():
        out[row["round_id"]].add(row["user_id"])
    return out


async def step(connection: Connection, fold: Fold, target: Target, pending: set[str | None],
               max_rows: int | None) -> bool:
    """Fold the next rows of one round (at most about `max_rows`; None: all up to the
    target), after taking out the voters judged again. True when the round reached its
    target."""
    part = fold.parts.setdefault(target.round_id, Part(target.round_id, fold.episode_id))
    lo = part.watermark_ms
    hi = target.upto_ms
    if max_rows is not None and hi > lo:
        cursor = await connection.execute(results_store.ADMITTED_BETWEEN,
                                          (target.round_id, lo, hi, max_rows), prepare=False)
        found: Any = await cursor.fetchone()
        if found is not None:
            hi = max(found["admitted_ms"], lo + 1)
    users = sorted(u for u in pending if u is not None)
    if users:
        await fold.load_voters(connection, target.round_id, users)
        for user in users:
            fold.take_out(target.round_id, user)
    if hi > lo or users:
        cursor = await connection.execute(
            store.ROWS_SQL, {"round": target.round_id, "lo": lo, "hi": max(hi, lo),
                             "users": users, "finalized": target.finalized}, prepare=False)
        rows: list[Any] = await cursor.fetchall()
        await fold.load_voters(connection, target.round_id, {r["user_id"] for r in rows})
        for row in rows:
            fold.fold(target.round_id, row)
    part.watermark_ms = max(lo, hi)
    part.final = target.finalized and part.watermark_ms >= AFTER_ALL
    return part.watermark_ms >= target.upto_ms


async def write(connection: Connection, fold: Fold,
                touched: Touched) -> None:
    """Store what the fold changed: the parts, the touched voter rows, the figures."""
    for part in fold.parts.values():
        row = part.row()
        await connection.execute(store.SAVE_PART_SQL, {
            **row, "invalid": json.dumps(row["invalid"]), "minutes": json.dumps(row["minutes"]),
            "contestants": json.dumps(row["contestants"])})
    # orjson: the standard encoder took a tenth of a step's time.
    round_names = _names(RoundVoter)
    round_rows = [{"round_id": round_id, "user_id": user, **{
        name: getattr(voter, name) for name in round_names}}
        for (round_id, user), voter in fold.round_voters.items()]
    if round_rows:
        await connection.execute(store.SAVE_ROUND_VOTERS_SQL,
                                 (orjson.dumps(round_rows).decode(),), prepare=False)
    episode_names = _names(EpisodeVoter)
    episode_rows = [{"episode_id": fold.episode_id, "user_id": user, **{
        name: getattr(voter, name) for name in episode_names}}
        for user, (_, voter) in touched.items()]
    if episode_rows:
        await connection.execute(store.SAVE_EPISODE_VOTERS_SQL,
                                 (orjson.dumps(episode_rows).decode(),), prepare=False)
    await connection.execute(store.SAVE_FIGURES_SQL,
                             (fold.episode_id, json.dumps(fold.figures_row())))


def episode_session(connection: Connection, episode_id: str, *,
                    wait: bool) -> contextlib.AbstractAsyncContextManager[bool]:
    """The episode's rollup lock, held by the session across its steps' transactions (one
    replica folds an episode at a time). `wait` False: yield False at once if another replica
    holds it."""
    return locks.session_lock(connection, f"televote.report-rollup:{episode_id}", wait=wait)


@contextlib.asynccontextmanager
async def snapshot(connection: Connection) -> AsyncIterator[None]:
    """One REPEATABLE READ transaction: the checkpoint, its verdicts, the ledger and the
    resets as of one moment."""
    from psycopg import IsolationLevel
    await connection.set_isolation_level(IsolationLevel.REPEATABLE_READ)
    try:
        async with connection.transaction():
            yield
    finally:
        await connection.set_isolation_level(None)


async def _plan(connection: Connection, episode_id: str, live: bool
                ) -> tuple[Fold, list[Target], dict[str, set[str | None]], bool] | None:
    """The episode's stored rollups, its rounds' targets (`targets`), the resets logged per
    round, and whether they start over (a checkpoint started over: its verdicts below its old
    watermark may all differ); None: no such episode."""
    fold = await load_fold(connection, episode_id)
    if fold is None:
        return None
    goals = await targets(connection, episode_id, live)
    logged = await resets(connection, [g.round_id for g in goals])
    return fold, goals, logged, any(None in users for users in logged.values())


async def extend(connection: Connection, episode_id: str, max_rows: int) -> bool:
    """One step of the episode's rollups, stored, in the connection's (REPEATABLE READ)
    transaction: the resets, then up to `max_rows` rows of the first round behind its
    target. True when every round reached its target."""
    plan = await _plan(connection, episode_id, live=False)
    if plan is None:
        return True
    fold, goals, logged, start_over = plan
    if start_over:
        for statement in store.FORGET_EPISODE_SQL:
            await connection.execute(statement, (episode_id,))
        await connection.execute(store.FORGET_RESETS_SQL, ([g.round_id for g in goals],))
        return False
    for goal in goals:
        part = fold.parts.get(goal.round_id)
        pending = logged.get(goal.round_id, set())
        if part is not None and part.final:  # nothing changes a stored result's verdicts
            if pending:
                await connection.execute(store.FORGET_RESETS_SQL, ([goal.round_id],))
            continue
        if part is not None and part.watermark_ms >= goal.upto_ms and not pending \
                and part.final == goal.finalized:
            continue
        reached = await step(connection, fold, goal, pending, max_rows)
        touched = fold.settle()
        await write(connection, fold, touched)
        if pending:
            await connection.execute(store.FORGET_RESETS_SQL, ([goal.round_id],))
        return reached and goal is goals[-1]
    return True


async def tail(connection: Connection, episode_id: str
               ) -> tuple[Fold, Touched] | None:
    """The episode's rollups as stored, extended in memory to every row of the ledger (rows
    the checkpoint has not judged yet count provisionally), in the connection's transaction:
    a live report's figures. Nothing is written. Also the voter rows the tail changed."""
    plan = await _plan(connection, episode_id, live=True)
    if plan is None:
        return None
    fold, goals, logged, start_over = plan
    if start_over:
        fold = Fold({"episode_id": episode_id}, fold.earlier, {}, {}, stored_voters=False)
        logged = {}
    for goal in goals:
        part = fold.parts.get(goal.round_id)
        if part is not None and part.final:
            continue
        await step(connection, fold, goal, logged.get(goal.round_id, set()), None)
    return fold, fold.settle()
