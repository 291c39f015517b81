"""A surge past capacity is answered, not queued (issue 22): offered twice the vote path's
capacity (measured in the same test) for 20 s, the mesh refuses the excess with UNAVAILABLE
`OVERLOADED` and a retry delay that differs from refusal to refusal, sooner than it answers
the votes it accepts.

The goodput (acknowledged votes/s against the capacity) is printed, not asserted: issue 22's
target of 0.8 held in one of two runs on a 2-core machine shared with other sessions
(bench/RESULTS.md, "Overload and the close"); assert it here once it holds.

Ratios of figures measured in the same run, never absolute times: the machine is shared.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from ops.stack import Stack
from tests.support_windows import TestRound, open_test_round
from tests.vote_support import query, stub, vote_request, voter

CAPACITY_S = 10.0
SURGE_S = 20.0
#: Callers while capacity is measured: enough to keep every replica busy while some of them
#: wait out a retry delay.
CLOSED_LOOP_CALLS = 32


@dataclass(frozen=True)
class Answer:
    sent: float  # planned moment (open loop) or actual send (closed loop), time.monotonic()
    latency_s: float
    ok: bool
    reason: str = ""
    retry_delay_ms: int | None = None
    message: str = ""


class Voters:
    """Fresh voters' tokens, handed out round-robin (each votes a few times, under the edge's
    per-subject limit and the round's rate limit)."""

    def __init__(self, stack: Stack, prefix: str, count: int) -> None:
        self._metadata = [voter(stack, f"{prefix}-{n}") for n in range(count)]
        self._next = 0

    def next(self) -> tuple[tuple[str, str]]:
        self._next = (self._next + 1) % len(self._metadata)
        return self._metadata[self._next]


async def _vote(channel: grpc.aio.Channel, test_round: TestRound, voters: Voters,
                sent: float) -> Answer:
    try:
        await stub(channel).SubmitVote(vote_request(test_round, contestant=0),
                                       metadata=voters.next(), timeout=10)
        return Answer(sent, time.monotonic() - sent, True)
    except grpc.aio.AioRpcError as error:
        latency = time.monotonic() - sent
        reason, delay = error.code().name, None
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
        for detail in status.details if status is not None else ():
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = info.reason
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                delay = retry.retry_delay.ToMilliseconds()
        return Answer(sent, latency, False, reason, delay, error.details() or "")


async def _closed_loop(channel: grpc.aio.Channel, test_round: TestRound, voters: Voters,
                       seconds: float) -> list[Answer]:
    answers: list[Answer] = []
    ends = time.monotonic() + seconds

    async def caller() -> None:
        while time.monotonic() < ends:
            answer = await _vote(channel, test_round, voters, time.monotonic())
            answers.append(answer)
            if answer.retry_delay_ms is not None:  # as a client should
                await asyncio.sleep(answer.retry_delay_ms / 1000)

    await asyncio.gather(*(caller() for _ in range(CLOSED_LOOP_CALLS)))
    return answers


async def _open_loop(channel: grpc.aio.Channel, test_round: TestRound, voters: Voters,
                     rate: float, seconds: float) -> tuple[list[Answer], float]:
    """Calls sent on schedule whatever the answers (latency from the planned moment); also
    how far behind its schedule the sender fell at worst (s)."""
    tasks = []
    start = time.monotonic()
    behind = 0.0
    for n in range(int(rate * seconds)):
        planned = start + n / rate
        delay = planned - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        behind = max(behind, -delay)
        tasks.append(asyncio.create_task(_vote(channel, test_round, voters, planned)))
    return list(await asyncio.gather(*tasks)), behind


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@pytest.mark.timeout(400)
async def test_twice_the_capacity_is_refused_quickly_as_overload_with_spread_retries(
        stack: Stack, edge_channel: grpc.aio.Channel) -> None:
    test_round = await open_test_round(stack.database_url, stack.redis_url, contestants=2,
                                       free_quota=1000, rate_limit=1000)
    # Warm-up: connections, the voters' caches, the fraud stream.
    await _closed_loop(edge_channel, test_round, Voters(stack, "warm", 200), 3)

    measured = await _closed_loop(edge_channel, test_round, Voters(stack, "capacity", 2000),
                                  CAPACITY_S)
    capacity = sum(answer.ok for answer in measured) / CAPACITY_S
    assert capacity > 0, {answer.reason for answer in measured}

    answers, behind = await _open_loop(edge_channel, test_round,
                                       Voters(stack, "surge", 4000), 2 * capacity, SURGE_S)
    accepted = [answer for answer in answers if answer.ok]
    refused = [answer for answer in answers if not answer.ok]
    goodput = len(accepted) / SURGE_S
    print(f"capacity {capacity:.0f}/s; offered {2 * capacity:.0f}/s (sender at most "
          f"{behind * 1000:.0f} ms behind); goodput {goodput:.0f}/s = "
          f"{goodput / capacity:.2f} of capacity; refused {len(refused)}; accepted p50/p99 "
          f"{_quantile([a.latency_s for a in accepted], 0.5) * 1000:.0f}/"
          f"{_quantile([a.latency_s for a in accepted], 0.99) * 1000:.0f} ms; refused p50/p99 "
          + (f"{_quantile([a.latency_s for a in refused], 0.5) * 1000:.0f}/"
             f"{_quantile([a.latency_s for a in refused], 0.99) * 1000:.0f} ms"
             if refused else "-"))

    print("capacity phase:", Counter(a.reason or "OK" for a in measured))
    print("surge refusals:", Counter((a.reason, a.message[:40]) for a in refused))
    # Where the accepted votes' time went before admission (the ledger keeps both times).
    rows = await query(stack.database_url,
                       "SELECT admitted_ms - received_ms AS waited FROM votes WHERE round_id = %s",
                       test_round.round_id)
    waits = [float(row["waited"]) for row in rows]
    print(f"edge -> admission ms p50/p90/p99: {_quantile(waits, 0.5):.0f}/"
          f"{_quantile(waits, 0.9):.0f}/{_quantile(waits, 0.99):.0f}")
    # The excess was refused, as overload, with a retry delay that spreads the retries.
    assert refused, "twice the capacity was all accepted: the capacity was not measured"
    assert {answer.reason for answer in refused} == {"OVERLOADED"}
    delays = [answer.retry_delay_ms for answer in refused]
    assert None not in delays
    assert len(set(delays)) > 1
    # Refused quickly: refusals are not the slow answers (a refused call waited a queue's
    # target at most, where an accepted one also waited for its commit).
    assert _quantile([a.latency_s for a in refused], 0.9) <= \
        _quantile([a.latency_s for a in accepted], 0.99)
