"""ReportService's cost on a generated episode of N votes (default 1 M; target: <= 2 s at 10 M).

Generates an ENDED episode of three FINALIZED 30-minute rounds straight into a private
PostgreSQL (server-side INSERT ... SELECT over generate_series, indexes built after the load,
as a restore would), with ~N/8 voters, GPS for most app votes (towns of every province, some
abroad), an IP place for half of the others, profiles for a third of the voters, then times:

- fold: the rollups (results_svc/report/rollup.py) folding every ledger row in steps of
  RESULTS_REPORT_ROLLUP_ROWS (set-based SQL, one transaction a step), as a results_svc replica
  does behind the result checkpoint while the show is live (a background cost per vote, paid
  once); with --stepped N only the last N rows are folded in steps and timed, the rows before
  them in one step a round (what a start-over does; timed apart as "bulk");
- live: a provisional report with the last round OPEN and the episode LIVE, whose rollup is
  TAIL rows behind the ledger (the rows the checkpoint has not judged yet: about a second of
  votes at a peak of 10,000 a second), which the report folds by the same steps in a
  savepoint it rolls back;
- final: the final report computed from the rollups (what the precompute pays when the
  episode ends);
- stored: a final report served as stored.

    python -m bench.report_bench --votes 1000000
    python -m bench.report_bench --votes 3000000 --state-dir /tmp/report-bench
    python -m bench.report_bench --votes 10000000 --stepped 400000

The data is kept in --state-dir and reused when a run asks for the same number of votes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import psycopg

from ops.infra import start_postgres
from ops.migrate import migrate
from results_svc.report import places, rollup, store
from results_svc.report.report import Reports
from runtime.places import PROVINCES
from runtime.storage import Storage, create_pool

ROUNDS = 3
CONTESTANTS = 6
WINDOW_MS = 30 * 60_000
CHUNK = 1_000_000

#: A town in every province, to scatter GPS points around (lat, lon).
TOWNS = [(11.56, 104.92), (13.10, 103.20), (13.36, 103.86), (10.61, 103.52), (12.00, 105.46),
         (12.25, 104.67), (11.46, 104.52), (12.71, 104.89), (10.61, 104.18), (11.48, 104.94),
         (11.62, 102.98), (12.49, 106.02), (12.45, 107.19), (13.80, 104.98), (11.48, 105.33),
         (12.54, 103.92), (13.74, 106.99), (13.52, 105.97), (11.09, 105.80), (10.99, 104.78),
         (14.18, 103.52), (10.48, 104.32), (12.85, 102.61), (13.58, 102.97), (11.99, 105.65)]
ABROAD = [(13.76, 100.50), (21.03, 105.85), (48.86, 2.35), (40.71, -74.01), (-33.87, 151.21)]

_DROP = """
ALTER TABLE votes DISABLE TRIGGER votes_appends;
ALTER TABLE votes DROP CONSTRAINT IF EXISTS votes_user_id_request_id_key;
DROP INDEX IF EXISTS votes_by_round, votes_by_vote_id, votes_by_round_order, votes_unscored;
"""
_INDEXES = """
ALTER TABLE votes ADD CONSTRAINT votes_user_id_request_id_key UNIQUE (user_id, request_id);
CREATE INDEX votes_by_round ON votes (round_id, contestant_id);
CREATE INDEX votes_by_vote_id ON votes (vote_id);
CREATE INDEX votes_by_round_order ON votes (round_id, admitted_ms, vote_id);
CREATE INDEX votes_unscored ON votes (admitted_ms, vote_id) WHERE fraud_action = 'UNSCORED';
ALTER TABLE votes ENABLE TRIGGER votes_appends;
"""

#: One chunk of a round's votes. A voter's place follows from their number: ~55 % GPS near a
#: province town, 5 % abroad, 20 % an IP place (a province), the rest unknown.
_VOTES = """
INSERT INTO votes (vote_id, request_id, user_id, shard, round_id, episode_id, contestant_id,
                   vote_type, count, channel, admitted_ms, admitted_at, fraud_action,
                   latitude, longitude, ip_geo, fingerprint, leaf_data, receipt_hash)
