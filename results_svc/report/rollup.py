"""The report's rollups, kept as votes commit: each ledger row is read once, in steps behind
the result checkpoint, and folded by set-based SQL (`store.FOLD_VOTERS_SQL`: one INSERT ...
SELECT ... GROUP BY ... ON CONFLICT per table and step) into

- the round's part, as cells (`report_round_cells`: counted votes and distinct voters, per
  timeline bucket, per contestant, in all; votes not counted per reason);
- the voter's row of the round (`report_round_voters`: counted votes by type and channel, free
  votes cast, first GPS point and IP place, and what they added to each cell of the part, so
  that a voter is counted once per cell and a voter judged again can be taken out and folded
  again);
- the voter's row of the episode (`report_episode_voters`: the sum of their round rows, their
  place, whether they voted in an earlier episode of the show, the profile they declared);
- the episode's figures (`report_episode_figures`), moved by the difference of the touched
  voter rows' contributions (`store.figures_sql`, the same SQL that derives the figures
  from scratch), the demographic segments among them;

so that a report reads a few rows per round and per figure, whatever the number of votes and
voters.

Why a row counts is the result checkpoint's verdict (`round_checkpoint_invalid`, rows below its
watermark; results_svc/checkpoint.py), or the final result's once the round is finalized: the
rollup of a round never passes its checkpoint's watermark, and is final when it has folded
every row with the final verdicts. What changes verdicts already folded is logged by the
checkpoint in its own transaction (`report_rollup_resets`): voters judged again (a late fraud
rejection, a credit) are taken out and their rows folded again; a checkpoint dropped and
rebuilt (or a result recounted in full) starts the episode's rollups over. A voter who declares
or changes a profile is moved between segments at the next step (profiles changed since the
last comparison are compared with the episode's voter rows); a voter whose having a counted
vote changes has their later episodes' "returning" rechecked.

Who folds: any results_svc replica (`Reports.follow`), one per episode at a time (a session
advisory lock), each step one REPEATABLE READ transaction, so the checkpoint, its verdicts,
the ledger rows and the resets are read in one snapshot. A live report takes the same lock and
does the same steps to the end of the ledger (rows the checkpoint has not judged yet count
provisionally) in a savepoint it rolls back (`live_view`), so it is exact at the moment it is
computed and writes nothing.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from psycopg import AsyncConnection

from results_svc import store as results_store
from results_svc.report import store
from results_svc.report.places import locate, place_of_ip
from runtime import locks

Connection = AsyncConnection[Any]

BEFORE_ALL = -(2**62)
AFTER_ALL = 2**62
FREE_CAST_CAP = store.FREE_CAST_CAP


def distribution_bucket(counted: int) -> str:
    """The votes-per-voter bucket of a voter's counted votes (report.DISTRIBUTION; the SQL
    of `store.figures_sql` from the same table)."""
    for top, label in store.DISTRIBUTION_TOPS:
        if counted <= top:
            return label
    return store.DISTRIBUTION_OVER


@dataclass
class View:
    """The episode's rollups as read: each round's part (as `part_row` makes it) and the
    figures {figure: [voters, votes]}."""

    parts: dict[str, dict[str, Any]]
    figures: dict[str, list[int]]


def part_row(round_id: str, watermark_ms: int, final: bool,
             cells: list[tuple[str, str, int, int]]) -> dict[str, Any]:
    """A round's part from its cells (kind, key, votes, voters): ledger and counted votes,
    distinct voters with a counted vote, votes not counted by reason, timeline buckets
    [[minute_ms, channel, type, votes, voters]], contestants {id: [votes, voters]}."""
    counted = voters = 0
    invalid: dict[str, int] = {}
    minutes = []
    contestants: dict[str, list[int]] = {}
    for kind, key, votes, n in cells:
        if not votes:
            continue
        if kind == "v":
            counted, voters = votes, n
        elif kind == "i":
            invalid[key] = votes
        elif kind == "m":
            minute_ms, channel, vote_type = key.split("|")
            minutes.append([int(minute_ms), channel, vote_type, votes, n])
        elif kind == "c":
            contestants[key] = [votes, n]
    minutes.sort()
    return {"round_id": round_id, "watermark_ms": watermark_ms, "final": final,
            "ledger_votes": counted + sum(invalid.values()), "counted_votes": counted,
            "voters": voters, "invalid": dict(sorted(invalid.items())), "minutes": minutes,
            "contestants": dict(sorted(contestants.items()))}


async def load(connection: Connection, episode_id: str) -> View:
    """The episode's rollups as stored (or as extended in the connection's transaction)."""
    cursor = await connection.execute(store.PARTS_SQL, (episode_id,))
    headers: dict[str, tuple[int, bool]] = {}
    cells: dict[str, list[tuple[str, str, int, int]]] = defaultdict(list)
    for row in await cursor.fetchall():
        headers[row["round_id"]] = (row["watermark_ms"], row["final"])
        if row["kind"] is not None:
            cells[row["round_id"]].append((row["kind"], row["key"], row["votes"],
                                           row["voters"]))
    cursor = await connection.execute(store.FIGURES_SQL, (episode_id,))
    figures = {row["figure"]: [row["voters"], row["votes"]]
               for row in await cursor.fetchall()}
    return View({round_id: part_row(round_id, *header, cells[round_id])
                 for round_id, header in headers.items()}, dict(sorted(figures.items())))


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


@dataclass
class Episode:
    """What a step needs of its episode: the show's earlier and later episodes."""

    episode_id: str
    earlier: list[str]
    later: list[str]

    @classmethod
    async def read(cls, connection: Connection, episode_id: str) -> Episode:
        params = {"episode": episode_id}
        found = []
        for sql in (store.EARLIER_EPISODES_SQL, store.LATER_EPISODES_SQL):
            cursor = await connection.execute(sql, params)
            found.append([row["episode_id"] for row in await cursor.fetchall()])
        return cls(episode_id, *found)


