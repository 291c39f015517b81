"""Redis Cluster benchmark: does admission scale with Redis masters, and what does the batch
vote path get on a cluster against a single Redis?

    python bench/cluster_bench.py [--duration 10] [--masters 1,2,3] [--workers 4]
        [--parts admission,batch]

admission: vote_svc's admission script alone (vote_svc.admission.Scripts, the pipelines of
concurrent admissions that a replica sends), driven by `--workers` client processes with
64 admissions in flight each, against a single Redis, then Redis Clusters of 1, 2 and 3
masters (each master with a replica, as `televote up --redis-cluster N` runs them), each
started in turn in the same run (PostgreSQL only holds the round). Premium SMS votes of
distinct voters: no user cache to load, so each admission is one script call. Prints
admitted votes/s, its ratio to the single Redis, and the CPU seconds per 1,000 admissions of
the clients and of the redis-server processes.
batch: VoteGatewayService.SubmitVotes of 1,000 votes (bench/vote_bench.py's batch mode: one
in flight per vote_svc replica, durable, every acknowledged vote checked in the ledger)
through the whole mesh, on a single Redis and on a cluster of the largest `--masters`.
The machine is shared: read the ratios within one run, and the load average printed with
them. No assertions on timing: it prints figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.vote_bench import _batches, _ledger_check
from ops.processes import run_stopping_on_sigterm
from ops.stack import SERVICES, Stack, StackSettings
from runtime import keys
from runtime.storage import create_redis
from tests.support_windows import TestRound, open_test_round
from vote_svc.admission import RATE_WINDOW_MS, Scripts, decode_reply

#: Admissions each client process keeps in flight (a busy replica's pipeline holds dozens).
IN_FLIGHT = 64


def _admission_worker(args: tuple[str, str, str, list[str], float, int]) -> tuple[int, int,
                                                                                  float]:
    return asyncio.run(_admissions(*args))


async def _admissions(redis_url: str, round_id: str, episode_id: str, contestants: list[str],
                      duration: float, worker: int) -> tuple[int, int, float]:
    """Admit premium SMS votes for `duration` seconds; returns (admitted, refused, CPU s)."""
    redis = create_redis(redis_url)
    scripts = Scripts(redis)
    admitted = refused = 0
    cpu_before = time.process_time()
    end = time.perf_counter() + duration

    async def client(lane: int) -> None:
        nonlocal admitted, refused
        n = 0
        while time.perf_counter() < end:
            n += 1
            user = f"sms:bench-{worker}-{lane}-{n}"
            request_id = vote_id = str(uuid.uuid4())
            shard = keys.shard_of(user)
            call_keys = [keys.window_key(shard, round_id), keys.user_key(shard, user),
                         keys.idempotency_key(shard, user, request_id),
                         keys.rate_key(shard, user), keys.live_key(shard, round_id),
                         keys.live_minutes_key(shard, round_id), keys.shard_marker_key(shard),
                         keys.pending_key(shard)]
            reply = await scripts.call(scripts.admit, call_keys, [
                contestants[n % len(contestants)], "PREMIUM_SMS", 1, "sms", "fp", vote_id,
                60_000, 1_000_000, "0", RATE_WINDOW_MS, 600_000, round_id])
            if decode_reply(reply)[0] == "OK":
                admitted += 1
            else:
                refused += 1

    try:
        await asyncio.gather(*(client(lane) for lane in range(IN_FLIGHT)))
    finally:
        await redis.aclose()
    return admitted, refused, time.process_time() - cpu_before


def _redis_cpu() -> float:
    """CPU seconds so far of this process's redis-server descendants."""
    total = 0.0
    for process in psutil.Process().children(recursive=True):
        try:
            if process.name() == "redis-server":
                times = process.cpu_times()
                total += times.user + times.system
        except psutil.Error:
            continue
    return total


async def _open_round(stack: Stack) -> TestRound:
    test_round = await open_test_round(stack.database_url, stack.redis_url,
                                       duration_ms=3_600_000, free_quota=1_000_000_000,
                                       rate_limit=1_000_000_000)
    # vote_svc's shard watch sets the markers once a shard's counters are known; no vote_svc
    # runs here, and the counters start empty.
    redis = create_redis(stack.redis_url)
    try:
        for shard in range(keys.SHARDS):
            await redis.set(keys.shard_marker_key(shard), "1")
    finally:
        await redis.aclose()
    return test_round