SELECT gen_random_uuid(), %(tag)s || g, 'u' || u, (u %% 1024)::smallint, %(round)s::uuid,
       %(episode)s::uuid, (%(contestants)s::uuid[])[1 + (g * 7 + u) %% %(n_contestants)s],
       kind, CASE WHEN kind = 'PAID' AND g %% 7 = 0 THEN 5 ELSE 1 END,
       CASE WHEN kind = 'PREMIUM_SMS' THEN 'SMS' WHEN u %% 10 < 7 THEN 'APP' ELSE 'WEB' END,
       at_ms, to_timestamp(at_ms / 1000.0), 'ALLOW',
       CASE WHEN u %% 20 < 11 THEN (%(towns)s::float8[])[1 + u %% 25][1]
                                   + ((u / 25) %% 100 - 50) / 400.0
            WHEN u %% 20 = 11 THEN (%(abroad)s::float8[])[1 + u %% 5][1] END,
       CASE WHEN u %% 20 < 11 THEN (%(towns)s::float8[])[1 + u %% 25][2]
                                   + ((u / 2500) %% 100 - 50) / 400.0
            WHEN u %% 20 = 11 THEN (%(abroad)s::float8[])[1 + u %% 5][2] END,
       CASE WHEN u %% 20 >= 16 THEN 'KH-' || (1 + u %% 25) END,
       '\\x0000000000000000000000000000000000000000000000000000000000000000'::bytea,
       convert_to(repeat('x', 260), 'UTF8'),
       '\\x0000000000000000000000000000000000000000000000000000000000000000'::bytea
  FROM (SELECT g, (floor(%(voters)s * power(random(), 1.6)))::bigint AS u,
               CASE WHEN g %% 10 < 6 THEN 'FREE' WHEN g %% 10 < 9 THEN 'PAID'
                    ELSE 'PREMIUM_SMS' END AS kind,
               %(opens)s + floor(%(window)s * power(random(), 1.3))::bigint AS at_ms
          FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) g) s
