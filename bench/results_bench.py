"""Live results and final results at scale.

Streams (default): how many StreamResults subscribers one results_svc process feeds at
1 update/s, how late the updates arrive, and what a subscriber costs. Starts the real mesh
(one replica of each service), opens a round (PUBLIC_COUNTS), subscribes N native gRPC streams
(through the edge unless --direct) from several client processes, at most 100 per HTTP/2
connection, opened at a steady rate (bench/stream_load.py), and M Server-Sent-Events streams
through the edge; then records for --seconds how long after its server_time (when the tick
read the counters) every update arrived.

    python -m bench.results_bench --grpc 10000 --sse 500

Big round (--big-round N): writes N votes into one open round with COPY in chunks of 50,000
with increasing admitted_ms (as vote_svc's group commit would have written them: valid leaves,
free and paid votes, a few over quota) while results_svc checkpoints the round, then its last
seconds at a live rate (--live-rate votes/s for --live-seconds, stamped by the Redis clock),
closes the round and measures VOTING_CLOSE -> RESULTS_READY (the round's close to the final
result being stored and announced); then times the full recount of the same round (the
fallback path, rolled back) and checks it gives the same result; then `televote audit export`
and `televote audit verify`. CPU seconds of results_svc and PostgreSQL per phase.

    python -m bench.results_bench --big-round 1000000

Prints lags, RSS per subscriber, results_svc's CPU (also per subscriber-second, robust to
other load on the machine) and the load average; for a big round the phases' durations.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import signal
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from bench.stream_load import Clients, Load, open_sse
from ops.processes import run_stopping_on_sigterm
from ops.stack import SERVICES, Stack, StackSettings
from tests.support_windows import open_test_round


def _summary(name: str, lags: list[float], subscribers: int, seconds: float) -> str:
    if not lags:
        return f"{name}: no updates received"
    ordered = sorted(lags)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    rate = len(lags) / max(1, subscribers) / seconds
    return (f"{name}: {subscribers} subscribers, {len(lags)} updates "
            f"({rate:.2f}/subscriber/s), lag p50 {statistics.median(ordered):.0f} ms, "
            f"p99 {p99:.0f} ms, max {ordered[-1]:.0f} ms")


def _ms(rfc3339: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp() * 1000


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


async def _public_round(stack: Stack, contestants: int, **options: Any) -> Any:
    import psycopg

    test_round = await open_test_round(stack.database_url, stack.redis_url,
                                       contestants=contestants, **options)
    async with await psycopg.AsyncConnection.connect(stack.database_url) as connection:
        await connection.execute(
            "UPDATE rounds SET visibility = 'RESULTS_VISIBILITY_PUBLIC_COUNTS'"
            " WHERE round_id = %s", (test_round.round_id,))
    return test_round


async def run(grpc_subscribers: int, sse_subscribers: int, processes: int, open_rate: float,
              direct: bool, seconds: float) -> None:
    state_dir = Path(tempfile.mkdtemp(prefix="results-bench-"))
    stack = Stack(StackSettings(state_dir=state_dir, edge_port=0,
                                replicas=dict.fromkeys(SERVICES, 1)))
    await stack.start()
    try:
        test_round = await _public_round(stack, 12, duration_ms=3_600_000)
        round_id = test_round.round_id
        host, port = stack.addresses["results_svc"][0]
        process = psutil.Process(stack.child("results_svc", 0).process.pid)
        envoy = psutil.Process(stack._edge.process.pid) if stack._edge else None
        rss_before = process.memory_info().rss
        target = f"{host}:{port}" if direct else stack.edge_target
        clients = Clients(Load(target, "results", round_id, grpc_subscribers,
                               processes=processes, open_rate=open_rate))
        started = time.monotonic()
        opened = await clients.open() if grpc_subscribers else 0
        sse = await open_sse(stack.edge_target, f"/v1/rounds/{round_id}/live-results",
                             sse_subscribers)
        connected_s = time.monotonic() - started
        await asyncio.sleep(2)
        sse_open = sum(bool(w.events) for w in sse)
        subscribers = opened + sse_open
        rss_after = process.memory_info().rss
        print(f"subscribed {opened}/{grpc_subscribers} gRPC + {sse_open}/{sse_subscribers} SSE"
              f" in {connected_s:.1f}s; results_svc RSS {rss_before / 2**20:.0f} -> "
              f"{rss_after / 2**20:.0f} MiB = "
              f"{(rss_after - rss_before) / max(1, subscribers) / 1024:.1f} KiB per subscriber")

        sse_from = [len(w.events) for w in sse]
        clients.start_measuring()
        measure_start = time.time() * 1000
        cpu_before = _cpu(process)
        envoy_before = _cpu(envoy) if envoy else 0.0
        load_before = os.getloadavg()
        await asyncio.sleep(seconds)
        cpu = _cpu(process) - cpu_before
        envoy_cpu = (_cpu(envoy) - envoy_before) if envoy else 0.0
        measure_end = time.time() * 1000
        load_after = os.getloadavg()
        report = await clients.finish() if grpc_subscribers else None
        for watcher in sse:
            await watcher.stop()
        sse_lags = [received - _ms(event["results"]["serverTime"])
                    for watcher, skip in zip(sse, sse_from, strict=True)
                    for event, received in list(zip(watcher.events, watcher.received_ms,
                                                    strict=True))[skip:]
                    if measure_start <= received <= measure_end]
        print(f"results_svc CPU while measuring: {cpu / seconds * 100:.0f} % of one core "
              f"({cpu / seconds / max(1, subscribers) * 1e6:.1f} µs per subscriber-second); "
              f"envoy {envoy_cpu / seconds * 100:.0f} %; load average {load_before[0]:.2f} -> "
              f"{load_after[0]:.2f}")
        if report is not None:
            deliveries = sum(report.lags.values())
            print(report.summary("native gRPC " + ("direct" if direct else "via edge"))
                  + f" ({deliveries / max(1, opened) / seconds:.2f} updates/subscriber/s)")
        if sse_subscribers:
            print(_summary("SSE via edge", sse_lags, sse_open, seconds))
    finally:
        await stack.stop()


VOTES_PER_USER = 5  # 4 free, 1 paid; every 50th voter also a 6th free vote over the quota
_COPY = ("COPY votes (vote_id, request_id, user_id, shard, round_id, episode_id, contestant_id,"
         " vote_type, count, channel, admitted_ms, admitted_at, fraud_action, fingerprint,"
         " leaf_data, receipt_hash) FROM STDIN")


def _ledger_row(test_round: Any, user_id: str, request: str, vote_type: str, contestant: str,
                admitted: int) -> tuple[Any, ...]:
    """A ledger row as vote_svc's group commit writes it (leaf bytes included)."""
    import hashlib
    import json
    from datetime import UTC, datetime

    from vote_svc.ingest import new_vote_ids

    [vote_id] = new_vote_ids(1, admitted)
    leaf = json.dumps({
        "accepted_at_ms": admitted, "channel": "APP", "contestant_id": contestant, "count": 1,
        "round_id": test_round.round_id, "vote_id": vote_id, "vote_type": vote_type,
        "voter": hashlib.sha256(user_id.encode()).hexdigest()[:32],
    }, sort_keys=True, separators=(",", ":")).encode()
    return (vote_id, request, user_id, 0, test_round.round_id, test_round.episode_id,
            contestant, vote_type, 1, "APP", admitted, datetime.fromtimestamp(admitted / 1000, UTC),
            "ALLOW", b"f", leaf, hashlib.sha256(b"\x00" + leaf).digest())


