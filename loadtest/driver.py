"""Worker processes that send a plan's votes on time (open loop) and record every answer.

Each worker owns whole users (so one user's retries stay in one process), mints their tokens,
opens its connections, says it is ready, then waits for the shared start time. A vote is sent
at its planned moment whatever happened to earlier ones; if the worker has too many calls in
flight it waits, and the latency is measured from the planned moment, so a slow server shows
up as latency instead of silently lowering the offered rate (no coordinated omission).
Workers report counts and latencies to the parent twice a second for the live display.

Every first attempt also records how late it left against its planned moment (`late_ms`) and
how much of that it waited for the in-flight cap (`held_ms`), and each worker its own CPU
time while sending: the report says per second of the plan whether the drivers kept to it
(report.generator_figures), so a run limited by the generator is not read as the platform's
limit. `Drivers` runs the worker processes (the load test, and the generator's ceiling against
a no-op edge, loadtest/ceiling.py); `merge` joins their records for the verifier.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import os
import pickle
import queue as queue_module
import resource
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest.kannel_sms import KannelSmsClient
from loadtest.plan import (
    CARRIERS,
    DEADLINE_RETRY,
    DUPLICATE,
    MISMATCH,
    RESEND,
    SMS,
    Shot,
    sms_sender,
)
from loadtest.transports import ERROR, OK, Answer, Vote, VoteClient, client_for
from ops import tokens
from runtime.access import Role

#: A deadline that gives up before any vote can commit (a phone losing signal mid-call).
LOST_SIGNAL_TIMEOUT_S = 0.003
#: How many times a client retries an ERROR with the same request id (retries scenario).
MAX_RETRIES = 5


@dataclass(frozen=True, slots=True)
class Attempt:
    """One request on the wire and its answer."""

    shot: int  # index of the shot in the plan
    sent: float  # epoch seconds (planned moment for a first attempt)
    latency_ms: float
    outcome: str
    vote_id: str
    reason: str
    mismatch: bool = False  # sent with another contestant to provoke IDEMPOTENCY_MISMATCH
    #: How late the request left against `sent`, and how much of that it waited for a free
    #: in-flight slot or client connection (the cap binds when answers are slow: the driver
    #: is then closed-loop).
    late_ms: float = 0.0
    held_ms: float = 0.0
    #: The shot's first request (not a retry, resend or a double tap's second copy): the one
    #: the plan scheduled.
    first: bool = True
    worker: int = 0


@dataclass
class DriverRecord:
    """What one worker process did: its attempts, the users it owned (each user's votes are
    sent by one worker, in plan order) and its CPU seconds from the start to its last answer."""

    worker: int
    users: set[str]
    attempts: list[Attempt]
    cpu_s: float
    sending_s: float
    #: Seconds its event loop was ready to run but waited for a core (Linux schedstat): a
    #: driver late without being busy was starved by the machine's other processes.
    waited_for_cpu_s: float = 0.0


@dataclass
class WorkerJob:
    worker: int
    shots: list[tuple[int, Shot]]
    round_id: str
    contestant_ids: list[str]
    edge_target: str
    edge_url: str
    state_dir: Path
    result_path: Path
    timeout_s: float = 10.0
    retry_errors: bool = False
    #: Calls in flight at most (see `in_flight_cap`); HTTP clients get as many connections.
    max_in_flight: int = 4000
    #: SMS through Kannel: carrier -> its fake SMSC link's port (empty: the carrier API).
    kannel_smsc_ports: dict[str, int] = field(default_factory=dict)


@dataclass
class _Tally:
    """What happened since the last progress report."""

    sent: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (sent, ms)
    lateness: list[tuple[float, float]] = field(default_factory=list)  # (planned, late ms)


def worker_main(job: WorkerJob, reports: Any, start: Any, started: Any) -> None:
    """Process entry point (spawned): `reports` is a multiprocessing queue, `start` a
    multiprocessing Value('d') for the start epoch, set before the `started` Event."""
    asyncio.run(_work(job, reports, start, started))


async def _work(job: WorkerJob, reports: Any, start: Any, started: Any) -> None:
    users = {shot.user for _, shot in job.shots}
    voter_tokens = {user: tokens.mint(job.state_dir, Role.VOTER, user)
                    for user in {shot.user for _, shot in job.shots if shot.path != SMS}}
    carrier_tokens = {carrier: tokens.mint(job.state_dir, Role.CARRIER, carrier.lower())
                      for carrier in CARRIERS}
    paths = {shot.path for _, shot in job.shots}
    clients: dict[str, VoteClient] = {
        path: KannelSmsClient(job.kannel_smsc_ports)
        if path == SMS and job.kannel_smsc_ports else
        client_for(path, job.edge_target, job.edge_url, job.max_in_flight)
        for path in paths}
    for client in clients.values():
        if isinstance(client, KannelSmsClient):
            await client.connect()
    attempts: list[Attempt] = []
    tally = _Tally()
    reports.put(("ready", job.worker, None))
    await asyncio.to_thread(started.wait)
    start_at = float(start.value)
    cpu_at_start, runnable_at_start = time.process_time(), _waited_for_cpu_s()
    in_flight = asyncio.Semaphore(job.max_in_flight)
    reporter = asyncio.create_task(_report(job.worker, tally, reports))

    async def attempt(index: int, shot: Shot, planned: float, timeout: float,
                      mismatch: bool = False, held_ms: float = 0.0,
                      first: bool = False) -> Answer:
        contestant = (shot.contestant + (1 if mismatch else 0)) % len(job.contestant_ids)
        if shot.path == SMS:
            carrier, msisdn = sms_sender(shot.user)
            # The show's contestants have SMS numbers 1.. in the round's order.
            vote = Vote(carrier_tokens[carrier], shot.request_id, job.round_id,
                        job.contestant_ids[contestant], shot.vote_type, "SMS",
                        carrier=carrier, msisdn=msisdn, sms_number=contestant + 1)
        else:
            vote = Vote(voter_tokens[shot.user], shot.request_id, job.round_id,
                        job.contestant_ids[contestant], shot.vote_type,
                        "APP" if shot.path == "grpc" else "WEB", shot.device_id,
                        shot.latitude, shot.longitude)
        called = time.time()
        answer = await clients[shot.path].submit(vote, timeout)
        latency_ms = (time.time() - planned) * 1000
        # An HTTP client may hold the request for a free connection of its pool: that wait
        # was the generator's too.
        late_ms = (called - planned + answer.held_s) * 1000
        held_ms += answer.held_s * 1000
        attempts.append(Attempt(index, planned, latency_ms, answer.outcome, answer.vote_id,
                                answer.reason, mismatch, late_ms, held_ms, first, job.worker))
        tally.sent += 1
        tally.outcomes[answer.outcome if answer.outcome == OK else answer.reason] += 1
        tally.latencies.append((planned, latency_ms))
        if first:
            tally.lateness.append((planned, late_ms))
        return answer

    async def send(index: int, shot: Shot, planned: float, held_ms: float) -> None:
        try:
            if shot.kind == DUPLICATE:
                await asyncio.gather(
                    attempt(index, shot, planned, job.timeout_s, held_ms=held_ms, first=True),
                    attempt(index, shot, planned, job.timeout_s))
                return
            first_timeout = LOST_SIGNAL_TIMEOUT_S if shot.kind == DEADLINE_RETRY else \
                job.timeout_s
            answer = await attempt(index, shot, planned, first_timeout, held_ms=held_ms,
                                   first=True)
            retries = MAX_RETRIES if job.retry_errors or shot.kind == DEADLINE_RETRY else 0
            while answer.outcome == ERROR and retries > 0:
                retries -= 1
                await asyncio.sleep(0.05)
                answer = await attempt(index, shot, time.time(), job.timeout_s)
            if answer.outcome == OK and shot.kind in (RESEND, MISMATCH):
                await attempt(index, shot, time.time(), job.timeout_s,
                              mismatch=shot.kind == MISMATCH)
        finally:
            in_flight.release()

    tasks: set[asyncio.Task[None]] = set()
    for index, shot in job.shots:
        planned = start_at + shot.at
        delay = planned - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        waiting_since = time.perf_counter()
        await in_flight.acquire()
        held_ms = (time.perf_counter() - waiting_since) * 1000
        task = asyncio.create_task(send(index, shot, planned, held_ms))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    while tasks:
        await asyncio.gather(*list(tasks))
    record = DriverRecord(job.worker, users, attempts, time.process_time() - cpu_at_start,
                          time.time() - start_at, _waited_for_cpu_s() - runnable_at_start)
    reporter.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reporter
    _flush(job.worker, tally, reports)
    await asyncio.gather(*(client.close() for client in clients.values()))
    with job.result_path.open("wb") as file:
        pickle.dump(record, file)
    reports.put(("done", job.worker, None))


def _waited_for_cpu_s() -> float:
    """Seconds this thread (the event loop's) has spent runnable, waiting for a core; 0 where
    the kernel does not say (not Linux)."""
    try:
        return int(Path("/proc/thread-self/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def _flush(worker: int, tally: _Tally, reports: Any) -> None:
    if tally.sent:
        reports.put(("progress", worker, (tally.sent, dict(tally.outcomes), tally.latencies,
                                          tally.lateness)))
    tally.sent, tally.outcomes, tally.latencies, tally.lateness = 0, Counter(), [], []


async def _report(worker: int, tally: _Tally, reports: Any) -> None:
    while True:
        await asyncio.sleep(0.5)
        _flush(worker, tally, reports)


def load_record(path: Path) -> DriverRecord:
    with path.open("rb") as file:
        record: DriverRecord = pickle.load(file)
    return record


def merge(records: list[DriverRecord]) -> list[Attempt]:
    """All workers' attempts as one record for the verifier, in the order they were sent.

    Exactly-once verification needs each user's votes sent by one worker (retries and
    duplicates of a request from one client, a user's quota used in plan order), so a user
    found in two workers' records is a fault of the split, not of the platform.
    """
    owner: dict[str, int] = {}
    shared = set()
    for record in records:
        for user in record.users:
            if owner.setdefault(user, record.worker) != record.worker:
                shared.add(user)
    if shared:
        raise ValueError(f"{len(shared)} users were driven by more than one worker, e.g. "
                         f"{sorted(shared)[:3]}")
    attempts = [attempt for record in records for attempt in record.attempts]
    attempts.sort(key=lambda attempt: attempt.sent + attempt.late_ms / 1000)
    return attempts


def shard(shots: list[Shot], workers: int,
          texts_in_one: bool = False) -> list[list[tuple[int, Shot]]]:
    """Split a plan over `workers` by user (a stable hash), keeping each user's shots in plan
    order, so a user's votes stay in one process and reach the edge in order. `texts_in_one`:
    every SMS shot to the first worker (a fake SMSC link of Kannel takes one client at a
    time; an SMS voter only texts, so users still stay whole)."""
    shares: list[list[tuple[int, Shot]]] = [[] for _ in range(workers)]
    for index, shot in enumerate(shots):
        worker = 0 if texts_in_one and shot.path == SMS else zlib.crc32(shot.user.encode())
        shares[worker % workers].append((index, shot))
    return shares


def in_flight_cap(shots: list[Shot], workers: int, timeout_s: float) -> int:
    """Calls one driver may keep in flight: every vote of the plan's busiest second for as
    long as a call may take (its deadline), so the drivers stay open-loop whenever the
    platform answers within the deadline (a smaller cap held votes back for minutes, then
    sent them after the close), within the process's file descriptors (an HTTP call holds
    a connection)."""
    busiest = max(Counter(int(shot.at) for shot in shots).values(), default=0)
    wanted = math.ceil(busiest * timeout_s * 1.25 / max(workers, 1))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(256, min(wanted, soft - 1024))


def default_workers() -> int:
    """One driver process per core the machine has (each is one asyncio loop, one core at
    most), at least two so one slow process does not hold back every user, and at most 16:
    beyond that the shared start and the parent's progress queue cost more than they give."""
    return max(2, min(16, os.cpu_count() or 2))


