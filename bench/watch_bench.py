"""How many WatchShow subscribers one sync_svc process feeds, and how late their countdown is.

Starts the real mesh (one replica of each service), opens a round, subscribes N native gRPC
streams (through the edge unless --direct) from several client processes, at most 100 streams
per HTTP/2 connection, opened at a steady rate (see bench/stream_load.py), and M Server-Sent-
Events streams through the edge; then runs a 14 s window and records, for every COUNTDOWN
event, how long after its scheduled second (its server_time) it arrived.

    python -m bench.watch_bench --grpc 10000 --sse 500

Prints p50/p99/max delivery lag per protocol, sync_svc's RSS growth per subscriber, the CPU
of every process involved while the window ran (sync_svc, Envoy, the client processes, this
one), and sync_svc's CPU per event delivered (robust to other load on the machine) and per
event sent to every subscriber (how long one countdown tick keeps one core busy).

The target is what the server process delivers, so the load must not be what is measured:
sync_svc gets the first CPU to itself and Envoy and every client process share the others
(`--no-pin` to let the scheduler mix them). Other load on the machine still shares the cores:
the lags are only as good as the machine is quiet, while the CPU figures hold on a busy one
(how long one event to every subscriber keeps a core busy is the lag's floor).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import tempfile
import time
from pathlib import Path

import psutil

from bench.stream_load import (
    BUCKET_MS,
    Clients,
    CpuMeter,
    Load,
    Report,
    open_sse,
)
from ops.processes import run_stopping_on_sigterm
from ops.stack import SERVICES, Stack, StackSettings
from runtime.access import Principal, Role
from tests.sync_support import Operator, SseWatcher, seconds

WINDOW_S = 14


class DirectOperator(Operator):
    @property
    def metadata(self):  # type: ignore[no-untyped-def]
        return Principal(Role.OPERATOR, "bench").to_metadata()


def _sse_report(watchers: list[SseWatcher]) -> Report:
    report = Report(opened=sum(bool(w.events) for w in watchers))
    for watcher in watchers:
        for event, received in zip(watcher.events, watcher.received_ms, strict=True):
            if event["type"] == "SHOW_EVENT_TYPE_COUNTDOWN":
                server_ms = round(_ms(event["serverTime"]))
                report.lags[max(0, int((received - server_ms) // BUCKET_MS))] += 1
    return report


def _pin(server: int, others: list[int]) -> str:
    """sync_svc on the first CPU, everything that loads it on the rest."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return "not pinned (one CPU)"
    for pids, where in (([server], cpus[:1]), (others, cpus[1:])):
        for pid in pids:
            for thread in os.listdir(f"/proc/{pid}/task"):  # a process's threads are pinned
                os.sched_setaffinity(int(thread), where)  # one by one
    return f"sync_svc pinned to CPU {cpus[0]}, Envoy and clients to {cpus[1:]}"


async def run(grpc_subscribers: int, sse_subscribers: int, processes: int, open_rate: float,
              direct: bool, pin: bool) -> None:
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

            groups = {"sync_svc": [sync_process.pid], "envoy": [envoy.pid] if envoy else [],
                      "gRPC clients": clients.pids, "bench (SSE clients)": [os.getpid()]}
            if pin:
                print(_pin(sync_process.pid, [pid for name, pids in groups.items()
                                              if name != "sync_svc" for pid in pids]))
            window, total = CpuMeter(groups), CpuMeter(groups)
            clients.start_measuring()
            sse_before = sum(len(w.events) for w in sse)
            window.start()
            total.start()
            load_before = os.getloadavg()
            await operator.call("OpenVoting", round_id=round_id, duration=seconds(WINDOW_S))
            await asyncio.sleep(WINDOW_S + 2)
            window.stop()
            load_after = os.getloadavg()
            await asyncio.sleep(15)  # late deliveries still count: the lag is not truncated
            total.stop()
            report = await clients.finish() if grpc_subscribers else None
            busy = window.used["sync_svc"]
            deliveries = (report.received if report else 0) + sum(
                len(w.events) for w in sse) - sse_before
            print(f"CPU while the window ran ({window.seconds:.0f} s): {window.summary()}; "
                  f"load average {load_before[0]:.2f} -> {load_after[0]:.2f}")
            per_event = total.used["sync_svc"] / max(1, deliveries)
            print(f"sync_svc: {busy / window.seconds / max(1, subscribers) * 1e6:.1f} µs CPU per "
                  f"subscriber-second, {per_event * 1e6:.1f} µs per event delivered "
                  f"({deliveries} events): one event to all {subscribers} subscribers keeps a "
                  f"core busy {per_event * subscribers * 1000:.0f} ms")
            for watcher in sse:
                await watcher.stop()

        if report is not None:
            print(report.summary("native gRPC " + ("direct" if direct else "via edge")))
        if sse_subscribers:
            print(_sse_report(sse).summary("SSE via edge"))
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
    parser.add_argument("--no-pin", action="store_true",
                        help="do not give sync_svc a CPU of its own")
    args = parser.parse_args()
    # A SIGTERM (timeout, pkill) unwinds like Ctrl-C, so the mesh is stopped, not orphaned.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    run_stopping_on_sigterm(run(args.grpc, args.sse, args.processes, args.open_rate,
                                args.direct, not args.no_pin))


if __name__ == "__main__":
    main()