def _votes(test_round: Any, votes: int) -> Any:
    """(voter, request id, vote type, contestant) of `votes` votes, in the order they come."""
    contestants = test_round.contestants
    made = 0
    for user in range(votes // VOTES_PER_USER + 1):
        kinds = ["FREE"] * 4 + ["PAID"] + (["FREE"] if user % 50 == 0 else [])
        for n, vote_type in enumerate(kinds):
            if made >= votes:
                return
            made += 1
            yield (f"bench-{user}", f"req-{made}", vote_type,
                   contestants[(user * 7 + n) % len(contestants)])


_LIST_PENDING = """
local t = redis.call('TIME')
local ms = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZADD', KEYS[1], ms + 60000, string.format(ARGV[1], ms))
return ms
"""


async def _commit_batch(connection: Any, redis: Any, test_round: Any,
                        rows: Callable[[int], list[tuple[Any, ...]]]) -> None:
    """Write a batch of rows admitted from now on, in one transaction, as vote_svc's group
    commit does: listed in a shard's pending set (runtime.keys.pending_key) at the Redis time
    that stamps them, atomically as the admission script does, until committed. That is what
    results_svc's checkpoint watermark waits for."""
    import uuid

    from runtime import keys

    batch = str(uuid.uuid4())
    member = "|".join([batch, test_round.round_id, test_round.contestants[0], "FREE", "1", "%d",
                       test_round.episode_id, keys.idempotency_key(0, "bench", batch)])
    admitted = int(await redis.eval(_LIST_PENDING, 1, keys.pending_key(0), member))
    try:
        async with connection.cursor() as cursor, cursor.copy(_COPY) as copy:
            for row in rows(admitted):
                await copy.write_row(row)
        await connection.commit()
    finally:
        await redis.zrem(keys.pending_key(0), member % admitted)


def _postgres_processes(state_dir: Path) -> dict[tuple[int, float], float]:
    """(pid, start time) -> CPU seconds of the stack's PostgreSQL processes (postmaster,
    backends, background workers)."""
    found: dict[tuple[int, float], float] = {}
    for process in psutil.process_iter(["cmdline"]):
        if str(state_dir / "postgres") in " ".join(process.info["cmdline"] or []):
            with contextlib.suppress(psutil.NoSuchProcess):
                for member in [process, *process.children(recursive=True)]:
                    found[(member.pid, member.create_time())] = _cpu(member)
    return found


class _Cpu:
    """CPU seconds of results_svc and PostgreSQL over a phase (PostgreSQL processes that exit
    during the phase, such as autovacuum workers, are not counted)."""

    def __init__(self, results: psutil.Process, state_dir: Path) -> None:
        self._results, self._state_dir = results, state_dir
        self._start = (_cpu(results), _postgres_processes(state_dir))

    def __str__(self) -> str:
        before = self._start[1]
        postgres = sum(cpu - before.get(key, 0.0)
                       for key, cpu in _postgres_processes(self._state_dir).items())
        return (f"CPU results_svc {_cpu(self._results) - self._start[0]:.1f}s, PostgreSQL "
                f"{postgres:.1f}s")


async def _full_recount(database_url: str, state_dir: Path, round_id: str
                        ) -> tuple[float, float, Any]:
    """The reference path (the whole round judged at close, results_svc.store.JUDGED_SQL), timed
    in a transaction that is rolled back; returns its duration, the CPU seconds of its
    PostgreSQL backend and of this process, and what it would store."""
    import psycopg
    from psycopg.rows import dict_row

    from results_svc.config import ResultsConfig
    from results_svc.final import Finalizer
    from results_svc.rounds import load_round
    from results_svc.signing import Signer
    from runtime.storage import Storage

    config = ResultsConfig(database_url=database_url, redis_url="redis://unused",
                           sync_target="unused", televote_state_dir=state_dir / "recount")
    signer = Signer.load_or_create(state_dir / "recount")
    finalizer = Finalizer(Storage.from_config(config), config, signer)
    async with await psycopg.AsyncConnection.connect(database_url,
                                                     row_factory=dict_row) as connection:
        await connection.execute(
            "INSERT INTO ledger_keys (key_id, public_key) VALUES (%s, %s) ON CONFLICT DO NOTHING",
            (signer.key_id, signer.public_key))
        await connection.commit()
        async with connection.transaction(force_rollback=True):
            # The stored result out of the way (rolled back): its guards are triggers.
            await connection.execute("SET LOCAL session_replication_role = replica")
            for table in ("round_result_invalid_votes", "round_result_block_roots",
                          "round_result_blocks", "round_result_leaves", "round_results"):
                await connection.execute(f"DELETE FROM {table} WHERE round_id = %s", (round_id,))
            info = await load_round(connection, round_id)
            assert info is not None
            cursor = await connection.execute("SELECT pg_backend_pid() AS pid")
            backend = psutil.Process((await cursor.fetchone() or {})["pid"])
            started, cpu = time.monotonic(), _cpu(backend) + _cpu(psutil.Process())
            assert await finalizer.recount_in(connection, info, {})
            elapsed = time.monotonic() - started
            cpu = _cpu(backend) + _cpu(psutil.Process()) - cpu
            cursor = await connection.execute(
                "SELECT tree_size, root_hash, counts, total_votes FROM round_results"
                " WHERE round_id = %s", (round_id,))
            return elapsed, cpu, await cursor.fetchone()


async def run_big_round(votes: int, live_rate: int, live_seconds: float, recount: bool,
                        audit: bool) -> None:
    """VOTING_CLOSE -> RESULTS_READY for a round of `votes` ledger rows written while the round
    is open (the checkpointer running), then the full-recount path on the same round for
    comparison, and `televote audit export/verify`."""
    import psycopg

    from results_svc.audit import export_round, verify_export
    from runtime.storage import create_redis
    from tests.support_windows import close_test_round

    state_dir = Path(tempfile.mkdtemp(prefix="results-big-"))
    # No settling wait: the bench measures the final judgement, not the deliberate wait (3 s
    # by default) for vote batches in flight at the close.
    stack = Stack(StackSettings(state_dir=state_dir, edge_port=0,
                                replicas=dict.fromkeys(SERVICES, 1),
                                service_env={"RESULTS_SETTLE_MS": "0",
                                             "RESULTS_SETTLE_MAX_MS": "0",
                                             "RESULTS_POLL_MS": "100"}))
    await stack.start()
    redis = create_redis(stack.redis_url)
    try:
        results = psutil.Process(stack.child("results_svc", 0).process.pid)
        # A round much faster than life: chunks of votes stamped with the Redis clock over the
        # next second, each listed as pending until committed (as vote_svc's batches are), as
        # fast as COPY goes; then its last seconds at a live rate.
        test_round = await _public_round(stack, 12, opens_in_ms=-60_000,
                                         duration_ms=6 * 3_600_000, free_quota=5)
        round_id = test_round.round_id
        async with await psycopg.AsyncConnection.connect(stack.database_url) as connection:
            users = votes // VOTES_PER_USER + 1
            await connection.execute(
                "INSERT INTO wallets (user_id, credited) SELECT 'bench-' || n, 1"
                " FROM generate_series(0, %s) AS n ON CONFLICT DO NOTHING", (users,))
            await connection.commit()
            cpu = _Cpu(results, state_dir)
            started = time.monotonic()
            specs = _votes(test_round, votes)
            chunk = 20_000
            while True:
                batch = list(itertools.islice(specs, chunk))
                if not batch:
                    break

                def spread(now: int, batch: list[Any] = batch) -> list[tuple[Any, ...]]:
                    return [_ledger_row(test_round, user, request, vote_type, contestant,
                                        now + n * 1000 // len(batch))
                            for n, (user, request, vote_type, contestant) in enumerate(batch)]
                await _commit_batch(connection, redis, test_round, spread)
            seeded = time.monotonic() - started
            print(f"seeded {votes} votes of {users} voters in chunks of {chunk} (COPY) in "
                  f"{seeded:.1f}s while the checkpointer ran")
            await connection.execute("ANALYZE votes")
            await connection.commit()
            for _ in range(36_000):
                cursor = await connection.execute(
                    "SELECT tree_size FROM round_checkpoints WHERE round_id = %s", (round_id,))
                row = await cursor.fetchone()
                if row is not None and row[0] >= votes:
                    break
                await asyncio.sleep(0.1)
            print(f"checkpoint caught up {time.monotonic() - started - seeded:.1f}s after the "
                  f"last chunk; seeding + checkpointing: {cpu}")

            # The last seconds before the close: votes at a live rate, stamped by the Redis
            # clock, in 100 ms batches.
            cpu = _Cpu(results, state_dir)
            live = 0
            deadline = time.monotonic() + live_seconds
            while time.monotonic() < deadline:
                tick = time.monotonic()

                def at(now: int, first: int = live) -> list[tuple[Any, ...]]:
                    return [_ledger_row(test_round, f"live-{first + n}", "live", "FREE",
                                        test_round.contestants[n % 12], now)
                            for n in range(live_rate // 10)]
                await _commit_batch(connection, redis, test_round, at)
                live += live_rate // 10
                await asyncio.sleep(max(0.0, 0.1 - (time.monotonic() - tick)))
            print(f"live phase: {live} votes in {live_seconds:.0f}s; {cpu}")

        load_before = os.getloadavg()
        cpu = _Cpu(results, state_dir)
        closed_ms = await close_test_round(stack.database_url, stack.redis_url, test_round)
        async with await psycopg.AsyncConnection.connect(stack.database_url) as connection:
            for _ in range(36_000):
                cursor = await connection.execute(
                    "SELECT extract(epoch FROM rr.finalized_at) * 1000,"
                    " (SELECT extract(epoch FROM e.recorded_at) * 1000 FROM show_events e"
                    "   WHERE e.episode_id = r.episode_id"
                    "     AND e.event_type = 'SHOW_EVENT_TYPE_RESULTS_READY'),"
                    " rr.tree_size, rr.root_hash, rr.counts, rr.total_votes"
                    " FROM rounds r JOIN round_results rr USING (round_id)"
                    " WHERE r.round_id = %s AND r.state = 'FINALIZED'", (round_id,))
                row = await cursor.fetchone()
                if row is not None and row[1] is not None:
                    break
                await asyncio.sleep(0.05)
            assert row is not None, "never finalized"
        stored_ms, ready_ms = float(row[0]), float(row[1])
        print(f"VOTING_CLOSE -> result stored {stored_ms - closed_ms:.0f} ms, -> RESULTS_READY "
              f"{ready_ms - closed_ms:.0f} ms ({votes + live} votes; {cpu}; load average "
              f"{load_before[0]:.2f} -> {os.getloadavg()[0]:.2f})")

        if recount:
            elapsed, cpu_s, reference = await _full_recount(stack.database_url, state_dir,
                                                            round_id)
            same = tuple(reference.values()) == tuple(row[2:])
            print(f"full recount of the same round (the fallback path): {elapsed:.1f}s "
                  f"(CPU {cpu_s:.1f}s: its PostgreSQL backend and the Merkle tree in Python); "
                  f"same result as stored: {same}")
            assert same, (reference, row[2:])
        if audit:
            export = state_dir / "round.jsonl"
            started = time.monotonic()
            await export_round(stack.database_url, round_id, export)
            print(f"televote audit export: {time.monotonic() - started:.1f}s, "
                  f"{export.stat().st_size / 2**20:.0f} MiB")
            started = time.monotonic()
            verdict = await asyncio.to_thread(verify_export, export)
            print(f"televote audit verify: {time.monotonic() - started:.1f}s, ok={verdict.ok}")
    finally:
        await redis.aclose()
        await stack.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grpc", type=int, default=10_000, help="native gRPC subscribers")
    parser.add_argument("--sse", type=int, default=500, help="SSE subscribers")
    parser.add_argument("--processes", type=int, default=4,
                        help="client processes for the gRPC subscribers")
    parser.add_argument("--open-rate", type=float, default=1000,
                        help="gRPC streams opened per second (all processes)")
    parser.add_argument("--direct", action="store_true",
                        help="gRPC subscribers call results_svc itself instead of the edge")
    parser.add_argument("--seconds", type=float, default=10, help="how long to measure")
    parser.add_argument("--big-round", type=int, default=0, metavar="VOTES",
                        help="instead: finalize and audit a round of this many votes")
    parser.add_argument("--live-rate", type=int, default=10_000,
                        help="big round: votes per second in its last seconds before the close")
    parser.add_argument("--live-seconds", type=float, default=5,
                        help="big round: how long it takes votes at the live rate")
    parser.add_argument("--no-recount", action="store_true",
                        help="big round: skip timing the full recount for comparison")
    parser.add_argument("--no-audit", action="store_true",
                        help="big round: skip `televote audit export/verify`")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if args.big_round:
        run_stopping_on_sigterm(run_big_round(
            args.big_round, args.live_rate, args.live_seconds, not args.no_recount,
            not args.no_audit))
        return
    run_stopping_on_sigterm(run(args.grpc, args.sse, args.processes, args.open_rate,
                                args.direct, args.seconds))


if __name__ == "__main__":
    main()