class Drivers:
    """Worker processes for `jobs`: start them, wait until each is ready, give them one start
    moment, follow their progress, and read their records."""

    def __init__(self, jobs: list[WorkerJob]) -> None:
        context = multiprocessing.get_context("spawn")
        self.jobs = jobs
        self.reports: Any = context.Queue()
        self._start: Any = context.Value("d", 0.0)
        self._started: Any = context.Event()
        self.processes = [context.Process(
            target=worker_main, args=(job, self.reports, self._start, self._started),
            name=f"loadtest-driver-{job.worker}", daemon=True) for job in jobs]

    def __enter__(self) -> Drivers:
        for process in self.processes:
            process.start()
        return self

    def __exit__(self, *_: object) -> None:
        for process in self.processes:
            process.join(timeout=30 if process.exitcode == 0 else 0)
            if process.is_alive():
                process.terminate()

    async def ready(self) -> None:
        waiting = len(self.jobs)
        while waiting:
            self._check_alive()
            for kind, _, _ in await asyncio.to_thread(drain, self.reports, 0.2):
                waiting -= kind == "ready"

    def go(self, start_at: float) -> None:
        self._start.value = start_at
        self._started.set()

    async def follow(self, on_progress: Callable[[Any], None],
                     tick: Callable[[], None] = lambda: None) -> list[DriverRecord]:
        """Until every worker is done: progress payloads to `on_progress`, `tick` after each
        poll; then the workers' records."""
        running = len(self.jobs)
        while running:
            self._check_alive()
            for kind, _, payload in await asyncio.to_thread(drain, self.reports, 0.2):
                if kind == "progress":
                    on_progress(payload)
                running -= kind == "done"
            tick()
        return [load_record(job.result_path) for job in self.jobs]

    def _check_alive(self) -> None:
        for process in self.processes:
            if process.exitcode not in (None, 0):
                raise RuntimeError(f"{process.name} exited with {process.exitcode}")


def drain(reports: Any, timeout: float) -> list[tuple[str, int, Any]]:
    """Messages waiting in a multiprocessing queue (the first one waited for up to timeout)."""
    messages = []
    try:
        messages.append(reports.get(timeout=timeout))
        while True:
            messages.append(reports.get_nowait())
    except queue_module.Empty:
        pass
    return messages