"""


async def generate(url: str, votes: int) -> str:
    """The episode id of a generated episode of `votes` ledger rows (reused if present)."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as db:
        found = await (await db.execute(
            "SELECT episode_id::text FROM episodes WHERE title = %s", (f"bench {votes}",)
        )).fetchone()
        if found is not None:
            return str(found[0])
        show, episode = str(uuid.uuid4()), str(uuid.uuid4())
        contestants = [str(uuid.uuid4()) for _ in range(CONTESTANTS)]
        await db.execute("INSERT INTO shows (show_id, name) VALUES (%s, 'bench')", (show,))
        await db.execute(
            "INSERT INTO episodes (episode_id, show_id, title, state, free_vote_quota,"
            " rate_limit_per_minute, started_at, ended_at)"
            " VALUES (%s, %s, %s, 'ENDED', 5, 100, now() - interval '3 hours', now())",
            (episode, show, f"bench {votes}"))
        for number, contestant in enumerate(contestants, start=1):
            await db.execute(
                "INSERT INTO contestants (contestant_id, episode_id, name, sms_number)"
                " VALUES (%s, %s, %s, %s)", (contestant, episode, f"Singer {number}", number))
        await db.execute(_DROP)
        voters = max(1, votes // 8)
        start_ms = int(time.time() * 1000) - 3 * 3600_000
        done = 0
        for index in range(ROUNDS):
            round_id = str(uuid.uuid4())
            opens = start_ms + index * 3600_000
            await db.execute(
                "INSERT INTO rounds (round_id, episode_id, name, contestant_ids, window_ms,"
                " visibility, state, opens_at, closes_at, lines_close_at, closed_at)"
                " VALUES (%s, %s, %s, %s::uuid[], %s, 'RESULTS_VISIBILITY_PUBLIC_COUNTS',"
                " 'FINALIZED', to_timestamp(%s / 1000.0), to_timestamp(%s / 1000.0),"
                " to_timestamp(%s / 1000.0), to_timestamp(%s / 1000.0))",
                (round_id, episode, f"Round {index + 1}", contestants, WINDOW_MS, opens,
                 opens + WINDOW_MS, opens + WINDOW_MS, opens + WINDOW_MS))
            await db.execute(
                "INSERT INTO performances (performance_id, episode_id, contestant_id,"
                " started_at, ended_at) VALUES (%s, %s, %s, to_timestamp(%s / 1000.0),"
                " to_timestamp(%s / 1000.0))",
                (str(uuid.uuid4()), episode, contestants[index], opens - 300_000, opens))
            in_round = votes // ROUNDS + (votes % ROUNDS if index == ROUNDS - 1 else 0)
            for lo in range(done, done + in_round, CHUNK):
                hi = min(lo + CHUNK, done + in_round) - 1
                started = time.monotonic()
                await db.execute(_VOTES, {
                    "round": round_id, "episode": episode, "contestants": contestants,
                    "n_contestants": CONTESTANTS, "towns": [list(t) for t in TOWNS],
                    "abroad": [list(t) for t in ABROAD], "voters": voters, "opens": opens,
                    "window": WINDOW_MS, "lo": lo, "hi": hi, "tag": f"r{episode[:8]}-"})
                print(f"  round {index + 1}: rows {lo:,}..{hi:,} in "
                      f"{time.monotonic() - started:.1f}s", flush=True)
            done += in_round
        started = time.monotonic()
        await db.execute(_INDEXES)
        await db.execute(
            "INSERT INTO voter_profiles (user_id, age_band, gender, province)"
            " SELECT 'u' || u, (ARRAY['18-24','25-34','35-44','45-54','55+','under-18'])"
            "   [1 + u %% 6], (ARRAY['female','male','other'])[1 + u %% 3],"
            "   (%s::text[])[1 + u %% 25] FROM generate_series(0, %s) u WHERE u %% 3 = 0"
            " ON CONFLICT (user_id) DO NOTHING",  # voters of another generated episode
            (list(PROVINCES.values()), voters))
        await db.execute("VACUUM ANALYZE votes")
        print(f"  indexes, profiles, vacuum in {time.monotonic() - started:.1f}s", flush=True)
        return episode


def _postgres_cpu(data_dir: Path | None) -> float:
    """CPU seconds of the bench's private PostgreSQL (postmaster and every backend): on a
    shared machine the steady figure, where wall time is whatever the neighbours leave."""
    if data_dir is None:
        return 0.0
    postmaster = psutil.Process(int((data_dir / "postmaster.pid").read_text().split()[0]))
    total = 0.0
    for process in [postmaster, *postmaster.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system
    return total


class Clock:
    """Wall time, this process's CPU and PostgreSQL's CPU of one step."""

    def __init__(self, data_dir: Path | None) -> None:
        self._data_dir = data_dir

    def __enter__(self) -> Clock:
        self._wall, self._cpu = time.monotonic(), time.process_time()
        self._pg = _postgres_cpu(self._data_dir)
        return self

    def __exit__(self, *_: object) -> None:
        self.wall = time.monotonic() - self._wall
        self.cpu = time.process_time() - self._cpu
        self.pg = _postgres_cpu(self._data_dir) - self._pg


def _config(rows_per_step: int) -> Any:
    return SimpleNamespace(results_report_min_voters=10, results_report_provisional_ms=0,
                           results_report_warning_s=60, results_report_precompute_ms=0,
                           results_report_rollup_ms=0, results_report_rollup_rows=rows_per_step)


async def _fold(pool: Any, episode: str, round_id: str, upto_ms: int,
                rows_per_step: int | None) -> None:
    """Fold a round's rows below `upto_ms` into the rollups, one step per transaction, as the
    rollup follows a checkpoint whose watermark is there (the generated rounds have none)."""
    target = rollup.Target(round_id, False, upto_ms)
    async with pool.connection() as db:
        about = await rollup.Episode.read(db, episode)
    while True:
        async with pool.connection() as db, rollup.snapshot(db):
            cursor = await db.execute(store.PART_HEADERS_SQL, (episode,))
            watermarks = {row["round_id"]: row["watermark_ms"] for row in await cursor.fetchall()}
            await rollup.begin(db, about)
            done = await rollup.step(db, about, target,
                                     watermarks.get(round_id, rollup.BEFORE_ALL), set(),
                                     rows_per_step)
            await rollup.settle(db, about)
        if done:
            return


_FORGET = (
    "DELETE FROM episode_reports WHERE episode_id = %(episode)s",
    *(f"DELETE FROM {table} WHERE episode_id = %(episode)s"
      for table in ("report_round_parts", "report_episode_voters", "report_episode_figures",
                    "report_episode_rollups")),
)


async def measure(url: str, episode: str, data_dir: Path | None = None, tail: int = 10_000,
                  rows_per_step: int = 20_000, stepped: int | None = None) -> dict[str, Any]:
    """`stepped`: fold only the last this many rows (before the tail) in steps of
    `rows_per_step`, the rows before them in one step per round (None: every row in steps)."""
    pool = create_pool(url, 1, 4)
    await pool.open()
    storage: Any = Storage(pool=pool, redis=None)  # type: ignore[arg-type]
    try:
        async with pool.connection() as db:
            for statement in _FORGET:
                await db.execute(statement, {"episode": episode})
            rounds: list[str] = [str(row["round_id"]) for row in await (await db.execute(
                store.ROUNDS_SQL, (episode,))).fetchall()]
            edges: list[int] = []
            for offset in (tail, tail + (stepped or 0)):
                edge: Any = await (await db.execute(
                    "SELECT admitted_ms FROM votes WHERE round_id = %s"
                    " ORDER BY admitted_ms DESC OFFSET %s LIMIT 1", (rounds[-1], offset))
                ).fetchone()
                edges.append(edge["admitted_ms"])
            last, first_stepped = edges
        started = time.monotonic()
        places.warm()
        gazetteer = time.monotonic() - started
        with Clock(data_dir) as bulk:
            if stepped is not None:
                for round_id in rounds:
                    upto = first_stepped if round_id == rounds[-1] else rollup.AFTER_ALL
                    await _fold(pool, episode, round_id, upto, None)
        with Clock(data_dir) as fold:
            for round_id in rounds:
                upto = last if round_id == rounds[-1] else rollup.AFTER_ALL
                await _fold(pool, episode, round_id, upto, rows_per_step)
        async with pool.connection() as db:
            folded: Any = await (await db.execute(
                "SELECT count(*) AS n FROM votes WHERE round_id = %s AND admitted_ms >= %s"
                " AND admitted_ms < %s", (rounds[-1], first_stepped, last))).fetchone()
        async with pool.connection() as db:
            await db.execute("UPDATE episodes SET state = 'LIVE' WHERE episode_id = %s",
                             (episode,))
            await db.execute("UPDATE rounds SET state = 'OPEN' WHERE round_id = %s",
                             (rounds[-1],))
        with Clock(data_dir) as live:
            provisional = await Reports(storage, _config(rows_per_step)).episode_report(episode)
        assert not provisional.is_final
        async with pool.connection() as db:
            await db.execute("UPDATE episodes SET state = 'ENDED' WHERE episode_id = %s",
                             (episode,))
            await db.execute("UPDATE rounds SET state = 'FINALIZED' WHERE round_id = %s",
                             (rounds[-1],))
        await _fold(pool, episode, rounds[-1], rollup.AFTER_ALL, rows_per_step)
        with Clock(data_dir) as final:
            report = await Reports(storage, _config(rows_per_step)).episode_report(episode)
        with Clock(data_dir) as stored:
            again = await Reports(storage, _config(rows_per_step)).episode_report(episode)
        assert again == report and report.is_final
        assert provisional.summary.counted_votes == report.summary.counted_votes
        assert provisional.summary.unique_voters == report.summary.unique_voters
        async with pool.connection() as db:
            row: Any = await (await db.execute(
                "SELECT count(*) AS n FROM report_episode_voters WHERE episode_id = %s",
                (episode,))).fetchone()
        rows = report.summary.ledger_votes  # votes; the ledger rows are counted below
        async with pool.connection() as db:
            ledger: Any = await (await db.execute(
                "SELECT count(*) AS n FROM votes WHERE episode_id = %s", (episode,))).fetchone()
        stepped_rows = ledger["n"] - tail if stepped is None else folded["n"]
        return {"ledger_rows": ledger["n"], "votes": rows,
                "counted": report.summary.counted_votes,
                "voters": report.summary.unique_voters, "episode_voter_rows": row["n"],
                "fold_s": round(fold.wall, 1), "fold_pg_cpu_s": round(fold.pg, 1),
                "fold_client_cpu_s": round(fold.cpu, 1),
                "fold_us_per_row": round(1e6 * (fold.pg + fold.cpu) / max(1, stepped_rows), 1),
                "stepped_rows": stepped_rows, "bulk_s": round(bulk.wall, 1),
                "bulk_pg_cpu_s": round(bulk.pg, 1), "bulk_client_cpu_s": round(bulk.cpu, 1),
                "tail_rows": tail, "live_s": round(live.wall, 3),
                "live_pg_cpu_s": round(live.pg, 3), "live_client_cpu_s": round(live.cpu, 3),
                "final_s": round(final.wall, 3), "final_pg_cpu_s": round(final.pg, 3),
                "final_client_cpu_s": round(final.cpu, 3),
                "gazetteer_load_s": round(gazetteer, 2), "stored_s": round(stored.wall, 4),
                "timeline_buckets": len(report.timeline), "places": len(report.geography)}
    finally:
        await pool.close()


async def run(votes: int, state_dir: Path, database_url: str | None,
              tail: int, stepped: int | None) -> dict[str, Any]:
    child = None
    if database_url is None:
        await asyncio.to_thread(state_dir.mkdir, parents=True, exist_ok=True)
        child, database_url = await start_postgres(state_dir)
    try:
        await asyncio.to_thread(migrate, database_url)
        started = time.monotonic()
        episode = await generate(database_url, votes)
        print(f"episode of {votes:,} votes ready in {time.monotonic() - started:.0f}s",
              flush=True)
        figures = await measure(database_url, episode,
                                None if child is None else state_dir / "postgres", tail,
                                stepped=stepped)
        figures["load_average_1m"] = os.getloadavg()[0]
        return figures
    finally:
        if child is not None:
            await child.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--votes", type=int, default=1_000_000)
    parser.add_argument("--state-dir", type=Path, default=Path("/tmp/televote-report-bench"))
    parser.add_argument("--database-url", default=None,
                        help="an existing PostgreSQL to generate into (default: a private one)")
    parser.add_argument("--tail", type=int, default=10_000,
                        help="ledger rows the live report folds itself (default 10,000)")
    parser.add_argument("--stepped", type=int, default=None, help=(
        "fold only the last this many rows before the tail in steps, and the rows before them"
        " in one step per round (default: every row in steps)"))
    args = parser.parse_args()
    figures = asyncio.run(run(args.votes, args.state_dir, args.database_url, args.tail,
                              args.stepped))
    print(json.dumps(figures))
    print(f"report of {figures['ledger_rows']:,} ledger rows ({figures['voters']:,} voters):"
          f" fold of {figures['stepped_rows']:,} rows in steps {figures['fold_s']} s"
          f" ({figures['fold_us_per_row']} us of CPU a row, PostgreSQL and here); live with a"
          f" {figures['tail_rows']:,}-row tail "
          f"{figures['live_s']} s; final from the rollups {figures['final_s']} s; stored "
          f"{figures['stored_s'] * 1000:.1f} ms (load average {figures['load_average_1m']:.1f}"
          f" on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
