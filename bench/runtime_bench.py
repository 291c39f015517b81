"""What televote's runtime costs per RPC, side by side with a bare grpc.aio server.

    python -m bench.runtime_bench [--duration 6] [--repeat 2] [--kinds bare_plain,bare,runtime]
        [--rate 0]

Each kind is one server process answering the same no-op unary RPC
(VoteService.ListVotePackages, an empty reply) to the Go load generator (bench/grpc_load,
closed loop with 2 connections x 64 calls in flight, or `--rate` calls/s on schedule), for
`--duration` seconds:
- bare_plain: `grpc.aio.server()` with the generated servicer, plaintext;
- bare: the same over mutual TLS with the mesh's certificates (the transport vote_svc has);
- runtime: the same servicer through runtime/server.py's ServiceHost, as every service runs:
  its interceptor (caller identity from the mTLS peer and the edge's claims header, the
  access table, error translation, the OpenTelemetry span), health, reflection, logging and
  telemetry set-up and its garbage collector settings. The client presents the edge's
  certificate and a voter's claims header (5,000 voters in turn), as the edge does.
It prints each server's calls/s and CPU time per call (user + system of that process alone,
so the figure holds on a shared machine where calls/s does not), and the ratio of the
runtime's CPU per call to the bare mTLS server's (target: at most 1.5). Kinds alternate,
`--repeat` times, so drifts of the machine's speed hit both.
`bench/vote_bench.py --modes bare,runtime,...` runs the same measurement beside the vote
paths, in one run. No assertions on timing: it prints figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ops import pki
from runtime.access import Principal, Role
from runtime.config import ServiceConfig
from runtime.server import ServiceHost, quiet_gc
from televote.vote.v1 import vote_service_pb2, vote_service_pb2_grpc

KINDS = ("bare_plain", "bare", "runtime")
METHOD = "/televote.vote.v1.VoteService/ListVotePackages"
#: Voters whose claims headers the client sends in turn, as the edge forwards them.
VOTERS = 5000

_EMPTY = vote_service_pb2.ListVotePackagesResponse()


class _NoOp(vote_service_pb2_grpc.VoteServiceServicer):
    async def ListVotePackages(self, request: Any, context: Any) -> Any:
        return _EMPTY


class _Config(ServiceConfig):
    service_name = "runtime_bench"


async def _serve(kind: str, tls_dir: Path | None) -> None:
    """Serve the no-op as `kind` until stdin closes; the port goes to stdout first."""
    if kind == "runtime":
        quiet_gc()  # as run_service does for every service
        host = ServiceHost(_Config(database_url="unused", redis_url="unused",
                                   televote_tls_dir=tls_dir, televote_log_level="WARNING"),
                           storage=None)
        host.add(vote_service_pb2_grpc.add_VoteServiceServicer_to_server, _NoOp(),
                 vote_service_pb2.DESCRIPTOR.services_by_name["VoteService"])
        port = host.bind()
        await host.start()
        server = host.server
    else:
        server = grpc.aio.server()
        vote_service_pb2_grpc.add_VoteServiceServicer_to_server(_NoOp(), server)
        if kind == "bare" and tls_dir is not None:
            from runtime.mesh import MeshTls
            port = server.add_secure_port("127.0.0.1:0",
                                          MeshTls.load(tls_dir).server_credentials())
        else:
            port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
    print(port, flush=True)
    await asyncio.to_thread(sys.stdin.read)  # the parent closes stdin to stop it
    await server.stop(0)


def start(kind: str, tls_dir: Path) -> tuple[subprocess.Popen[str], int]:
    """A server process of `kind` (with `tls_dir` as its mesh identity) and its port."""
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.runtime_bench", "--serve", kind, "--tls-dir", str(tls_dir)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parent.parent)
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.strip():
        process.kill()
        raise SystemExit(f"the {kind} server did not start")
    return process, int(line)


def stop(process: subprocess.Popen[str]) -> None:
    assert process.stdin is not None
    process.stdin.close()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()


def _claims() -> list[list[str]]:
    return [list(Principal(Role.VOTER, f"b{n}").to_metadata()[0]) for n in range(VOTERS)]


def measure(kind: str, server_tls: Path, client_tls: Path, duration: float,
            rate: float = 0) -> dict[str, Any]:
    """One kind's server under load: calls/s and its CPU µs per call. Closed loop (rate 0),
    or `rate` calls/s sent on schedule: then every kind does the same calls per second and
    per wake-up, where closed-loop figures also differ by how many calls a slower server
    gets to handle per wake-up."""
    from bench.vote_bench import _go_grpc

    process, port = start(kind, server_tls)
    try:
        tls = None if kind == "bare_plain" else {
            "cert": str(client_tls / "cert.pem"), "key": str(client_tls / "key.pem"),
            "ca": str(client_tls / "ca.pem"), "server_name": pki.peer_name("vote_svc")}
        request = vote_service_pb2.ListVotePackagesRequest().SerializeToString()
        # A short warm-up: connections, TLS handshakes and first-call caches out of the figure.
        _go_grpc(f"127.0.0.1:{port}", METHOD, [request], [], 1, 8, 0, tls=tls,
                 metadata=_claims()[:100])
        server = psutil.Process(process.pid)
        before = server.cpu_times()
        replies, _, failed = _go_grpc(f"127.0.0.1:{port}", METHOD, [request], [], duration,
                                      0 if rate else 64, rate, tls=tls, metadata=_claims())
        after = server.cpu_times()
    finally:
        stop(process)
    calls = len(replies)
    cpu = (after.user - before.user) + (after.system - before.system)
    return {"per_s": round(calls / duration), "failed": failed,
            "cpu_us_per_call": round(cpu * 1e6 / max(calls, 1), 1)}


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The runtime's CPU per call against the bare servers'."""
    out = {}
    runtime = results.get("runtime", {}).get("cpu_us_per_call")
    for bare in ("bare", "bare_plain"):
        if runtime and results.get(bare, {}).get("cpu_us_per_call"):
            out[f"runtime_over_{bare}_cpu"] = round(runtime / results[bare]["cpu_us_per_call"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=6)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--rate", type=float, default=0, help=(
        "calls/s sent on schedule (0: closed loop, 2 connections x 64 in flight)"))
    parser.add_argument("--serve", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--tls-dir", type=Path, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.serve:
        asyncio.run(_serve(options.serve, options.tls_dir))
        return
    state_dir = Path(tempfile.mkdtemp(prefix="runtime-bench-"))
    server_tls, client_tls = state_dir / "vote_svc", state_dir / "edge"
    pki.issue(state_dir, "vote_svc", server_tls)
    pki.issue(state_dir, pki.EDGE, client_tls)
    print(f"load average {os.getloadavg()[0]:.1f}", flush=True)
    turns: list[dict[str, dict[str, Any]]] = []
    for turn in range(options.repeat):
        results = {}
        for kind in options.kinds.split(","):
            results[kind] = measure(kind, server_tls, client_tls, options.duration,
                                    options.rate)
            print(turn + 1, kind, json.dumps(results[kind]), flush=True)
        print(turn + 1, "ratios", json.dumps(ratios(results)), flush=True)
        turns.append(results)
        time.sleep(0.5)
    print(f"load average {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
