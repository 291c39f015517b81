"""How many WatchShow subscribers one sync_svc process feeds, and how late their countdown is.

Starts the real mesh (one replica of each service), opens a round, subscribes N native gRPC
streams (through the edge unless --direct) from several client processes, at most 100 streams
per HTTP/2 connection, opened at a steady rate (see bench/stream_load.py), and M Server-Sent-
Events streams through the edge; then runs a 14 s window and records, for every COUNTDOWN
event, how long after its scheduled second (its server_time) it arrived.

    python -m bench.watch_bench --grpc 10000 --sse 500

Prints p50/p99/max delivery lag per protocol, sync_svc's RSS growth per subscriber, and its
CPU while the window ran, also per subscriber-second (robust to other load on the machine).
The load generator and Envoy run on the same cores as the server: the figures are a floor.
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

import psutil

from bench.stream_load import Clients, Load, open_sse
from ops.stack import SERVICES, Stack, StackSettings
from runtime.access import Principal, Role
from tests.sync_support import Operator, seconds

WINDOW_S = 14


class DirectOperator(Operator):
    @property
    def metadata(self):  # type: ignore[no-untyped-def]
        return Principal(Role.OPERATOR, "bench").to_metadata()


def _summary(name: str, lags: list[float], subscribers: int) -> str:
    if not lags:
        return f"{name}: no countdown events received"
    ordered = sorted(lags)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (f"{name}: {subscribers} subscribers, {len(lags)} countdown deliveries, lag p50 "
            f"{statistics.median(ordered):.0f} ms, p99 {p99:.0f} ms, max {ordered[-1]:.0f} ms")


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


async def run(grpc_subscribers: int, sse_subscribers: int, processes: int, open_rate: float,
              direct: bool) -> None:
    import grpc

    state_dir = Path(tempfile.mkdtemp(prefix="watch-bench-"))
    stack = Stack(StackSettings(state_dir=state_dir, edge_port=0,
                                replicas=dict.fromkeys(SERVICES, 1),
                                service_env={"SYNC_WATCHER_QUEUE": "32",
                                             "SYNC_MIN_WINDOW_MS": "1000"}))
    await stack.start()
    try:
        host, port = stack.addresses["sync_svc"][0]
        sync_process = psutil.Process(stack.child("sync_svc", 0).process.pid)
        envoy = psutil.Process(stack._edge.process.pid) if stack._edge else None
        async with grpc.aio.insecure_channel(f"{host}:{port}") as control_channel:
            operator = DirectOperator(stack, control_channel)
            episode_id, contestants = await operator.episode_with_contestants(2)
            round_id = (await operator.call("CreateRound", episode_id=episode_id,
                                            contestant_ids=contestants)).round.round_id
            await operator.call("StartShow", episode_id=episode_id)
            rss_before = sync_process.memory_info().rss

            target = f"{host}:{port}" if direct else stack.edge_target
            clients = Clients(Load(target, "watch", episode_id, grpc_subscribers,
                                   processes=processes, open_rate=open_rate))
            started = time.monotonic()
            opened = await clients.open() if grpc_subscribers else 0
            sse = await open_sse(stack.edge_target, f"/v1/episodes/{episode_id}/events",
                                 sse_subscribers)
            connected_s = time.monotonic() - started
            await asyncio.sleep(2)
            subscribers = opened + sum(bool(w.events) for w in sse)
            rss_after = sync_process.memory_info().rss
            per_subscriber = (rss_after - rss_before) / max(1, subscribers)
            print(f"subscribed {opened}/{grpc_subscribers} gRPC + "
                  f"{sum(bool(w.events) for w in sse)}/{sse_subscribers} SSE in "
                  f"{connected_s:.1f}s; sync_svc RSS {rss_before / 2**20:.0f} -> "
                  f"{rss_after / 2**20:.0f} MiB = {per_subscriber / 1024:.1f} KiB per subscriber")

            clients.start_measuring()
            cpu_before = _cpu(sync_process)
            envoy_before = _cpu(envoy) if envoy else 0.0
            load_before = os.getloadavg()
            await operator.call("OpenVoting", round_id=round_id, duration=seconds(WINDOW_S))
            await asyncio.sleep(WINDOW_S + 2)
            busy = _cpu(sync_process) - cpu_before
            envoy_busy = (_cpu(envoy) - envoy_before) if envoy else 0.0
            load_after = os.getloadavg()
            await asyncio.sleep(15)  # late deliveries still count: the lag is not truncated
            report = await clients.finish() if grpc_subscribers else None
            span = WINDOW_S + 2
            print(f"sync_svc CPU while the window ran: {busy / span * 100:.0f} % of one core "
                  f"({busy / span / max(1, subscribers) * 1e6:.1f} µs per subscriber-second); "
                  f"envoy {envoy_busy / span * 100:.0f} %; load average "
                  f"{load_before[0]:.2f} -> {load_after[0]:.2f}")
            for watcher in sse:
                await watcher.stop()

        if report is not None:
            print(report.summary("native gRPC " + ("direct" if direct else "via edge")))
        sse_lags = [received - _ms(event["serverTime"])
                    for watcher in sse
                    for event, received in zip(watcher.events, watcher.received_ms, strict=True)
                    if event["type"] == "SHOW_EVENT_TYPE_COUNTDOWN"]
        if sse_subscribers:
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
    parser.add_argument("--processes", type=int, default=4,
                        help="client processes for the gRPC subscribers")
    parser.add_argument("--open-rate", type=float, default=1000,
                        help="gRPC streams opened per second (all processes)")
    parser.add_argument("--direct", action="store_true",
                        help="gRPC subscribers call sync_svc itself instead of the edge")
    args = parser.parse_args()
    # A SIGTERM (timeout, pkill) unwinds like Ctrl-C, so the mesh is stopped, not orphaned.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    asyncio.run(run(args.grpc, args.sse, args.processes, args.open_rate, args.direct))


if __name__ == "__main__":
    main()
