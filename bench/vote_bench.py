"""Vote ingestion benchmark: durable accepted votes/s through the edge, and latency at 70 %.

    python bench/vote_bench.py [--duration 10] [--replicas 2]
        [--modes bare,runtime,noop,json,grpc_noop,grpc,batch] [--grpc-rates 400,800]
        [--fraud] [--cold] [--env VOTE_ADMIT_WAIT_MS=0 ...]

Starts its own mesh (like `televote up`, fraud scoring off unless --fraud: fraud_svc would,
rightly, block a benchmark's voters), opens a round per run whose quota and rate limit do not
bind, and for each mode measures:
- the maximum: closed-loop load, durable accepted votes per second (an OK is only sent after
  the ledger commit, and the run checks every acknowledged vote is in the ledger), at the
  load it is not shed at: if vote_svc refused more than 1 % of the calls (OVERLOADED: more
  calls in flight than it answers within its queue target), again with half as many in
  flight, and the most acknowledged votes/s of the tries counts (every try is printed with
  its refusals: they are neither the path's capacity nor hidden);
- p50/p99 latency with an open-loop load at 70 % of that maximum, as the load generator saw
  it, and (`edge_p99_ms_at_most`, through the edge) the bucket of Envoy's histogram of
  vote_svc's answer times that holds its p99: the service's side without the client's lag.
Modes: json (Envoy JSON transcoding, wrk with a Lua script) and its ceiling noop
(ListVotePackages through the same edge path, served from the catalogue cache); grpc (native
gRPC unary through Envoy) and its ceiling grpc_noop, both from bench/grpc_load (Go, with
Debian's golang-go and golang-google-grpc-dev, built on first use: a Python client took a
sixth of the machine); json and grpc vote as the same 5,000 voters, each of whom has cast a
first vote in the run's round before it is measured (`_warm_voters`; `--cold` without); batch
(VoteGatewayService.SubmitVotes of 1,000 votes, one client process per replica with one batch
in flight: gateways are inside the mesh); bare and runtime (bench/runtime_bench.py: a no-op
servicer on a bare grpc.aio server and through runtime/server.py, both over the mesh's mTLS,
called by the Go client as the edge calls a service; their figure is that server process's
CPU per call).
After the modes, `ratios` puts each vote path beside its no-op (votes/s, and CPU per call
as no-op / vote) and the runtime beside bare grpc.aio (CPU per call, runtime / bare).
wrk is a closed loop (each connection waits for its answer, then pauses): a stall delays its
next requests instead of queueing them, so its p99 leaves stalls out. The Go client sends on
schedule (open loop), as viewers do; compare gRPC's p99 with the gRPC no-op's.
Each maximum also prints the CPU time per accepted vote of every process of the run, by
role (each service's replicas, envoy, postgres backends by the service they serve and its
other processes, redis, and the load generator), in microseconds: on a shared machine this
is the steady figure, where votes/s depends on what else runs.
After the modes, `machine_bounds` says what this machine allows at best (see
`machine_bounds`): JSON and gRPC if every vote cost its path's no-op plus what a vote costs
inside a 1,000-vote batch, and batches if only Redis and PostgreSQL cost anything. A target
above its bound cannot be met on this machine by batching better.
No assertions on timing: it prints figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import grpc
import psutil
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import runtime_bench
from loadtest.verify import ledger_check
from ops import pki, tokens
from ops.edge import ONE_LOAD_GENERATOR
from ops.processes import run_stopping_on_sigterm
from ops.stack import Stack, StackSettings
from runtime import mesh
from runtime.access import Principal, Role
from runtime.mesh import MeshTls
from sms_svc.parsing import pseudonym
from televote.vote.v1 import (
    vote_gateway_service_pb2,
    vote_gateway_service_pb2_grpc,
    vote_service_pb2,
    vote_types_pb2,
)
from tests.support_windows import TestRound, open_test_round

#: Voters of the JSON and gRPC runs. Enough that each votes about as often as a person can
#: (a few times in a run): 500 voting twice a second each is bot traffic, which fraud_svc
#: (with --fraud) rightly reviews and audits, and that is not the cost being measured.
USERS = 5000

WRK_SCRIPT = """
local tokens = {%(tokens)s}
local round = "%(round)s"
local contestants = {%(contestants)s}
local pause = %(pause)s
ok, failed = 0, 0
math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))
local function uuid()
  return (string.gsub("xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx", "[xy]", function (c)
    local v = (c == "x") and math.random(0, 15) or math.random(8, 11)
    return string.format("%%x", v)
  end))