async def admission(masters: int, duration: float, workers: int) -> dict[str, Any]:
    """Admission votes/s on a single Redis (masters 0) or a cluster of `masters`."""
    stack = Stack(StackSettings(state_dir=Path(tempfile.mkdtemp(prefix="cluster-bench-")),
                                edge_port=0, replicas=dict.fromkeys(SERVICES, 0),
                                redis_cluster=masters))
    await stack.start()
    try:
        test_round = await _open_round(stack)
        redis_before = _redis_cpu()
        started = time.perf_counter()
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            parts = pool.map(_admission_worker, [
                (stack.redis_url, test_round.round_id, test_round.episode_id,
                 test_round.contestants, duration, worker) for worker in range(workers)])
        elapsed = time.perf_counter() - started
        admitted = sum(part[0] for part in parts)
        return {"admitted_per_s": round(admitted / duration),
                "refused": sum(part[1] for part in parts),
                "client_cpu_s_per_1000": round(sum(part[2] for part in parts)
                                               / max(admitted, 1) * 1000, 3),
                "redis_cpu_s_per_1000": round((_redis_cpu() - redis_before)
                                              / max(admitted, 1) * 1000, 3),
                "wall_s": round(elapsed, 1)}
    finally:
        await stack.stop()


async def batch(masters: int, duration: float) -> dict[str, Any]:
    """The batch vote path through the mesh (2 vote_svc replicas, fraud scoring off as in
    vote_bench) on a single Redis (masters 0) or a cluster."""
    replicas = {**dict.fromkeys(SERVICES, 1), "vote_svc": 2}
    stack = Stack(StackSettings(
        state_dir=Path(tempfile.mkdtemp(prefix="cluster-bench-")), edge_port=0,
        replicas=replicas, redis_cluster=masters,
        service_env={"TELEVOTE_GRACE_SECONDS": "5", "TELEVOTE_LOG_LEVEL": "WARNING",
                     "FRAUD_TARGET": ""}))
    await stack.start()
    try:
        test_round = await open_test_round(stack.database_url, stack.redis_url,
                                           duration_ms=3_600_000, free_quota=1_000_000_000,
                                           rate_limit=1_000_000_000)
        redis_before = _redis_cpu()
        acked, latencies, failed = await asyncio.to_thread(
            _batches, stack, test_round, duration, 0)
        await _ledger_check(stack, test_round, acked)
        latencies.sort()
        return {"votes_per_s": round(len(acked) / duration), "refused": failed,
                "batch_p50_ms": round(latencies[len(latencies) // 2], 1) if latencies else None,
                "redis_cpu_s_per_1000": round((_redis_cpu() - redis_before)
                                              / max(len(acked), 1) * 1000, 3)}
    finally:
        await stack.stop()


def _layout(masters: int) -> str:
    return "single Redis" if masters == 0 else f"cluster, {masters} master(s)"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--masters", default="1,2,3")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--parts", default="admission,batch")
    options = parser.parse_args()
    masters = [int(count) for count in options.masters.split(",") if count]
    parts = set(options.parts.split(","))
    results: dict[str, Any] = {"load_average_before": os.getloadavg()}
    if "admission" in parts:
        single: dict[str, Any] | None = None
        for count in [0, *masters]:
            figures = await admission(count, options.duration, options.workers)
            single = single or figures
            figures["ratio_to_single"] = round(
                figures["admitted_per_s"] / max(single["admitted_per_s"], 1), 2)
            figures["load_average"] = [round(value, 1) for value in os.getloadavg()]
            results[f"admission {_layout(count)}"] = figures
            print(f"admission {_layout(count)}", json.dumps(figures), flush=True)
    if "batch" in parts:
        for count in (0, max(masters)):
            figures = await batch(count, options.duration)
            figures["load_average"] = [round(value, 1) for value in os.getloadavg()]
            results[f"batch {_layout(count)}"] = figures
            print(f"batch {_layout(count)}", json.dumps(figures), flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    run_stopping_on_sigterm(main())
