"""Live results and final results at scale.

Streams (default): how many StreamResults subscribers one results_svc process feeds at
1 update/s, how late the updates arrive, and what a subscriber costs. Starts the real mesh
(one replica of each service), opens a round (PUBLIC_COUNTS), subscribes N native gRPC streams
(through the edge unless --direct) from several client processes, at most 100 per HTTP/2
connection, opened at a steady rate (bench/stream_load.py), and M Server-Sent-Events streams
through the edge; then records for --seconds how long after its server_time (when the tick
read the counters) every update arrived.

    python -m bench.results_bench --grpc 10000 --sse 500

Big round (--big-round N): bulk-loads N votes into one round with COPY (as vote_svc's group
commit would have written them: valid leaves, free and paid votes, a few over quota), closes
the round and measures VOTING_CLOSE -> RESULTS_READY (the round's close to the final result
being stored and announced), then `televote audit export` and `televote audit verify`.

    python -m bench.results_bench --big-round 1000000

Prints lags, RSS per subscriber, results_svc's CPU (also per subscriber-second, robust to
other load on the machine) and the load average; for a big round the phases' durations.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from bench.stream_load import Clients, Load, open_sse
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


def _ledger_rows(test_round: Any, votes: int) -> Any:
    """`votes` ledger rows as vote_svc's group commit writes them (leaf bytes included)."""
    import hashlib
    import json
    import uuid

    contestants = test_round.contestants
    admitted = test_round.opens_at_ms + 1
    users = votes // VOTES_PER_USER + 1
    made = 0
    for user in range(users):
        user_id = f"bench-{user}"
        kinds = ["FREE"] * 4 + ["PAID"] + (["FREE"] if user % 50 == 0 else [])
        for n, vote_type in enumerate(kinds):
            if made >= votes:
                return
            made += 1
            vote_id = str(uuid.uuid4())
            contestant = contestants[(user * 7 + n) % len(contestants)]
            admitted += 1 if made % 3 == 0 else 0  # several votes per ms, as under load
            leaf = json.dumps({
                "accepted_at_ms": admitted, "channel": "APP", "contestant_id": contestant,
                "count": 1, "round_id": test_round.round_id, "vote_id": vote_id,
                "vote_type": vote_type, "voter": hashlib.sha256(user_id.encode()).hexdigest()[:32],
            }, sort_keys=True, separators=(",", ":")).encode()
            yield (vote_id, f"req-{made}", user_id, 0, test_round.round_id,
                   test_round.episode_id, contestant, vote_type, 1, "APP", admitted,
                   "ALLOW", b"f", leaf, hashlib.sha256(b"\x00" + leaf).digest())


async def _phases(database_url: str, round_id: str) -> None:
    """Where a recount's time goes: judging the ledger in SQL (server side only, then fetched
    into Python) and building the Merkle tree."""
    import psycopg
    from psycopg.rows import dict_row

    from results_svc.final import JUDGED_SQL, judge_params
    from results_svc.merkle import MerkleTree
    from results_svc.rounds import load_round

    async with await psycopg.AsyncConnection.connect(database_url,
                                                     row_factory=dict_row) as connection:
        info = await load_round(connection, round_id)
        assert info is not None
        params = judge_params(info)
        started = time.monotonic()
        cursor = await connection.execute(f"SELECT count(*) FROM ({JUDGED_SQL}) j", params)
        await cursor.fetchone()
        in_sql = time.monotonic() - started
        started = time.monotonic()
        async with connection.cursor(row_factory=psycopg.rows.tuple_row) as rows:
            await rows.execute(JUDGED_SQL, params)
            leaves = [bytes(row[4]) async for row in rows]
        fetched = time.monotonic() - started
    started = time.monotonic()
    MerkleTree(leaves)
    tree = time.monotonic() - started
    print(f"  phases: judging in SQL {in_sql * 1000:.0f} ms; judged rows fetched into Python "
          f"{fetched * 1000:.0f} ms; Merkle tree {tree * 1000:.0f} ms")


