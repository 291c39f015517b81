"""The highest close-of-lines peak the machine sustains: shownight runs at rising peaks.

    python -m bench.peak_search --path json --peaks 150,300,500,800
    python -m bench.peak_search --path grpc --peaks 150,300,500,800 --json grpc.json

One stack (like `televote up`, started here), then for each peak a full shownight through the
edge on one path: quiet, performance bursts, and a close-of-lines spike holding the peak for
--spike-seconds up to the close, then the final result and the verification. A step is
sustained when the spike's p99 <= --p99-ms, no request ended in an error, and verification
passed. Stops after the first step that is not sustained (unless --keep-going). Prints each
step's figures and the load average (the machine is shared: read the figures with it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from loadtest.plan import LoadConfig
from loadtest.run import OWN_STACK_ENV, Target, run
from ops.processes import run_stopping_on_sigterm
from ops.stack import Stack, StackSettings


def step_figures(peak: float, result: Any, p99_limit: float) -> dict[str, Any]:
    figures = result.figures
    spike = figures["spike"]
    p99 = max((row["p99"] for row in spike["latency_ms"].values()), default=float("inf"))
    errors = sum(figures["errors_by_reason"].values())
    return {"peak_rate": peak, "spike_answered_per_s": spike["answered_per_s"],
            "spike_p99_ms": p99,
            "spike_p50_ms": max((row["p50"] for row in spike["latency_ms"].values()),
                                default=float("inf")),
            "errors": errors, "verification_ok": result.verdict.ok,
            "verification_failures": result.verdict.failures,
            "sustained": result.verdict.ok and errors == 0 and p99 <= p99_limit,
            "load_average_start": figures["load_average"]["start"],
            "load_average_max": figures["load_average"]["max"],
            "resources": figures["resources"], "report": str(result.out_dir)}


async def search(options: argparse.Namespace) -> list[dict[str, Any]]:
    replicas = {"vote_svc": options.vote_replicas}
    settings = StackSettings(state_dir=Path(tempfile.mkdtemp(prefix="peak-search-")),
                             edge_port=0, service_env=OWN_STACK_ENV)
    settings.replicas.update(replicas)
    stack = Stack(settings)
    await stack.start()
    steps: list[dict[str, Any]] = []
    try:
        for peak in (float(p) for p in options.peaks.split(",")):
            config = LoadConfig(scenario="shownight", window_s=options.window, compress=15,
                                peak_rate=peak, spike_s=options.spike_seconds,
                                performances=2, paths=(options.path,))
            out = Path(options.out) / f"{options.path}-{peak:.0f}"
            print(f"--- {options.path} peak {peak:.0f}/s, load average "
                  f"{os.getloadavg()[0]:.2f}", flush=True)
            result = await run(config, Target.of(stack), out, workers=options.workers,
                               live=False)
            step = step_figures(peak, result, options.p99_ms)
            steps.append(step)
            print(json.dumps({k: v for k, v in step.items() if k != "resources"}), flush=True)
            if not step["sustained"] and not options.keep_going:
                break
            await asyncio.sleep(5)  # let the previous round finish finalizing
    finally:
        await stack.stop()
    best = max((s["peak_rate"] for s in steps if s["sustained"]), default=None)
    print(f"highest sustained peak through {options.path}: {best} votes/s "
          f"(p99 <= {options.p99_ms} ms, no errors, verification passed)")
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--path", choices=("json", "grpc", "grpcweb"), default="json")
    parser.add_argument("--peaks", default="150,300,500,800")
    parser.add_argument("--spike-seconds", type=float, default=60)
    parser.add_argument("--window", type=float, default=1200,
                        help="show seconds; compressed 15x (default: 80 s of wall clock)")
    parser.add_argument("--p99-ms", type=float, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--vote-replicas", type=int, default=2)
    parser.add_argument("--out", default="loadtest-runs/peak-search")
    parser.add_argument("--keep-going", action="store_true",
                        help="run every step even after one is not sustained (noisy machines)")
    parser.add_argument("--json", help="save the steps to this file")
    options = parser.parse_args()
    steps = run_stopping_on_sigterm(search(options))
    if options.json:
        Path(options.json).write_text(json.dumps(steps, indent=2, default=str))


if __name__ == "__main__":
    main()
