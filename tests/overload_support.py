"""Load senders for the overload test: bench/grpc_load (Go) processes of their own, so that the
test measures the mesh, not its own client. Three Python sender processes offering ~1,800
votes/s on this 2-core machine fell 0.7 s behind their plan and took the CPU the mesh's
capacity had been measured with, so the surge measured the senders; a Go call costs a
fraction of a Python one.

Each sender is told its share of one plan (a start moment, a rate, or closed-loop callers)
and reports every call: its code, its latency (from its planned moment in an open loop) and
how late the sender started it, and for a failure its google.rpc.Status.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2, status_pb2

from bench.vote_bench import ID_PLACEHOLDER, go_load_generator
from runtime.errors import status_detail
from televote.vote.v1 import vote_service_pb2, vote_types_pb2

SUBMIT_VOTE = "/televote.vote.v1.VoteService/SubmitVote"
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


@dataclass(frozen=True)
class Answer:
    """One call's outcome."""

    latency_s: float
    ok: bool
    reason: str = ""
    retry_delay_ms: int | None = None
    #: How far behind its planned moment the sender started the call (open loop).
    late_s: float = 0.0


@dataclass(frozen=True)
class Plan:
    """What the senders do together: an open loop of `rate` calls/s in all, or `callers`
    closed-loop callers in all (each honouring refusals' retry delays), for `seconds`."""

    edge: str
    round_id: str
    contestant_id: str
    tokens: list[str]
    seconds: float
    rate: float = 0.0
    callers: int = 0


def _template(plan: Plan) -> dict[str, object]:
    body = vote_service_pb2.SubmitVoteRequest(
        request_id=ID_PLACEHOLDER, round_id=plan.round_id, contestant_id=plan.contestant_id,
        vote_type=vote_types_pb2.VOTE_TYPE_FREE, count=1,
        channel=vote_types_pb2.CHANNEL_APP).SerializeToString()
    return {"body": body.hex(), "uuid_at": [
        at for at in range(len(body)) if body.startswith(ID_PLACEHOLDER.encode(), at)]}


def _answer(line: str) -> Answer:
    code, ms, late, data = [*line.split(" "), ""][:4]
    if int(code) == 0:
        return Answer(float(ms) / 1000, True, late_s=float(late) / 1000)
    status = status_pb2.Status.FromString(bytes.fromhex(data))
    info = status_detail(status, error_details_pb2.ErrorInfo())
    retry = status_detail(status, error_details_pb2.RetryInfo())
    return Answer(float(ms) / 1000, False, info.reason if info else _CODE_NAMES[int(code)],
                  retry.retry_delay.ToMilliseconds() if retry else None, float(late) / 1000)


async def send(plan: Plan, senders: int, start_in_s: float = 1.0) -> list[Answer]:
    """Run `plan` from `senders` generator processes (each its share of the rate or the
    callers and of the voters, two connections to the edge each), all starting at one
    moment; every call's Answer."""
    binary = str(go_load_generator())
    start_at = int((time.time() + start_in_s) * 1000)
    template = _template(plan)

    async def one(k: int) -> list[Answer]:
        job = {"targets": [plan.edge, plan.edge], "method": SUBMIT_VOTE,
               "seconds": plan.seconds, "rate": plan.rate / senders,
               "concurrency": max(1, plan.callers // senders // 2),
               "templates": [template], "every_call": True, "start_at": start_at,
               # Each sender from a loopback address of its own: the edge's per-IP bucket
               # (2,000/s) bound one address at twice a quiet machine's capacity.
               "local_addr": f"127.0.0.{2 + k}",
               "metadata": [["authorization", f"Bearer {token}"]
                            for token in plan.tokens[k::senders]]}
        # One thread each, at the mesh's own priority. Below it (nice 10, as once here) a
        # sender read its answers late whenever the mesh kept the cores busy, and that wait
        # went into the latencies it reported: on a quiet 2-core machine the refusals' p99
        # was 145-167 ms at nice 10 against 105-126 ms at nice 0 (bench/RESULTS.md,
        # "Overload and the close"). How late it started its calls is reported either way.
        process = await asyncio.create_subprocess_exec(
            binary, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env={**os.environ, "GOMAXPROCS": "1"})
        out, err = await process.communicate(json.dumps(job).encode())
        assert process.returncode == 0, err.decode()
        return [_answer(line) for line in out.decode().splitlines()[:-1]]

    answers = await asyncio.gather(*(one(k) for k in range(senders)))
    return [answer for part in answers for answer in part]
