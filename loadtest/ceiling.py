"""The load generator's own ceiling: its drivers against a no-op edge on this machine.

    televote loadtest seed --ceiling              # per path: requests/s, CPU per request

A run that offers more than the generator can send measures the generator, not the platform.
This sends a scenario's own votes (its users, paths and request bodies, through the same
driver processes and clients as a real run) to a stand-in edge that answers every call at
once with a canned success: JSON and the carriers' SMS webhook and gRPC-Web over HTTP/1.1,
native gRPC over HTTP/2. Every vote of a path is due at the same moment, so the drivers send
as fast as they can with `IN_FLIGHT` calls each in flight, and the figures are:
- requests/s the drivers achieved (with the stand-in edge sharing the machine, as the real
  stack does: a lower bound of the drivers alone);
- the drivers' CPU per request (their own process time), and what that allows if they had
  every core to themselves;
- the stand-in edge's CPU per request, so a reader can see which side was the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import shutil
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil

from loadtest import grpcweb
from loadtest.driver import Drivers, WorkerJob, merge, shard
from loadtest.plan import ONCE, LoadConfig, build
from loadtest.transports import ERROR, SUBMIT_PATH

#: Votes per path in a ceiling run: enough for several seconds at any rate seen here.
VOTES_PER_PATH = 20_000
#: Calls each driver keeps in flight: enough to keep a no-op busy, few enough that the
#: answers come back within the clients' deadline (a real run allows more, for slow answers).
IN_FLIGHT = 256


def _serve_noop_edge(ports: Any) -> None:
    """Process entry: a stand-in edge that accepts every vote at once; puts its (gRPC port,
    HTTP port) on `ports`, then serves until terminated."""
    asyncio.run(_noop_edge(ports))


async def _noop_edge(ports: Any) -> None:
    import grpc
    from aiohttp import web

    from televote.vote.v1 import vote_service_pb2

    def reply() -> vote_service_pb2.SubmitVoteResponse:
        return vote_service_pb2.SubmitVoteResponse(vote_id=str(uuid.uuid4()))

    async def submit(_: Any, __: Any) -> vote_service_pb2.SubmitVoteResponse:
        return reply()

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "televote.vote.v1.VoteService", {"SubmitVote": grpc.unary_unary_rpc_method_handler(
            submit, request_deserializer=vote_service_pb2.SubmitVoteRequest.FromString,
            response_serializer=vote_service_pb2.SubmitVoteResponse.SerializeToString)}),))
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()

    async def json_vote(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"voteId": str(uuid.uuid4())})

    async def sms(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"outcome": "INBOUND_SMS_OUTCOME_VOTE_COUNTED",
                                  "voteId": str(uuid.uuid4()),
                                  "charge": {"currencyCode": "USD", "units": "0"}})

    async def grpc_web(request: web.Request) -> web.Response:
        await request.read()
        body = grpcweb.frame(reply().SerializeToString()) + grpcweb.trailer_frame(
            {"grpc-status": "0", "grpc-message": ""})
        return web.Response(body=body, content_type=grpcweb.CONTENT_TYPE)

    app = web.Application()
    app.router.add_post("/v1/rounds/{round}/votes", json_vote)
    app.router.add_post("/v1/carriers/{carrier}/sms", sms)
    app.router.add_post(SUBMIT_PATH, grpc_web)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
    await site.start()
    http_port = runner.addresses[0][1]
    ports.put((grpc_port, http_port))
    await asyncio.Event().wait()


async def measure(config: LoadConfig, workers: int, votes_per_path: int = VOTES_PER_PATH,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Per path of the scenario's plan: the drivers' requests/s and CPU per request against
    the no-op edge, beside the plan's own peak and mean rates."""
    plan = build(config)
    per_second = Counter(int(shot.at) for shot in plan.shots)
    offered = {"mean_per_s": round(len(plan.shots) / config.wall_window_s, 1),
               "peak_per_s_1s": max(per_second.values(), default=0)}
    context = multiprocessing.get_context("spawn")
    ports: Any = context.Queue()
    edge = context.Process(target=_serve_noop_edge, args=(ports,), name="loadtest-noop-edge",
                           daemon=True)
    edge.start()
    scratch = Path(tempfile.mkdtemp(prefix="loadtest-ceiling-"))
    results: dict[str, Any] = {"workers": workers, "offered": offered, "paths": {},
                               "load_average_start": round(os.getloadavg()[0], 2)}
    try:
        grpc_port, http_port = await asyncio.to_thread(ports.get, True, 60)
        edge_process = psutil.Process(edge.pid)
        contestant_ids = [str(uuid.uuid4()) for _ in range(config.contestants)]
        for path in sorted({shot.path for shot in plan.shots}):
            # The path's own votes, every one due now, sent once (no retries to a no-op).
            shots = [replace(shot, at=0.0, kind=ONCE) for shot in plan.shots
                     if shot.path == path][:votes_per_path]
            indexed = {id(shot): index for index, shot in enumerate(shots)}
            jobs = [WorkerJob(n, [(indexed[id(s)], s) for _, s in share], "ceiling",
                              contestant_ids, f"127.0.0.1:{grpc_port}",
                              f"http://127.0.0.1:{http_port}", scratch,
                              scratch / f"{path}-{n}.pickle", max_in_flight=IN_FLIGHT)
                    for n, share in enumerate(shard(shots, workers))]
            with Drivers(jobs) as drivers:
                await drivers.ready()
                edge_cpu = sum(edge_process.cpu_times()[:2])
                start_at = time.time() + 0.2
                drivers.go(start_at)
                records = await drivers.follow(lambda _: None)
                edge_cpu = sum(edge_process.cpu_times()[:2]) - edge_cpu
            attempts = merge(records)
            took = max(a.sent + a.latency_ms / 1000 for a in attempts) - start_at
            driver_us = sum(r.cpu_s for r in records) / len(attempts) * 1e6
            row = {"requests": len(attempts),
                   "errors": sum(1 for a in attempts if a.outcome == ERROR),
                   "requests_per_s": round(len(attempts) / took),
                   "driver_cpu_us_per_request": round(driver_us),
                   "drivers_alone_on_every_core_per_s": round(
                       (os.cpu_count() or 1) * 1e6 / driver_us),
                   "noop_edge_cpu_us_per_request": round(edge_cpu / len(attempts) * 1e6),
                   "load_average": round(os.getloadavg()[0], 2)}
            results["paths"][path] = row
            log(f"{path:8} {row['requests_per_s']:>7,} requests/s  drivers"
                f" {row['driver_cpu_us_per_request']:>5,} µs CPU/request (alone on"
                f" {os.cpu_count()} cores: {row['drivers_alone_on_every_core_per_s']:,}/s)"
                f"  no-op edge {row['noop_edge_cpu_us_per_request']:>4,} µs/request"
                f"  errors {row['errors']}  load average {row['load_average']}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        edge.terminate()
        with contextlib.suppress(Exception):
            edge.join(timeout=5)
    slowest = min((row["requests_per_s"] for row in results["paths"].values()), default=0)
    results["ceiling_per_s"] = slowest
    log(f"generator ceiling with {workers} drivers on this machine: {slowest:,} requests/s"
        f" on its slowest path; the plan offers {offered['mean_per_s']:,}/s on average,"
        f" {offered['peak_per_s_1s']:,} in its busiest second"
        + (" (ABOVE the ceiling: such a run measures the generator)"
           if offered["peak_per_s_1s"] > slowest else ""))
    return results
