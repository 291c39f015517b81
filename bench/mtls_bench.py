"""What defence in depth costs (issue 21): the vote path with mutual TLS on against off, and
the edge's CPU per request with its abuse filters against without, measured in the same run.

    python bench/mtls_bench.py [--duration 8] [--repeat 2]

Starts a mesh per configuration (fraud scoring off, as in vote_bench: it would, rightly, block
a benchmark's voters), in turns so a neighbour's load on the shared machine falls on each
alike:
- plain: services in plaintext (StackSettings.mtls=False), edge filters on;
- mtls: the default mesh;
- mtls_nofilters: the default mesh with the edge's rate-limit buckets and body buffer off
  (EdgeSettings.abuse_filters=False).
Each takes JSON votes through the edge with wrk (64 connections, closed loop, 5,000 voters)
and then the no-op ListVotePackages, and prints votes/s, the no-op's requests/s and the CPU
per request of every process by role (bench/vote_bench.py's accounting). The per-IP bucket is
lifted for all three: wrk is one address. Ratios: mtls/plain throughput (issue: >= 0.9) and
the edge's (envoy's) CPU per no-op request with the filters against without.
No assertions on timing: it prints figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.vote_bench import _cpu_by_role, _cpu_per_vote, _round, _wrk
from ops.edge import ONE_LOAD_GENERATOR
from ops.stack import Stack, StackSettings

CONFIGURATIONS: dict[str, dict[str, Any]] = {
    "plain": {"mtls": False, "edge": ONE_LOAD_GENERATOR},
    "mtls": {"mtls": True, "edge": ONE_LOAD_GENERATOR},
    "mtls_nofilters": {"mtls": True, "edge": {**ONE_LOAD_GENERATOR, "abuse_filters": False}},
}


async def _measure(name: str, duration: int) -> dict[str, Any]:
    options = CONFIGURATIONS[name]
    stack = Stack(StackSettings(
        state_dir=Path(tempfile.mkdtemp(prefix=f"mtls-bench-{name}-")), edge_port=0,
        service_env={"FRAUD_TARGET": "", "TELEVOTE_LOG_LEVEL": "WARNING",
                     "TELEVOTE_GRACE_SECONDS": "5"},
        mtls=options["mtls"], edge=options["edge"]))
    await stack.start()
    try:
        figures: dict[str, Any] = {}
        for mode, path in (("votes", ""), ("noop", "/v1/vote-packages")):
            test_round = await _round(stack)
            before = _cpu_by_role()
            ok, failed, _, p99, seconds = await asyncio.to_thread(
                _wrk, stack, test_round, duration, 64, 0, path)
            cpu = _cpu_per_vote(before, _cpu_by_role(), ok)
            figures[mode] = {"per_s": round(ok / seconds), "refused": failed, "p99_ms": p99,
                             "cpu_us_per_request": cpu}
        return figures
    finally:
        await stack.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=2)
    options = parser.parse_args()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in CONFIGURATIONS}
    for _ in range(options.repeat):
        for name in CONFIGURATIONS:
            runs[name].append(await _measure(name, options.duration))
            print(name, json.dumps(runs[name][-1]), flush=True)

    def best(name: str, mode: str) -> int:
        return max(run[mode]["per_s"] for run in runs[name])

    def envoy_us(name: str) -> int:
        return min(run["noop"]["cpu_us_per_request"].get("envoy", 0) for run in runs[name])

    print(json.dumps({
        "votes_per_s": {name: best(name, "votes") for name in runs},
        "mtls_over_plain_votes": round(best("mtls", "votes") / best("plain", "votes"), 3),
        "mtls_over_plain_noop": round(best("mtls", "noop") / best("plain", "noop"), 3),
        "envoy_cpu_us_per_noop": {"filters": envoy_us("mtls"),
                                  "no_filters": envoy_us("mtls_nofilters")},
    }, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
