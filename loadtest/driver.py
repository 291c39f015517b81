"""Worker processes that send a plan's votes on time (open loop) and record every answer.

Each worker owns whole users (so one user's retries stay in one process), mints their tokens,
opens its connections, says it is ready, then waits for the shared start time. A vote is sent
at its planned moment whatever happened to earlier ones; if the worker has too many calls in
flight it waits, and the latency is measured from the planned moment, so a slow server shows
up as latency instead of silently lowering the offered rate (no coordinated omission).
Workers report counts and latencies to the parent twice a second for the live display.
"""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import queue as queue_module
import time
from collections import Counter
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
    max_in_flight: int = 4000
    #: SMS through Kannel: carrier -> its fake SMSC link's port (empty: the carrier API).
    kannel_smsc_ports: dict[str, int] = field(default_factory=dict)


@dataclass
class _Tally:
    """What happened since the last progress report."""

    sent: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (sent, ms)


def worker_main(job: WorkerJob, reports: Any, start: Any, started: Any) -> None:
    """Process entry point (spawned): `reports` is a multiprocessing queue, `start` a
    multiprocessing Value('d') for the start epoch, set before the `started` Event."""
    asyncio.run(_work(job, reports, start, started))


async def _work(job: WorkerJob, reports: Any, start: Any, started: Any) -> None:
    users = {shot.user for _, shot in job.shots if shot.path != SMS}
    voter_tokens = {user: tokens.mint(job.state_dir, Role.VOTER, user) for user in users}
    carrier_tokens = {carrier: tokens.mint(job.state_dir, Role.CARRIER, carrier.lower())
                      for carrier in CARRIERS}
    paths = {shot.path for _, shot in job.shots}
    clients: dict[str, VoteClient] = {
        path: KannelSmsClient(job.kannel_smsc_ports)
        if path == SMS and job.kannel_smsc_ports else
        client_for(path, job.edge_target, job.edge_url) for path in paths}
    for client in clients.values():
        if isinstance(client, KannelSmsClient):
            await client.connect()
    attempts: list[Attempt] = []
    tally = _Tally()
    reports.put(("ready", job.worker, None))
    await asyncio.to_thread(started.wait)
    start_at = float(start.value)
    in_flight = asyncio.Semaphore(job.max_in_flight)
    reporter = asyncio.create_task(_report(job.worker, tally, reports))

    async def attempt(index: int, shot: Shot, planned: float, timeout: float,
                      mismatch: bool = False) -> Answer:
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
        answer = await clients[shot.path].submit(vote, timeout)
        latency_ms = (time.time() - planned) * 1000
        attempts.append(Attempt(index, planned, latency_ms, answer.outcome, answer.vote_id,
                                answer.reason, mismatch))
        tally.sent += 1
        tally.outcomes[answer.outcome if answer.outcome == OK else answer.reason] += 1
        tally.latencies.append((planned, latency_ms))
        return answer

    async def send(index: int, shot: Shot, planned: float) -> None:
        try:
            if shot.kind == DUPLICATE:
                await asyncio.gather(attempt(index, shot, planned, job.timeout_s),
                                     attempt(index, shot, planned, job.timeout_s))
                return
            first_timeout = LOST_SIGNAL_TIMEOUT_S if shot.kind == DEADLINE_RETRY else \
                job.timeout_s
            answer = await attempt(index, shot, planned, first_timeout)
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
        await in_flight.acquire()
        task = asyncio.create_task(send(index, shot, planned))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    while tasks:
        await asyncio.gather(*list(tasks))
    reporter.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reporter
    _flush(job.worker, tally, reports)
    await asyncio.gather(*(client.close() for client in clients.values()))
    with job.result_path.open("wb") as file:
        pickle.dump(attempts, file)
    reports.put(("done", job.worker, None))


def _flush(worker: int, tally: _Tally, reports: Any) -> None:
    if tally.sent:
        reports.put(("progress", worker, (tally.sent, dict(tally.outcomes), tally.latencies)))
    tally.sent, tally.outcomes, tally.latencies = 0, Counter(), []


async def _report(worker: int, tally: _Tally, reports: Any) -> None:
    while True:
        await asyncio.sleep(0.5)
        _flush(worker, tally, reports)


def load_attempts(path: Path) -> list[Attempt]:
    with path.open("rb") as file:
        attempts: list[Attempt] = pickle.load(file)
    return attempts


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