async def begin(connection: Connection, episode: Episode) -> None:
    """Start a step: its working tables empty, and the voters whose profile changed touched."""
    await connection.execute(store.FOLD_TABLES_SQL)
    cursor = await connection.execute(store.ROLLUP_STATE_SQL, (episode.episode_id,))
    state: Any = await cursor.fetchone()
    if state is not None:
        await connection.execute(store.TOUCH_PROFILES_SQL, {
            "episode": episode.episode_id, "since": state["since"]}, prepare=False)
        await connection.execute(store.KEEP_OLD_SQL)
        await connection.execute(store.REFRESH_PROFILES_SQL)
    await connection.execute(store.SAVE_ROLLUP_STATE_SQL, (episode.episode_id,))


async def step(connection: Connection, episode: Episode, target: Target, watermark_ms: int,
               pending: set[str | None], max_rows: int | None) -> bool:
    """Fold the next rows of one round from `watermark_ms` (at most about `max_rows`; None:
    all up to the target), after taking out the voters judged again. True when the round
    reached its target."""
    lo = watermark_ms
    hi = target.upto_ms
    if max_rows is not None and hi > lo:
        cursor = await connection.execute(results_store.ADMITTED_BETWEEN,
                                          (target.round_id, lo, hi, max_rows), prepare=False)
        found: Any = await cursor.fetchone()
        if found is not None:
            hi = max(found["admitted_ms"], lo + 1)
    hi = max(hi, lo)
    ledger_hi = hi
    if hi >= AFTER_ALL > lo:  # the ledger's end: the planner then knows how few rows are left
        cursor = await connection.execute(store.LAST_ADMITTED_SQL, (target.round_id, lo))
        last: Any = await cursor.fetchone()
        ledger_hi = lo if last is None else last["admitted_ms"] + 1
    params = {"round": target.round_id, "episode": episode.episode_id, "lo": lo, "hi": ledger_hi,
              "users": sorted(u for u in pending if u is not None),
              "finalized": target.finalized, "earlier": episode.earlier,
              "final": target.finalized and hi >= AFTER_ALL, "watermark_ms": lo}
    await connection.execute(store.SAVE_PART_SQL, {**params, "final": False})  # its cells'
    if params["users"]:  # kept as they were, then taken out
        await connection.execute(store.TOUCH_USERS_SQL, params, prepare=False)
        await connection.execute(store.KEEP_OLD_SQL)
        for statement in store.TAKE_OUT_SQL:
            await connection.execute(statement, params, prepare=False)
    if ledger_hi > lo or params["users"]:
        cursor = await connection.execute(store.FOLD_VOTERS_SQL, params, prepare=False)
        await _locate(connection, episode, await cursor.fetchall())
    await connection.execute(store.SAVE_PART_SQL, {**params, "watermark_ms": hi})
    return hi >= target.upto_ms