async def run_big_round(votes: int) -> None:
    """VOTING_CLOSE -> RESULTS_READY and `televote audit export/verify` for a round of
    `votes` ledger rows, bulk-loaded with COPY."""
    import psycopg

    from results_svc.audit import export_round, verify_export

    state_dir = Path(tempfile.mkdtemp(prefix="results-big-"))
    # No settling wait: the bench measures the recount, not the deliberate wait (3 s by
    # default) for vote batches in flight at the close.
    stack = Stack(StackSettings(state_dir=state_dir, edge_port=0,
                                replicas=dict.fromkeys(SERVICES, 1),
                                service_env={"RESULTS_SETTLE_MS": "0",
                                             "RESULTS_SETTLE_MAX_MS": "0",
                                             "RESULTS_POLL_MS": "100"}))
    await stack.start()
    try:
        # Opened long enough ago that every vote (3 per ms) is inside the window.
        span_ms = votes // 3 + 60_000
        test_round = await _public_round(stack, 12, opens_in_ms=-span_ms,
                                         duration_ms=span_ms + 3_600_000, free_quota=5)
        started = time.monotonic()
        async with await psycopg.AsyncConnection.connect(stack.database_url) as connection:
            async with connection.cursor() as cursor, cursor.copy(
                    "COPY votes (vote_id, request_id, user_id, shard, round_id, episode_id,"
                    " contestant_id, vote_type, count, channel, admitted_ms, admitted_at,"
                    " fraud_action, fingerprint, leaf_data, receipt_hash) FROM STDIN") as copy:
                for row in _ledger_rows(test_round, votes):
                    *head, admitted, action, fingerprint, leaf, receipt = row
                    await copy.write_row((*head, admitted, time.strftime(
                        "%Y-%m-%d %H:%M:%S+00", time.gmtime(admitted / 1000)), action,
                        fingerprint, leaf, receipt))
            users = votes // VOTES_PER_USER + 1
            await connection.execute(
                "INSERT INTO wallets (user_id, credited) SELECT 'bench-' || n, 1"
                " FROM generate_series(0, %s) AS n ON CONFLICT DO NOTHING", (users,))
            await connection.execute("ANALYZE votes")
            await connection.commit()
        print(f"loaded {votes} votes of {users} voters with COPY in "
              f"{time.monotonic() - started:.1f}s")

        from tests.support_windows import close_test_round
        load_before = os.getloadavg()
        closed_ms = await close_test_round(stack.database_url, stack.redis_url, test_round)
        async with await psycopg.AsyncConnection.connect(stack.database_url) as connection:
            for _ in range(36_000):
                cursor = await connection.execute(
                    "SELECT extract(epoch FROM rr.finalized_at) * 1000,"
                    " (SELECT extract(epoch FROM e.recorded_at) * 1000 FROM show_events e"
                    "   WHERE e.episode_id = r.episode_id"
                    "     AND e.event_type = 'SHOW_EVENT_TYPE_RESULTS_READY')"
                    " FROM rounds r JOIN round_results rr USING (round_id)"
                    " WHERE r.round_id = %s AND r.state = 'FINALIZED'", (test_round.round_id,))
                row = await cursor.fetchone()
                if row is not None and row[1] is not None:
                    break
                await asyncio.sleep(0.1)
            assert row is not None, "never finalized"
        stored_ms, ready_ms = float(row[0]), float(row[1])
        print(f"VOTING_CLOSE -> result stored {stored_ms - closed_ms:.0f} ms, -> RESULTS_READY "
              f"{ready_ms - closed_ms:.0f} ms ({votes} votes; load average "
              f"{load_before[0]:.2f} -> {os.getloadavg()[0]:.2f})")

        await _phases(stack.database_url, test_round.round_id)
        export = state_dir / "round.jsonl"
        started = time.monotonic()
        await export_round(stack.database_url, test_round.round_id, export)
        print(f"televote audit export: {time.monotonic() - started:.1f}s, "
              f"{export.stat().st_size / 2**20:.0f} MiB")
        started = time.monotonic()
        verdict = await asyncio.to_thread(verify_export, export)
        print(f"televote audit verify: {time.monotonic() - started:.1f}s, ok={verdict.ok}")
    finally:
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
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if args.big_round:
        asyncio.run(run_big_round(args.big_round))
        return
    asyncio.run(run(args.grpc, args.sse, args.processes, args.open_rate, args.direct,
                    args.seconds))


if __name__ == "__main__":
    main()