end
function setup(thread) table.insert(threads, thread) end
threads = {}
function request()
  local body = '{"requestId":"' .. uuid() .. '","contestantId":"' ..
    contestants[math.random(#contestants)] ..
    '","voteType":"VOTE_TYPE_FREE","count":1,"channel":"CHANNEL_WEB"}'
  return wrk.format("POST", "/v1/rounds/" .. round .. "/votes", {
    ["content-type"] = "application/json",
    ["authorization"] = "Bearer " .. tokens[math.random(#tokens)]}, body)
end
function response(status) if status == 200 then ok = ok + 1 else failed = failed + 1 end end
function delay() return pause end
function done(summary, latency, requests)
  local total_ok, total_failed = 0, 0
  for _, t in ipairs(threads) do
    total_ok = total_ok + t:get("ok"); total_failed = total_failed + t:get("failed")
  end
  io.write(string.format("RESULT %%d %%d %%d %%d %%d\\n", total_ok, total_failed,
    latency:percentile(50), latency:percentile(99), summary.duration))
end
"""


def _role(process: psutil.Process, clients: dict[int, str]) -> str:
    command = process.cmdline()
    if "-m" in command:  # a service replica: python -m vote_svc
        return command[command.index("-m") + 1]
    if any("multiprocessing" in part for part in command):
        return "load generator"
    if command and command[0].startswith("postgres: "):
        # A backend: "postgres: user db 127.0.0.1(port) state"; charged to its client.
        port = int(command[0].partition("(")[2].partition(")")[0] or 0)
        return f"postgres for {clients.get(port, 'others')}"
    return process.name().split()[0]


def _cpu_by_role() -> dict[str, float]:
    """CPU seconds so far of every process under this one, by role. Exited children (wrk,
    the gRPC client processes) are in RUSAGE_CHILDREN once reaped."""
    processes = psutil.Process().children(recursive=True)
    clients: dict[int, str] = {}  # local port of a service's connection -> the service
    for process in processes:
        try:
            command = process.cmdline()
            if "-m" in command:
                for connection in process.net_connections("tcp"):
                    clients[connection.laddr.port] = command[command.index("-m") + 1]
        except psutil.Error:
            continue
    totals: dict[str, float] = {}
    for process in processes:
        try:
            times = process.cpu_times()
            role = _role(process, clients)
        except psutil.Error:
            continue
        totals[role] = totals.get(role, 0.0) + times.user + times.system
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    totals["load generator"] = (totals.get("load generator", 0.0) + reaped.ru_utime
                                + reaped.ru_stime)
    return totals


def _cpu_per_vote(before: dict[str, float], after: dict[str, float],
                  votes: int) -> dict[str, int]:
    """Microseconds of CPU per accepted vote, by role, largest first, with the total."""
    used = {role: after[role] - before.get(role, 0.0) for role in after}
    per_vote = {role: round(seconds * 1e6 / max(votes, 1)) for role, seconds in
                sorted(used.items(), key=lambda item: -item[1]) if seconds > 0.005}
    return {**per_vote, "total": sum(per_vote.values())}


async def _edge_histogram(stack: Stack) -> dict[float, int]:
    """Envoy's cumulative histogram of vote_svc's answer times as the edge sees them (bucket
    upper bound in ms -> requests), read once Envoy has flushed what came before (it updates
    histograms every 5 s). Beside the client's figures, it tells the service's latency from
    the load generator's own lag (on the same two cores)."""
    await asyncio.sleep(5.5)
    url = f"http://127.0.0.1:{stack.admin_port}/stats/prometheus"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    buckets: dict[float, int] = {}
    for line in text.splitlines():
        if line.startswith('envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name="vote_svc"'):
            bound = line.partition('le="')[2].partition('"')[0]
            buckets[math.inf if bound == "+Inf" else float(bound)] = int(line.rsplit(" ", 1)[1])
    return buckets


def _p99_bound(before: dict[float, int], after: dict[float, int]) -> float | None:
    """The upper bound of the histogram bucket that holds the 99th percentile in between."""
    counts = {bound: after[bound] - before.get(bound, 0) for bound in sorted(after)}
    total = counts.get(math.inf, 0)
    for bound, count in counts.items():
        if total and count >= 0.99 * total:
            return bound
    return None


async def _round(stack: Stack) -> TestRound:
    return await open_test_round(stack.database_url, stack.redis_url, duration_ms=3_600_000,
                                 free_quota=1_000_000_000, rate_limit=1_000_000_000)


async def _ledger_check(stack: Stack, test_round: TestRound,
                        acknowledged: list[str] | int) -> int:
    """Rows of the round; raises if an acknowledged vote is missing or doubled (wrk only
    counts its acknowledgements, so for JSON the check is on the count)."""
    async with await psycopg.AsyncConnection.connect(stack.database_url) as connection:
        missing, doubled, rows = await ledger_check(
            connection, test_round.round_id,
            [] if isinstance(acknowledged, int) else acknowledged)
    if isinstance(acknowledged, int) and acknowledged > rows:
        raise SystemExit(f"{acknowledged} acknowledged but {rows} in the ledger")
    if missing or doubled:
        raise SystemExit(f"{len(missing)} acknowledged votes missing from the ledger, "
                         f"{len(doubled)} in it more than once")
    return rows


def _voter_tokens(stack: Stack) -> list[str]:
    """Tokens of USERS voters: the votes of a run spread over users as real ones do (one
    user's votes would all queue for the same ledger rows, and look like a bot's)."""
    return [tokens.mint(stack.settings.state_dir, Role.VOTER, f"b{n}") for n in range(USERS)]


def _wrk(stack: Stack, test_round: TestRound, duration: int, connections: int,
         pause_ms: int, path: str = "") -> tuple[int, int, float, float, float]:
    voter_tokens = ",".join(f'"{token}"' for token in _voter_tokens(stack))
    script = Path(tempfile.mkdtemp()) / "vote.lua"
    script.write_text(WRK_SCRIPT % {
        "tokens": voter_tokens, "round": test_round.round_id,
        "contestants": ",".join(f'"{c}"' for c in test_round.contestants),
        "pause": pause_ms})
    if path:  # the no-op ceiling: a GET of the same edge path
        script.write_text(script.read_text().replace(
            'return wrk.format("POST", "/v1/rounds/" .. round .. "/votes", {',
            f'body = nil; return wrk.format("GET", "{path}", {{'))
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "-s",
                          str(script), stack.edge_url], capture_output=True, text=True,
                         check=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("RESULT"))
    ok, failed, p50, p99, micros = (int(part) for part in line.split()[1:])
    return ok, failed, p50 / 1000, p99 / 1000, micros / 1e6


#: A request id the gRPC load generator replaces with a fresh UUID in every call.
ID_PLACEHOLDER = "00000000-0000-4000-8000-000000000000"
_GO_SOURCE = Path(__file__).resolve().parent / "grpc_load"
#: How the built generator's file (so its processes) are named: this, then its source's mtime.
GO_LOAD_GENERATOR_NAME = "televote-grpc_load"


def go_load_generator() -> Path:
    """Builds bench/grpc_load (Go, with Debian's packaged gRPC) once per change of its source."""
    source = _GO_SOURCE / "main.go"
    binary = (Path(tempfile.gettempdir())
              / f"{GO_LOAD_GENERATOR_NAME}-{int(source.stat().st_mtime)}")
    if not binary.exists():
        try:
            subprocess.run(["go", "build", "-o", str(binary), "."], cwd=_GO_SOURCE, check=True,
                           env={**os.environ, "GOPATH": "/usr/share/gocode",
                                "GO111MODULE": "off"})
        except (OSError, subprocess.CalledProcessError) as error:
            raise SystemExit("the gRPC runs need Go and its gRPC library: "
                             "apt-get install golang-go golang-google-grpc-dev") from error
    return binary


def _go_grpc(target: str, method: str, requests: list[bytes], voters: list[str],
             duration: float, concurrency: int, rate: float, *,
             tls: dict[str, str] | None = None, metadata: list[list[str]] | None = None,
             ) -> tuple[list[bytes], list[float], int]:
    """Unary calls from the Go load generator over 2 connections to `target`: closed loop
    (rate 0, `concurrency` calls in flight per connection) or open loop at `rate` calls/s.
    Each call sends requests[n % len] with a fresh request id in place of ID_PLACEHOLDER
    and the bearer token voters[n % len] (or the header metadata[n % len]), over mutual TLS
    with `tls` (bench/grpc_load's "tls") when given; returns the OK replies, their latencies
    (ms) and the failures."""
    job = {"targets": [target, target], "method": method, "seconds": duration,
           "concurrency": concurrency, "rate": rate, "tls": tls,
           "templates": [{"body": body.hex(), "uuid_at": [
               at for at in range(len(body)) if body.startswith(ID_PLACEHOLDER.encode(), at)]}
               for body in requests],
           "metadata": metadata or [["authorization", f"Bearer {token}"] for token in voters]}
    out = subprocess.run([str(go_load_generator())], input=json.dumps(job), text=True,
                         capture_output=True, check=True).stdout.splitlines()
    replies, latencies = [], []
    for line in out[:-1]:
        ms, reply = line.split(" ")
        latencies.append(float(ms))
        replies.append(bytes.fromhex(reply))
    return replies, latencies, int(out[-1].split()[1])


_SUBMIT_VOTE = "/televote.vote.v1.VoteService/SubmitVote"


def _vote_requests(test_round: TestRound) -> list[bytes]:
    """A free app vote for each contestant, request id to be filled in per call."""
    return [vote_service_pb2.SubmitVoteRequest(
        request_id=ID_PLACEHOLDER, round_id=test_round.round_id, contestant_id=contestant,
        vote_type=vote_types_pb2.VOTE_TYPE_FREE, count=1,
        channel=vote_types_pb2.CHANNEL_APP).SerializeToString()
        for contestant in test_round.contestants]


def _vote_ids(replies: list[bytes]) -> list[str]:
    return [vote_service_pb2.SubmitVoteResponse.FromString(reply).vote_id for reply in replies]


async def _warm_voters(stack: Stack, test_round: TestRound) -> None:
    """Every voter's first vote in `test_round`, as gateway batches (a FREE app vote each,
    from inside the mesh): the measured votes are then voters' later votes, whatever the
    machine's speed. A voter's first vote in a round also reads the voter from PostgreSQL
    and runs the admission script twice; with every run on a fresh round, a slow run was
    nearly all first votes and a fast one about half, so the mix, and with it the cost of a
    "vote", followed the load (`--cold` measures that mix)."""
    host, port = stack.addresses["vote_svc"][0]
    tls = MeshTls.load(stack.tls_dir("sms_svc")) if stack.settings.mtls else None
    async with mesh.channel(f"{host}:{port}", "vote_svc", tls) as channel:
        gateway = vote_gateway_service_pb2_grpc.VoteGatewayServiceStub(channel)
        for first in range(0, USERS, 1000):
            reply = await gateway.SubmitVotes(vote_gateway_service_pb2.SubmitVotesRequest(
                votes=[vote_gateway_service_pb2.GatewayVote(
                    request_id=str(uuid.uuid4()), user_id=f"b{n}", round_id=test_round.round_id,
                    contestant_id=test_round.contestants[n % len(test_round.contestants)],
                    vote_type=vote_types_pb2.VOTE_TYPE_FREE, count=1,
                    channel=vote_types_pb2.CHANNEL_APP)
                    for n in range(first, min(first + 1000, USERS))]),
                metadata=Principal(Role.INTERNAL, "bench").to_metadata(), timeout=60)
            refused = [r.error.reason for r in reply.results if not r.ok]
            if refused:
                raise SystemExit(f"warming the voters: {len(refused)} refused ({refused[0]})")


#: A path's closed-loop maximum is taken at the concurrency (calls in flight, of the load
#: generator) that acknowledges the most votes/s, trying fewer in turn while more than this
#: share of the calls were refused: with more calls in flight than the replicas answer
#: within their queue target, vote_svc refuses the excess (OVERLOADED, its design), and the
#: acknowledged votes/s of that loop measures the refusals' cost more than the path's
#: capacity. Every try is printed with its refusals. The no-ops are never refused.
_MAX_REFUSED = 0.01


def _ceiling(measure: Any, concurrencies: tuple[int, ...]) -> dict[str, Any]:
    """`measure(concurrency)` -> (acknowledged, refused, seconds, CPU per vote); the try with
    the most acknowledged votes/s, and every try."""
    tries: list[dict[str, Any]] = []
    best: dict[str, Any] = {}
    for concurrency in concurrencies:
        acked, refused, seconds, cpu = measure(concurrency)
        tries.append({"concurrency": concurrency, "per_s": round(acked / seconds),
                      "refused": refused})
        if not best or acked / seconds > best["per_s"]:
            best = {"per_s": acked / seconds, "refused": refused, "cpu": cpu,
                    "concurrency": concurrency}
        if refused <= _MAX_REFUSED * (acked + refused):
            break
    return {**best, "tries": tries}


def _batch_worker(args: tuple[str, str, list[str], float, float, int, str | None, bool],
                  ) -> Any:
    return asyncio.run(_batch_load(*args))


#: The key the bench's pseudonymous voters are made with (`_batches(pseudonyms=True)`).
_BENCH_PSEUDONYM_KEY = b"bench"


async def _batch_load(target: str, round_id: str, contestants: list[str], duration: float,
                      rate: float, seed: int, tls_dir: str | None, pseudonyms: bool = False,
                      ) -> tuple[list[str], list[float], int]:
    """Gateway batches of 1,000 votes, one in flight (rate 0) or open loop at `rate` calls/s;
    returns vote ids, latencies (ms), refusals. A vote's user is a new subscriber each
    ("sms:+855..." numbered in order), or with `pseudonyms` that number's keyed pseudonym
    ("sms:" and 32 hex digits, as sms_svc names a subscriber)."""
    acked: list[str] = []
    latencies: list[float] = []
    failures = 0
    tls = MeshTls.load(Path(tls_dir)) if tls_dir else None
    async with mesh.channel(target, "vote_svc", tls) as channel:
        gateway = vote_gateway_service_pb2_grpc.VoteGatewayServiceStub(channel)
        sent = 0
        gateway_metadata = Principal(Role.INTERNAL, "bench").to_metadata()

        def user(number: str) -> str:
            return "sms:" + (pseudonym(_BENCH_PSEUDONYM_KEY, number) if pseudonyms
                             else number)

        async def one() -> None:
            nonlocal failures, sent
            sent += 1
            start = time.perf_counter()
            try:
                reply = await gateway.SubmitVotes(vote_gateway_service_pb2.SubmitVotesRequest(
                    votes=[vote_gateway_service_pb2.GatewayVote(
                        request_id=str(uuid.uuid4()),
                        # A new thousand subscribers per call (per worker): each texts once.
                        user_id=user(f"+855{seed}{sent % 1000:03d}{n:03d}"),
                        round_id=round_id, contestant_id=contestants[n % len(contestants)],
                        vote_type=vote_types_pb2.VOTE_TYPE_PREMIUM_SMS, count=1,
                        channel=vote_types_pb2.CHANNEL_SMS) for n in range(1000)]),
                    metadata=gateway_metadata, timeout=30)
                acked.extend(r.accepted.vote_id for r in reply.results if r.ok)
                failures += sum(1 for r in reply.results if not r.ok)
            except grpc.aio.AioRpcError:
                failures += 1
                return
            latencies.append((time.perf_counter() - start) * 1000)

        end = time.perf_counter() + duration
        if rate <= 0:
            while time.perf_counter() < end:
                await one()
        else:
            tasks = set()
            interval, next_at = 1 / rate, time.perf_counter()
            while next_at < end:
                now = time.perf_counter()
                if now < next_at:
                    await asyncio.sleep(next_at - now)
                task = asyncio.create_task(one())
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                next_at += interval
            await asyncio.gather(*tasks)
    return acked, latencies, failures


def _batches(stack: Stack, test_round: TestRound, duration: float, rate: float, *,
             pseudonyms: bool = False) -> tuple[list[str], list[float], int]:
    """One Python client process per vote_svc replica, one batch in flight each (rate 0), or
    `rate` batches/s in all. Gateways are inside the mesh: they call the replicas directly,
    with sms_svc's certificate (the mesh believes an internal caller only from its own).
    `pseudonyms`: voters named as sms_svc names subscribers (_batch_load)."""
    targets = [f"{host}:{port}" for host, port in stack.addresses["vote_svc"]]
    tls_dir = str(stack.tls_dir("sms_svc")) if stack.settings.mtls else None
    with multiprocessing.get_context("spawn").Pool(len(targets)) as pool:
        parts = pool.map(_batch_worker, [
            (target, test_round.round_id, test_round.contestants, duration,
             rate / len(targets), seed, tls_dir, pseudonyms)
            for seed, target in enumerate(targets)])
    acked = [vote for part in parts for vote in part[0]]
    latencies = [ms for part in parts for ms in part[1]]
    return acked, latencies, sum(part[2] for part in parts)


def machine_bounds(results: dict[str, Any], cores: int) -> dict[str, int]:
    """The most votes/s this machine could carry per path, from the CPU per vote measured in
    this run: whether a throughput target can be met here at all.

    A path's maximum can be no higher than the machine's CPU over what each vote costs. The
    cheapest a vote's own work gets is inside a 1,000-vote batch (every script call, row and
    round trip shared by a thousand), so a JSON or gRPC vote costs at least its path's no-op
    (the same edge and framework) plus that. And no batch can go faster than the stores
    (Redis, PostgreSQL) allow, even if vote_svc and its client cost nothing. Optimistic on
    purpose: the kernel's own work, and the benchmark process, are in no figure.
    """
    budget = cores * 1e6  # µs of CPU per second
    batch = results.get("batch", {}).get("cpu_us_per_vote")
    if not batch:
        return {}
    # A batch vote's own work: everything but its client and the edge it does not cross.
    work = batch["total"] - batch.get("load generator", 0) - batch.get("envoy", 0)
    stores = sum(us for role, us in batch.items()
                 if role == "redis-server" or role.startswith("postgres"))
    bounds = {"batch_if_only_the_stores_cost": round(budget / stores)}
    for path, ceiling in (("json", "noop"), ("grpc", "grpc_noop")):
        if ceiling in results:
            no_op = results[ceiling]["cpu_us_per_vote"]["total"]
            bounds[f"{path}_if_votes_cost_as_in_a_batch"] = round(budget / (no_op + work))
    return bounds


#: The processes a call crosses (_cpu_by_role's roles): their CPU per call is the path's
#: cost. The rest of the mesh (results_svc's ticks, sync_svc, their PostgreSQL backends)
#: works at its own pace whatever the calls, and divided by fewer calls on a busy machine it
#: looked like a cost of the call; the load generators differ between the paths.
PATH_ROLES = ("vote_svc", "envoy", "postgres for vote_svc", "redis-server")


def ratios(results: dict[str, Any]) -> dict[str, float]:
    """What the run's modes come to side by side: each vote path's votes/s and CPU per call
    (its PATH_ROLES') against its no-op's (CPU as no-op / vote, so that for both 1 is the
    ceiling), and the runtime's CPU per call against bare grpc.aio's
    (runtime_bench.ratios)."""
    out: dict[str, float] = runtime_bench.ratios(results)
    for path, ceiling in (("json", "noop"), ("grpc", "grpc_noop")):
        if path in results and ceiling in results:
            vote, no_op = results[path], results[ceiling]
            out[f"{path}_over_{ceiling}_per_s"] = round(
                vote["max_per_s"] / max(no_op["max_per_s"], 1), 2)
            vote_cpu, no_op_cpu = (sum(mode["cpu_us_per_vote"].get(role, 0)
                                       for role in PATH_ROLES) for mode in (vote, no_op))
            out[f"{ceiling}_over_{path}_path_cpu"] = round(no_op_cpu / max(vote_cpu, 1), 2)
    return out


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else float("nan")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--modes", default="bare,runtime,noop,json,grpc_noop,grpc,batch")
    parser.add_argument("--fraud", action="store_true", help="keep fraud scoring on")
    parser.add_argument("--cold", action="store_true", help=(
        "measure JSON and gRPC votes without first casting every voter's first vote in "
        "the round (then the share of first votes follows the run's speed)"))
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help=(
        "a setting for the services (repeatable), e.g. --env VOTE_ADMIT_WAIT_MS=0"))
    parser.add_argument("--grpc-rates", default="", help=(
        "after the modes, gRPC votes open loop at each of these rates (votes/s, comma "
        "separated): latency and CPU per vote below the maximum"))
    options = parser.parse_args()
    env = {"TELEVOTE_GRACE_SECONDS": "5", "TELEVOTE_LOG_LEVEL": "WARNING"}
    if not options.fraud:
        env["FRAUD_TARGET"] = ""
    env.update(setting.split("=", 1) for setting in options.env)
    replicas = {"fraud_svc": 1, "sync_svc": 1, "vote_svc": options.replicas,
                "results_svc": 1, "sms_svc": 1}
    stack = Stack(StackSettings(state_dir=Path(tempfile.mkdtemp(prefix="vote-bench-")),
                                edge_port=0, replicas=replicas, service_env=env,
                                edge=ONE_LOAD_GENERATOR))
    await stack.start()
    if {"grpc", "grpc_noop", *runtime_bench.KINDS} & set(options.modes.split(",")) \
            or options.grpc_rates:
        go_load_generator()  # built before any CPU is measured
    results: dict[str, Any] = {}
    try:
        voters = _voter_tokens(stack)
        duration = int(options.duration)
        for mode in filter(None, options.modes.split(",")):
            test_round = await _round(stack)
            if mode in ("json", "grpc") and not options.cold:
                await _warm_voters(stack, test_round)
            if mode in ("json", "noop"):
                path = "/v1/vote-packages" if mode == "noop" else ""
                acknowledged = 0

                def wrk_max(connections: int, test_round: TestRound = test_round,
                            path: str = path) -> tuple[int, int, float, dict[str, int]]:
                    nonlocal acknowledged
                    before = _cpu_by_role()
                    ok, failed, _, _, seconds = _wrk(stack, test_round, duration, connections,
                                                     0, path)
                    acknowledged += ok
                    return ok, failed, seconds, _cpu_per_vote(before, _cpu_by_role(), ok)

                top = await asyncio.to_thread(_ceiling, wrk_max, (64, 32, 16))
                peak, failed, cpu = top["per_s"], top["refused"], top["cpu"]
                # wrk is a closed loop with a pause between a connection's requests, so the
                # rate it offers is connections / (pause + latency): a short run measures the
                # latency at about that load and the pause is set for 70 % with it.
                connections, target = 32, 0.7 * peak
                pause = max(1, int(connections * 1000 / target))
                ok_trial, _, _, _, trial_seconds = await asyncio.to_thread(
                    _wrk, stack, test_round, 3, connections, pause, path)
                latency_ms = connections * 1000 * trial_seconds / max(ok_trial, 1) - pause
                pause = max(1, int(connections * 1000 / target - latency_ms))
                edge_before = await _edge_histogram(stack)
                ok2, failed2, p50, p99, seconds2 = await asyncio.to_thread(
                    _wrk, stack, test_round, duration, connections, pause, path)
                edge_after = await _edge_histogram(stack)
                if mode == "json":
                    await _ledger_check(stack, test_round, acknowledged + ok_trial + ok2)
                results[mode] = {"max_per_s": round(peak), "refused": failed,
                                 "concurrency": top["concurrency"], "tries": top["tries"],
                                 "at70_per_s": round(ok2 / seconds2), "p50_ms": p50,
                                 "p99_ms": p99, "refused_at70": failed2,
                                 "edge_p99_ms_at_most": _p99_bound(edge_before, edge_after),
                                 "cpu_us_per_vote": cpu}
            elif mode in ("grpc", "grpc_noop"):
                if mode == "grpc":
                    method, requests = _SUBMIT_VOTE, _vote_requests(test_round)
                else:  # the ceiling of this path: the no-op through the same edge
                    method = "/televote.vote.v1.VoteService/ListVotePackages"
                    requests = [vote_service_pb2.ListVotePackagesRequest().SerializeToString()]
                replies: list[bytes] = []

                def grpc_max(concurrency: int, method: str = method,
                             requests: list[bytes] = requests, replies: list[bytes] = replies,
                             ) -> tuple[int, int, float, dict[str, int]]:
                    # concurrency: calls in flight in all (the generator's two connections)
                    before = _cpu_by_role()
                    got, _, refused = _go_grpc(stack.edge_target, method, requests, voters,
                                               duration, concurrency // 2, 0)
                    replies.extend(got)
                    return (len(got), refused, duration,
                            _cpu_per_vote(before, _cpu_by_role(), len(got)))

                top = await asyncio.to_thread(_ceiling, grpc_max, (128, 64, 32))
                peak, failed, cpu = top["per_s"], top["refused"], top["cpu"]
                edge_before = await _edge_histogram(stack)
                replies2, latencies, failed2 = await asyncio.to_thread(
                    _go_grpc, stack.edge_target, method, requests, voters, duration, 0,
                    0.7 * peak)
                edge_p99 = _p99_bound(edge_before, await _edge_histogram(stack))
                if mode == "grpc":
                    await _ledger_check(stack, test_round, _vote_ids(replies + replies2))
                results[mode] = {"max_per_s": round(peak), "refused": failed,
                                 "concurrency": top["concurrency"], "tries": top["tries"],
                                 "at70_per_s": round(len(replies2) / duration),
                                 "p50_ms": round(_pct(latencies, 50), 1),
                                 "p99_ms": round(_pct(latencies, 99), 1),
                                 "refused_at70": failed2, "edge_p99_ms_at_most": edge_p99,
                                 "cpu_us_per_vote": cpu}
            elif mode in runtime_bench.KINDS:
                # The runtime against bare grpc.aio: the no-op servicer in a process of its
                # own, mTLS with the mesh's certificates, called as the edge calls a service.
                results[mode] = await asyncio.to_thread(
                    runtime_bench.measure, mode, stack.tls_dir("vote_svc"),
                    stack.tls_dir(pki.EDGE), duration)
            else:  # batch
                # A gateway keeps one batch in flight per replica: a replica sheds calls past
                # VOTE_MAX_INFLIGHT_VOTES (500), and a batch of 1,000 fills it on its own.
                before = _cpu_by_role()
                acked, _, failed = await asyncio.to_thread(
                    _batches, stack, test_round, duration, 0)
                cpu = _cpu_per_vote(before, _cpu_by_role(), len(acked))
                peak = len(acked) / duration
                acked2, latencies, failed2 = await asyncio.to_thread(
                    _batches, stack, test_round, duration, 0.7 * peak / 1000)
                await _ledger_check(stack, test_round, acked + acked2)
                results[mode] = {"max_per_s": round(peak), "refused": failed,
                                 "at70_per_s": round(len(acked2) / duration),
                                 "p50_ms": round(_pct(latencies, 50), 1),
                                 "p99_ms": round(_pct(latencies, 99), 1),
                                 "refused_at70": failed2, "cpu_us_per_vote": cpu}
            print(mode, json.dumps(results[mode]), flush=True)
        if any(mode in results for mode in ("bare", "runtime", "json", "grpc")):
            results["ratios"] = ratios(results)
            print("ratios", json.dumps(results["ratios"]), flush=True)
        for rate in [float(rate) for rate in options.grpc_rates.split(",") if rate]:
            test_round = await _round(stack)
            edge_before = await _edge_histogram(stack)
            before = _cpu_by_role()
            replies, latencies, failed = await asyncio.to_thread(
                _go_grpc, stack.edge_target, _SUBMIT_VOTE, _vote_requests(test_round), voters,
                duration, 0, rate)
            cpu = _cpu_per_vote(before, _cpu_by_role(), len(replies))
            edge_p99 = _p99_bound(edge_before, await _edge_histogram(stack))
            await _ledger_check(stack, test_round, _vote_ids(replies))
            name = f"grpc_at_{rate:g}"
            results[name] = {"per_s": round(len(replies) / duration),
                             **{f"p{q}_ms": round(_pct(latencies, q), 1) for q in (50, 90, 99)},
                             "max_ms": round(max(latencies, default=math.nan), 1),
                             "refused": failed, "edge_p99_ms_at_most": edge_p99,
                             "cpu_us_per_vote": cpu}
            print(name, json.dumps(results[name]), flush=True)
        bounds = machine_bounds(results, len(os.sched_getaffinity(0)))
        if bounds:
            results["machine_bounds"] = bounds
            print("machine_bounds", json.dumps(bounds), flush=True)
    finally:
        await stack.stop()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    run_stopping_on_sigterm(main())