async def _locate(connection: Connection, episode: Episode, unplaced: list[Any]) -> None:
    """Place voter rows whose first GPS point (or, without one, first IP place) moved."""
    located = iter(locate([(row["first_gps"][1], row["first_gps"][2])
                           for row in unplaced if row["first_gps"] is not None]))
    places = []
    for row in unplaced:
        country, province = next(located) if row["first_gps"] is not None \
            else place_of_ip(row["ip_geo"])
        places.append(f"{country}/{province}")
    if unplaced:
        await connection.execute(store.SAVE_PLACES_SQL, {
            "episode": episode.episode_id, "users": [row["user_id"] for row in unplaced],
            "places": places}, prepare=False)


async def settle(connection: Connection, episode: Episode) -> None:
    """Finish a step: the touched voters' later episodes' returning voters rechecked, and the
    figures moved by the difference of the touched rows after and before."""
    if episode.later:
        params = {"episode": episode.episode_id, "later": episode.later}
        await connection.execute(store.TOUCH_LATER_SQL, params)
        await connection.execute(store.KEEP_OLD_SQL)
        await connection.execute(store.RECHECK_RETURNING_SQL, params)
    await connection.execute(store.FIGURES_DELTA_SQL)


async def extend(connection: Connection, episode_id: str, max_rows: int | None, *,
                 live: bool = False) -> bool:
    """One step of the episode's rollups, in the connection's (REPEATABLE READ)
    transaction: the resets, then up to `max_rows` rows (None: all) of the first round behind
    its target (`live`: every row of the ledger, as a live report sees it). True when every
    round reached its target."""
    cursor = await connection.execute(store.PART_HEADERS_SQL, (episode_id,))
    parts = {row["round_id"]: (row["watermark_ms"], row["final"])
             for row in await cursor.fetchall()}
    episode = await Episode.read(connection, episode_id)
    goals = await targets(connection, episode_id, live)
    logged = await resets(connection, [g.round_id for g in goals])
    await begin(connection, episode)
    if any(None in users for users in logged.values()):  # a checkpoint started over
        for statement in store.FORGET_EPISODE_SQL:
            await connection.execute(statement, {"episode": episode_id})
        await settle(connection, episode)  # this episode's figures to zero, later ones kept
        await connection.execute(store.FORGET_FIGURES_SQL, {"episode": episode_id})
        await connection.execute(store.FORGET_RESETS_SQL, ([g.round_id for g in goals],))
        return False
    for goal in goals:
        watermark_ms, final = parts.get(goal.round_id, (BEFORE_ALL, False))
        pending = logged.get(goal.round_id, set())
        if final:  # nothing changes a stored result's verdicts
            if pending:
                await connection.execute(store.FORGET_RESETS_SQL, ([goal.round_id],))
            continue
        if goal.round_id in parts and watermark_ms >= goal.upto_ms and not pending \
                and final == goal.finalized:
            continue
        reached = await step(connection, episode, goal, watermark_ms, pending, max_rows)
        await settle(connection, episode)
        if pending:
            await connection.execute(store.FORGET_RESETS_SQL, ([goal.round_id],))
        return reached and goal is goals[-1]
    await settle(connection, episode)  # profile changes alone
    return True


async def live_view(connection: Connection, episode_id: str) -> View:
    """The episode's rollups extended to every row of the ledger (rows the checkpoint has not
    judged yet count provisionally), in the connection's transaction. The caller holds the
    episode's rollup lock and rolls the extension back (a live report's figures)."""
    while not await extend(connection, episode_id, None, live=True):
        pass
    return await load(connection, episode_id)


def episode_session(connection: Connection, episode_id: str, *,
                    wait: bool) -> contextlib.AbstractAsyncContextManager[bool]:
    """The episode's rollup lock, held by the session across its steps' transactions (one
    replica folds an episode at a time; a live report holds it while it extends the rollups
    in a transaction it rolls back). `wait` False: yield False at once if another holds it."""
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
