"""A cheap load generator for server streams (WatchShow, StreamResults): what the two stream
benches share.

The machine running the bench also runs the server and Envoy, so the client must cost little
per stream: several client processes (`spawn`), each with its own HTTP/2 connections carrying
at most `streams_per_connection` streams (a local subchannel pool per channel: grpc would
otherwise put every channel to one target on one shared connection), streams opened at a
steady rate rather than all at once, messages parsed only for their server time, and lags
kept as a histogram of 10 ms buckets instead of a list.

Lag is measured from the event's own server time (the tick it belongs to, stamped by the
server by the Redis clock) to its arrival here: the delay a viewer sees, independent of when
the bench asked for anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import psutil

from televote.results.v1 import results_service_pb2 as rpb
from televote.sync.v1 import show_watch_service_pb2 as watch
from tests.sync_support import SseWatcher

BUCKET_MS = 10
RETRYABLE = (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE,
             grpc.StatusCode.RESOURCE_EXHAUSTED)


@dataclass(frozen=True)
class Load:
    """What every client process does."""

    target: str
    #: "watch" (WatchShow, lag of COUNTDOWN events) or "results" (StreamResults, every update)
    kind: str
    subject_id: str  # the episode or the round
    subscribers: int
    processes: int = 4
    streams_per_connection: int = 100
    #: New streams per second, over all processes.
    open_rate: float = 1000.0
    metadata: tuple[tuple[str, str], ...] = ()


@dataclass
class Report:
    opened: int = 0
    retried_opens: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    lags: Counter[int] = field(default_factory=Counter)  # bucket -> deliveries
    received: int = 0  # every message that arrived while measuring, counted or not
    cpu_s: float = 0.0  # the client processes' own CPU

    def merge(self, other: Report) -> None:
        self.opened += other.opened
        self.retried_opens += other.retried_opens
        self.failures.update(other.failures)
        self.lags.update(other.lags)
        self.received += other.received
        self.cpu_s += other.cpu_s

    def percentile(self, q: float) -> float:
        total = sum(self.lags.values())
        if not total:
            return math.nan
        seen = 0
        for bucket in sorted(self.lags):
            seen += self.lags[bucket]
            if seen >= q * total:
                return (bucket + 1) * BUCKET_MS
        return math.nan

    def summary(self, name: str) -> str:
        deliveries = sum(self.lags.values())
        if not deliveries:
            return f"{name}: {self.opened} subscribers, nothing delivered while measuring"
        return (f"{name}: {self.opened} subscribers ({self.retried_opens} opened on a retry), "
                f"{deliveries} deliveries, lag p50 {self.percentile(0.5):.0f} ms, "
                f"p99 {self.percentile(0.99):.0f} ms, max {self.percentile(1.0):.0f} ms"
                + (f"; client processes used {self.cpu_s:.0f} s CPU" if self.cpu_s else "")
                + (f"; failed: {dict(self.failures)}" if self.failures else ""))


def _parser(kind: str) -> tuple[str, bytes, Callable[[bytes], tuple[bool, bool, int]]]:
    """The method, request, and a function from a message to (is a first message, counts
    towards lag, server time in ms)."""
    if kind == "watch":
        def watch_message(data: bytes) -> tuple[bool, bool, int]:
            event = watch.WatchShowResponse.FromString(data)
            return (event.type == watch.SHOW_EVENT_TYPE_SNAPSHOT,
                    event.type == watch.SHOW_EVENT_TYPE_COUNTDOWN,
                    event.server_time.ToMilliseconds())
        return "/televote.sync.v1.ShowWatchService/WatchShow", b"", watch_message

    def results_message(data: bytes) -> tuple[bool, bool, int]:
        update = rpb.StreamResultsResponse.FromString(data)
        return update.sequence == 1, update.sequence > 1, \
            update.results.server_time.ToMilliseconds()
    return "/televote.results.v1.ResultsService/StreamResults", b"", results_message


def _request(load: Load) -> bytes:
    if load.kind == "watch":
        return watch.WatchShowRequest(episode_id=load.subject_id).SerializeToString()
    return rpb.StreamResultsRequest(round_id=load.subject_id).SerializeToString()


def _worker(load: Load, share: int, index: int, out: Any, measure: Any, stop: Any) -> None:
    asyncio.run(_work(load, share, index, out, measure, stop))


async def _work(load: Load, share: int, index: int, out: Any, measure: Any, stop: Any) -> None:
    path, _, parse = _parser(load.kind)
    request = _request(load)
    connections = max(1, math.ceil(share / load.streams_per_connection))
    channels = [grpc.aio.insecure_channel(load.target, options=[
        ("grpc.use_local_subchannel_pool", 1), ("grpc.channel_id", index * 100_000 + n)])
        for n in range(connections)]
    report = Report()
    measuring = [False]
    started = asyncio.Event()
    first_seen = [0]

    async def subscriber(channel: grpc.aio.Channel) -> None:
        call_of = channel.unary_stream(path)
        opened = False
        for attempt in range(20):
            try:
                async for data in call_of(request, metadata=load.metadata):
                    first, counted, server_ms = parse(data)
                    if not opened:
                        opened = True
                        report.opened += 1
                        report.retried_opens += attempt > 0
                        first_seen[0] += 1
                        if first_seen[0] >= share:
                            started.set()
                    if measuring[0]:
                        report.received += 1
                        if counted and not first:
                            lag = time.time() * 1000 - server_ms
                            report.lags[max(0, int(lag // BUCKET_MS))] += 1
                return
            except grpc.aio.AioRpcError as error:
                if not opened and error.code() in RETRYABLE and attempt < 19:
                    await asyncio.sleep(0.5 + attempt * 0.25)
                    continue
                if opened and error.code() == grpc.StatusCode.CANCELLED:
                    return  # the bench ending it
                report.failures[f"{error.code().name}: {error.details()}"] += 1
                if not opened:
                    first_seen[0] += 1
                    if first_seen[0] >= share:
                        started.set()
                return

    per_process_rate = load.open_rate / load.processes
    tasks = []
    for n in range(share):
        tasks.append(asyncio.create_task(subscriber(channels[n % connections])))
        if n % 50 == 49:
            await asyncio.sleep(50 / per_process_rate)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(started.wait(), 300)
    out.put(("ready", index, report.opened))
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, measure.wait)
    measuring[0] = True
    await loop.run_in_executor(None, stop.wait)
    measuring[0] = False
    times = os.times()
    report.cpu_s = times.user + times.system
    out.put(("report", index, report))
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for channel in channels:
        await channel.close(None)


class Clients:
    """The client processes of one bench run."""

    def __init__(self, load: Load) -> None:
        context = multiprocessing.get_context("spawn")
        self._out = context.Queue()
        self._measure = context.Event()
        self._stop = context.Event()
        shares = [load.subscribers // load.processes
                  + (1 if i < load.subscribers % load.processes else 0)
                  for i in range(load.processes)]
        self._workers = [context.Process(target=_worker, args=(
            load, share, i, self._out, self._measure, self._stop), daemon=True)
            for i, share in enumerate(shares)]

    async def open(self) -> int:
        """Start the processes; returns how many streams were open once all have opened."""
        for worker in self._workers:
            worker.start()
        loop = asyncio.get_running_loop()
        opened = 0
        for _ in self._workers:
            _, _, count = await loop.run_in_executor(None, self._out.get)
            opened += count
        return opened

    @property
    def pids(self) -> list[int]:
        return [worker.pid for worker in self._workers if worker.pid is not None]

    def start_measuring(self) -> None:
        self._measure.set()

    async def finish(self) -> Report:
        self._stop.set()
        loop = asyncio.get_running_loop()
        total = Report()
        for _ in self._workers:
            _, _, report = await loop.run_in_executor(None, self._out.get)
            total.merge(report)
        for worker in self._workers:
            await loop.run_in_executor(None, worker.join, 30)
            if worker.is_alive():
                worker.kill()
        return total


class CpuMeter:
    """CPU seconds (user + system) that named groups of processes spend between `start` and
    `stop`: who was busy while a bench measured, so a saturated load generator shows."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self._groups = {name: [psutil.Process(pid) for pid in pids]
                        for name, pids in groups.items() if pids}
        self._before: dict[str, float] = {}
        self.used: dict[str, float] = {}
        self._started = 0.0
        self.seconds = 0.0

    def _now(self) -> dict[str, float]:
        return {name: sum(_cpu_s(p) for p in processes)
                for name, processes in self._groups.items()}

    def start(self) -> None:
        self._before = self._now()
        self._started = time.monotonic()

    def stop(self) -> None:
        self.seconds = time.monotonic() - self._started
        after = self._now()
        self.used = {name: after[name] - self._before[name] for name in after}

    def summary(self) -> str:
        """Each group's CPU while measuring, in % of one core."""
        return ", ".join(f"{name} {used / self.seconds * 100:.0f} %"
                         for name, used in self.used.items())


def _cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


async def open_sse(edge_target: str, path: str, count: int,
                   timeout: float = 120.0) -> list[SseWatcher]:
    """`count` SSE watchers of `path` through the edge, opened 50 at a time; returns once
    each has its first event, or when `timeout` runs out."""
    watchers = []
    for i in range(count):
        watchers.append(SseWatcher().start(edge_target, path))
        if i % 50 == 49:
            await asyncio.sleep(0.1)
    deadline = time.monotonic() + timeout
    while sum(bool(w.events) for w in watchers) < count \
            and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.2)  # polling other tasks' lists
    return watchers
