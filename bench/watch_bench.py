"""How many WatchShow subscribers one sync_svc process feeds, and how late their countdown is.

Starts the real mesh (one sync_svc replica), opens a round, subscribes N native gRPC streams
(through the edge, multiplexed over a few HTTP/2 connections as apps behind a NAT would be)
and M Server-Sent-Events streams through the edge, then records for every COUNTDOWN event how
long after its scheduled second it arrived, and how much the sync_svc process grew.

    python -m bench.watch_bench --grpc 10000 --sse 1000

Prints p50/p99/max delivery lag per protocol and memory per subscriber. The load generator
runs on the same 2 cores as the server, so the figures are a floor of what the server does.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import tempfile
import time
from pathlib import Path

import grpc
import psutil

from ops.stack import SERVICES, Stack, StackSettings
from runtime.access import Principal, Role
from televote.sync.v1 import show_watch_service_pb2 as watch
from televote.sync.v1 import show_watch_service_pb2_grpc as watch_grpc
from tests.sync_support import Operator, SseWatcher, seconds

FAILURES: dict[str, int] = {}
RAMP_BATCH = 250


class DirectOperator(Operator):
    @property
    def metadata(self):  # type: ignore[no-untyped-def]
        return Principal(Role.OPERATOR, "bench").to_metadata()


async def _grpc_subscriber(channel: grpc.aio.Channel, episode_id: str, lags: list[float],
                           ready: asyncio.Event, counter: list[int]) -> None:
    stub = watch_grpc.ShowWatchServiceStub(channel)
    try:
        async for event in stub.WatchShow(watch.WatchShowRequest(episode_id=episode_id)):
            if event.type == watch.SHOW_EVENT_TYPE_SNAPSHOT:
                counter[0] += 1
                if counter[0] >= counter[1]:
                    ready.set()
            elif event.type == watch.SHOW_EVENT_TYPE_COUNTDOWN:
                lags.append(time.time() * 1000 - event.server_time.ToMilliseconds())
            elif event.type == watch.SHOW_EVENT_TYPE_VOTING_CLOSED:
                return
    except grpc.aio.AioRpcError as error:
        FAILURES[f"{error.code().name}: {error.details()}"] = FAILURES.get(
            f"{error.code().name}: {error.details()}", 0) + 1
        counter[1] -= 1
        if counter[0] >= counter[1]:
            ready.set()


def _summary(name: str, lags: list[float], subscribers: int) -> str:
    if not lags:
        return f"{name}: no countdown events received"
    ordered = sorted(lags)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (f"{name}: {subscribers} subscribers, {len(lags)} countdown deliveries, lag p50 "
            f"{statistics.median(ordered):.0f} ms, p99 {p99:.0f} ms, max {ordered[-1]:.0f} ms")


async def run(grpc_subscribers: int, sse_subscribers: int, connections: int,
              direct: bool) -> None:
    state_dir = Path(tempfile.mkdtemp(prefix="watch-bench-"))
    stack = Stack(StackSettings(state_dir=state_dir, edge_port=0,
                                replicas=dict.fromkeys(SERVICES, 1),
                                service_env={"SYNC_WATCHER_QUEUE": "32",
                                             "SYNC_MIN_WINDOW_MS": "1000"}))
    await stack.start()
    try:
        host, port = stack.addresses["sync_svc"][0]
        sync_process = psutil.Process(stack.child("sync_svc", 0).process.pid)
        async with grpc.aio.insecure_channel(f"{host}:{port}") as control_channel:
            operator = DirectOperator(stack, control_channel)
            episode_id, contestants = await operator.episode_with_contestants(2)
            round_id = (await operator.call("CreateRound", episode_id=episode_id,
                                            contestant_ids=contestants)).round.round_id
            await operator.call("StartShow", episode_id=episode_id)
            rss_before = sync_process.memory_info().rss

            options = [("grpc.max_concurrent_streams", 100_000)]
            target = f"{host}:{port}" if direct else stack.edge_target
            channels = [grpc.aio.insecure_channel(target, options=options)
                        for _ in range(connections)]
            grpc_lags: list[float] = []
            ready = asyncio.Event()
            counter = [0, grpc_subscribers]
            started = time.monotonic()
            tasks = []
            for i in range(grpc_subscribers):
                tasks.append(asyncio.create_task(_grpc_subscriber(
                    channels[i % connections], episode_id, grpc_lags, ready, counter)))
                if i % RAMP_BATCH == RAMP_BATCH - 1:
                    # Viewers tune in over seconds, not in one instant: grpc's server cancels
                    # streams when thousands open on its connections in the same moment.
                    await asyncio.sleep(0.1)
            sse = [SseWatcher().start(stack.edge_target, f"/v1/episodes/{episode_id}/events")
                   for _ in range(sse_subscribers)]
            await asyncio.wait_for(ready.wait(), 300)
            while sum(bool(w.events) for w in sse) < sse_subscribers:  # noqa: ASYNC110
                await asyncio.sleep(0.2)  # polling other tasks' lists
            connected_s = time.monotonic() - started
            if FAILURES:
                print(f"subscriptions refused: {FAILURES}")
            rss_after = sync_process.memory_info().rss
            per_subscriber = (rss_after - rss_before) / max(1, grpc_subscribers + sse_subscribers)
            print(f"subscribed {grpc_subscribers} gRPC + {sse_subscribers} SSE in "
                  f"{connected_s:.1f}s; sync_svc RSS {rss_before / 2**20:.0f} -> "
                  f"{rss_after / 2**20:.0f} MiB = {per_subscriber / 1024:.1f} KiB per subscriber")

            cpu_before = sync_process.cpu_times()
            await operator.call("OpenVoting", round_id=round_id, duration=seconds(14))
            await asyncio.sleep(16)
            cpu_after = sync_process.cpu_times()
            busy = (cpu_after.user + cpu_after.system - cpu_before.user - cpu_before.system)
            print(f"sync_svc CPU while the window ran: {busy / 16 * 100:.0f} % of one core "
                  f"({busy / 16 / max(1, grpc_subscribers + sse_subscribers) * 1e6:.0f} µs "
                  "per subscriber-second)")
            for watcher in sse:
                await watcher.stop()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for channel in channels:
                await channel.close()

        sse_lags = [received - _ms(event["serverTime"])
                    for watcher in sse
                    for event, received in zip(watcher.events, watcher.received_ms, strict=True)
                    if event["type"] == "SHOW_EVENT_TYPE_COUNTDOWN"]
        print(_summary("native gRPC " + ("direct" if direct else "via edge"), grpc_lags,
                       grpc_subscribers))
        print(_summary("SSE via edge", sse_lags, sse_subscribers))
    finally:
        await stack.stop()


def _ms(rfc3339: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp() * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grpc", type=int, default=10_000, help="native gRPC subscribers")
    parser.add_argument("--sse", type=int, default=500, help="SSE subscribers")
    parser.add_argument("--connections", type=int, default=20,
                        help="HTTP/2 connections the gRPC subscribers share")
    parser.add_argument("--direct", action="store_true",
                        help="gRPC subscribers call sync_svc itself instead of the edge")
    args = parser.parse_args()
    # A SIGTERM (timeout, pkill) unwinds like Ctrl-C, so the mesh is stopped, not orphaned.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    asyncio.run(run(args.grpc, args.sse, args.connections, args.direct))


if __name__ == "__main__":
    main()
