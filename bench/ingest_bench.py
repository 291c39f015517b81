"""vote_svc's vote pipeline in process, without gRPC: CPU per vote by how many votes are in it.

    python -m bench.ingest_bench [--votes 6000] [--voters 5000] [--concurrency 1,4,16,64]

Starts PostgreSQL and Redis (no services), opens a round whose quota and rate limit do not
bind, and has C concurrent voters each submit one vote at a time straight to an Ingestor
(admission script, first-vote loads, group commit, settlement), as SubmitVote does after
validation. For each C it prints votes/s and the CPU per vote of this process (the pipeline's
Python), of PostgreSQL and of Redis.

What it shows: the pipeline's cost per vote is mostly per round trip (a Redis pipeline, a
ledger statement, a first-vote read), so it depends on how many votes share one, that is on
how many votes are in the pipeline at once. Behind the edge a replica's pipeline holds only a
few: votes wait for CPU in Envoy and in gRPC, not in the pipeline (bench/vote_bench.py).
No assertions on timing: it prints figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ops.stack import SERVICES, Stack, StackSettings
from runtime.storage import Storage
from tests.support_windows import TestRound, open_test_round
from vote_svc.config import VoteConfig
from vote_svc.ingest import Ingestor, VoteRequest
from vote_svc.server import create_pipeline


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _server_cpu() -> dict[str, float]:
    """CPU seconds so far of the stack's PostgreSQL and Redis (children of this process)."""
    totals: dict[str, float] = {}
    for process in psutil.Process().children(recursive=True):
        try:
            name, times = process.name(), process.cpu_times()
        except psutil.Error:
            continue
        if name in ("postgres", "redis-server"):
            totals[name] = totals.get(name, 0.0) + times.user + times.system
    return totals


async def _run(ingestor: Ingestor, test_round: TestRound, voters: list[str], votes: int,
               concurrency: int) -> None:
    sent = 0

    async def voter(first: int) -> None:
        nonlocal sent
        index = first
        while sent < votes:
            sent += 1
            vote = VoteRequest(
                request_id=str(uuid.uuid4()), user_id=voters[index % len(voters)],
                round_id=test_round.round_id,
                contestant_id=test_round.contestants[index % len(test_round.contestants)],
                vote_type="FREE", count=1, channel="APP", device_id=f"device-{index}",
                app_version="1.0", ip="203.0.113.7")
            (result,) = await ingestor.submit([vote])
            if isinstance(result, Exception):
                raise SystemExit(f"vote refused: {result}")
            index += concurrency

    servers_before, own_before = _server_cpu(), _own_cpu()
    started = time.perf_counter()
    await asyncio.gather(*(voter(first) for first in range(concurrency)))
    elapsed = time.perf_counter() - started
    own, servers = _own_cpu() - own_before, _server_cpu()
    per_vote = {name: (servers[name] - servers_before.get(name, 0.0)) / votes * 1e6
                for name in servers}
    print(f"concurrency {concurrency:3}: {votes / elapsed:6.0f} votes/s   CPU per vote: "
          f"pipeline {own / votes * 1e6:5.0f} us   PostgreSQL {per_vote.get('postgres', 0):5.0f} us"
          f"   Redis {per_vote.get('redis-server', 0):4.0f} us", flush=True)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--votes", type=int, default=6000)
    parser.add_argument("--voters", type=int, default=5000)
    parser.add_argument("--concurrency", default="1,4,16,64")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ingest-bench-") as state_dir:
        stack = Stack(StackSettings(state_dir=Path(state_dir), edge_port=0,
                                    replicas=dict.fromkeys(SERVICES, 0)))
        await stack.start()
        try:
            os.environ.update(DATABASE_URL=stack.database_url, REDIS_URL=stack.redis_url,
                              VOTE_PSEUDONYM_SALT=uuid.uuid4().hex,
                              VOTE_IP_HASH_KEY=uuid.uuid4().hex)
            config = VoteConfig()
            storage = Storage.from_config(config)
            await storage.connect()
            _, ledger, ingestor = create_pipeline(config, storage, fraud_channel=None)
            ledger.start()
            watch = asyncio.get_running_loop().create_task(ingestor.recovery.watch_shards())
            try:
                for concurrency in (int(c) for c in options.concurrency.split(",")):
                    # A round and voters of its own per run: every run has the same share of
                    # voters' first votes (a read from PostgreSQL each).
                    test_round = await open_test_round(
                        stack.database_url, stack.redis_url, duration_ms=3_600_000,
                        free_quota=1_000_000, rate_limit=1_000_000)
                    voters = [f"bench-{uuid.uuid4().hex[:12]}" for _ in range(options.voters)]
                    await _run(ingestor, test_round, voters, options.votes, concurrency)
            finally:
                watch.cancel()
                await ledger.close()
                await storage.close()
        finally:
            await stack.stop()


if __name__ == "__main__":
    asyncio.run(main())
