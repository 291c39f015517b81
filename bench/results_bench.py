"""How many StreamResults subscribers one results_svc process feeds at 1 update/s, how late
the updates arrive, and what a subscriber costs in memory.

Starts the real mesh (one results_svc replica), opens a round (PUBLIC_COUNTS) the way vote
tests do, subscribes N native gRPC streams (through the edge unless --direct, multiplexed over
a few HTTP/2 connections) and M Server-Sent-Events streams through the edge, lets them run for
--seconds, and records for every update how long after its server_time (when the tick read
the counters) it arrived.

    python -m bench.results_bench --grpc 10000 --sse 500

Prints p50/p99/max lag and updates per subscriber per second per protocol, and results_svc's
RSS growth per subscriber. The load generator shares the machine's cores with the server, so
the figures are a floor of what the server does.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import psutil

from ops.stack import SERVICES, Stack, StackSettings
from televote.results.v1 import results_service_pb2 as rpb
from televote.results.v1 import results_service_pb2_grpc as rgrpc
from tests.support_windows import open_test_round
from tests.sync_support import SseWatcher

FAILURES: dict[str, int] = {}
RAMP_BATCH = 250


async def _grpc_subscriber(channel: grpc.aio.Channel, round_id: str, lags: list[float],
                           measuring: list[bool], ready: asyncio.Event,
                           counter: list[int]) -> None:
    """One viewer; like an app, it resubscribes when its stream is cut before it starts
    (grpc's server resets connections that open thousands of streams at once)."""
    stub = rgrpc.ResultsServiceStub(channel)
    first = True
    for attempt in range(10):
        try:
            async for update in stub.StreamResults(
                    rpb.StreamResultsRequest(round_id=round_id)):
                if first:
                    first = False
                    counter[0] += 1
                    if counter[0] >= counter[1]:
                        ready.set()
                    continue
                if measuring[0]:
                    lags.append(time.time() * 1000
                                - update.results.server_time.ToMilliseconds())
            return
        except grpc.aio.AioRpcError as error:
            if first and attempt < 9 and error.code() in (grpc.StatusCode.CANCELLED,
                                                          grpc.StatusCode.UNAVAILABLE):
                await asyncio.sleep(0.5 + attempt * 0.5)
                continue
            if error.code() != grpc.StatusCode.CANCELLED or first:
                key = f"{error.code().name}: {error.details()}"
                FAILURES[key] = FAILURES.get(key, 0) + 1
            if first:
                counter[1] -= 1
                if counter[0] >= counter[1]:
                    ready.set()
            return


def _client_process(target: str, round_id: str, subscribers: int, connections: int,
                    settle_s: float, seconds: float, out: Any) -> None:
    """A load-generating process: its own subscribers, its lags sent back through `out`."""
    async def subscribe_all() -> None:
        options = [("grpc.max_concurrent_streams", 100_000)]
        channels = [grpc.aio.insecure_channel(target, options=options)
                    for _ in range(connections)]
        lags: list[float] = []
        measuring = [False]
        ready = asyncio.Event()
        counter = [0, subscribers]
        tasks = []
        for i in range(subscribers):
            tasks.append(asyncio.create_task(_grpc_subscriber(
                channels[i % connections], round_id, lags, measuring, ready, counter)))
            if i % RAMP_BATCH == RAMP_BATCH - 1:
                await asyncio.sleep(0.1)
        await asyncio.wait_for(ready.wait(), 300)
        out.put(("ready", counter[1]))
        await asyncio.sleep(settle_s)
        measuring[0] = True
        await asyncio.sleep(seconds)
        measuring[0] = False
        out.put(("lags", lags, dict(FAILURES)))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(subscribe_all())


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


async def run(grpc_subscribers: int, sse_subscribers: int, connections: int, direct: bool,
              seconds: float, processes: int = 1) -> None:
    state_dir = Path(tempfile.mkdtemp(prefix="results-bench-"))
    stack = Stack(StackSettings(state_dir=state_dir, edge_port=0,
                                replicas=dict.fromkeys(SERVICES, 1)))
    await stack.start()
    try:
        test_round = await open_test_round(stack.database_url, stack.redis_url, contestants=12,
                                           duration_ms=3_600_000)
        import psycopg
        async with await psycopg.AsyncConnection.connect(stack.database_url) as connection:
            await connection.execute(
                "UPDATE rounds SET visibility = 'RESULTS_VISIBILITY_PUBLIC_COUNTS'"
                " WHERE round_id = %s", (test_round.round_id,))
        round_id = test_round.round_id
        host, port = stack.addresses["results_svc"][0]
        process = psutil.Process(stack.child("results_svc", 0).process.pid)
        rss_before = process.memory_info().rss

        options = [("grpc.max_concurrent_streams", 100_000)]
        target = f"{host}:{port}" if direct else stack.edge_target
        if processes > 1:
            await _run_processes(process, rss_before, target, round_id, grpc_subscribers,
                                 connections, processes, seconds, direct)
            return
        channels = [grpc.aio.insecure_channel(target, options=options)
                    for _ in range(connections)]
        lags: list[float] = []
        measuring = [False]
        ready = asyncio.Event()
        counter = [0, grpc_subscribers]
        if grpc_subscribers == 0:
            ready.set()
        started = time.monotonic()
        tasks = []
        for i in range(grpc_subscribers):
            tasks.append(asyncio.create_task(_grpc_subscriber(
                channels[i % connections], round_id, lags, measuring, ready, counter)))
            if i % RAMP_BATCH == RAMP_BATCH - 1:
                await asyncio.sleep(0.1)
        sse = []
        for i in range(sse_subscribers):
            sse.append(SseWatcher().start(stack.edge_target,
                                          f"/v1/rounds/{round_id}/live-results"))
            if i % 50 == 49:
                await asyncio.sleep(0.1)
        await asyncio.wait_for(ready.wait(), 300)
        deadline = time.monotonic() + 60
        while sum(bool(w.events) or (w.task is not None and w.task.done())  # noqa: ASYNC110
                  for w in sse) < sse_subscribers and time.monotonic() < deadline:
            await asyncio.sleep(0.2)  # polling other tasks' lists
        failed_sse = sum(not w.events for w in sse)
        if failed_sse:
            print(f"{failed_sse} SSE subscriptions failed")
        connected_s = time.monotonic() - started
        await asyncio.sleep(2)
        rss_after = process.memory_info().rss
        per_subscriber = (rss_after - rss_before) / max(1, grpc_subscribers + sse_subscribers)
        print(f"subscribed {grpc_subscribers} gRPC + {sse_subscribers} SSE in "
              f"{connected_s:.1f}s; results_svc RSS {rss_before / 2**20:.0f} -> "
              f"{rss_after / 2**20:.0f} MiB = {per_subscriber / 1024:.1f} KiB per subscriber")
        sse_from = [len(w.events) for w in sse]
        measure_start = time.time() * 1000
        measuring[0] = True
        cpu_before = process.cpu_times()
        await asyncio.sleep(seconds)
        measuring[0] = False
        cpu_after = process.cpu_times()
        measure_end = time.time() * 1000
        cpu = (cpu_after.user + cpu_after.system - cpu_before.user - cpu_before.system)
        if FAILURES:
            print(f"streams failed: {FAILURES}")
        for watcher in sse:
            await watcher.stop()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in channels:
            await channel.close()
        sse_lags = [received - _ms(event["results"]["serverTime"])
                    for watcher, skip in zip(sse, sse_from, strict=True)
                    for event, received in list(zip(watcher.events, watcher.received_ms,
                                                    strict=True))[skip:]
                    if measure_start <= received <= measure_end]
        print(f"results_svc CPU while measuring: {cpu / seconds * 100:.0f} % of one core")
        print(_summary("native gRPC " + ("direct" if direct else "via edge"), lags,
                       grpc_subscribers, seconds))
        if sse_subscribers:
            print(_summary("SSE via edge", sse_lags, sse_subscribers, seconds))
    finally:
        await stack.stop()


async def _run_processes(process: psutil.Process, rss_before: int, target: str,
                         round_id: str, subscribers: int, connections: int, processes: int,
                         seconds: float, direct: bool) -> None:
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    share = subscribers // processes
    settle_s = 25.0  # every process subscribes before any measures
    workers = [context.Process(target=_client_process, args=(
        target, round_id, share, max(1, connections // processes), settle_s, seconds, out))
        for _ in range(processes)]
    started = time.monotonic()
    for worker in workers:
        worker.start()
    loop = asyncio.get_running_loop()
    connected = 0
    for _ in workers:
        _, count = await loop.run_in_executor(None, out.get)
        connected += count
    print(f"subscribed {connected} gRPC in {time.monotonic() - started:.1f}s "
          f"from {processes} client processes")
    await asyncio.sleep(settle_s / 2)
    rss_after = process.memory_info().rss
    print(f"results_svc RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB = "
          f"{(rss_after - rss_before) / max(1, connected) / 1024:.1f} KiB per subscriber")
    cpu_before = process.cpu_times()
    lags: list[float] = []
    for _ in workers:
        _, part, failures = await loop.run_in_executor(None, out.get)
        lags.extend(part)
        for key, value in failures.items():
            FAILURES[key] = FAILURES.get(key, 0) + value
    cpu_after = process.cpu_times()
    for worker in workers:
        await loop.run_in_executor(None, worker.join, 30)
    if FAILURES:
        print(f"streams failed: {FAILURES}")
    cpu = cpu_after.user + cpu_after.system - cpu_before.user - cpu_before.system
    print(f"results_svc CPU (subscribed, then measuring): "
          f"{cpu / (settle_s / 2 + seconds) * 100:.0f} % of one core")
    print(_summary("native gRPC " + ("direct" if direct else "via edge"), lags, connected,
                   seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grpc", type=int, default=10_000, help="native gRPC subscribers")
    parser.add_argument("--sse", type=int, default=500, help="SSE subscribers")
    parser.add_argument("--connections", type=int, default=20,
                        help="HTTP/2 connections the gRPC subscribers share")
    parser.add_argument("--direct", action="store_true",
                        help="gRPC subscribers call results_svc itself instead of the edge")
    parser.add_argument("--seconds", type=float, default=10, help="how long to measure")
    parser.add_argument("--processes", type=int, default=1,
                        help="client processes for the gRPC subscribers (with --sse 0)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    asyncio.run(run(args.grpc, args.sse, args.connections, args.direct, args.seconds,
                    args.processes))


if __name__ == "__main__":
    main()
