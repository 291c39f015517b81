"""Capacity: each path's sustainable maximum, and the seed scenario's highest compression.

    python -m bench.peak_search --paths json,grpc,grpcweb,sms
    python -m bench.peak_search --paths none --seed-compress 4,30
    python -m bench.peak_search --path grpc --peaks 150,300,500,800 --json grpc.json

One stack (like `televote up`, started here), then:
- per path (`--paths`; sms is the carriers' webhook, whose votes reach vote_svc in
  SubmitVotes batches), shownight runs at rising close-of-lines peaks through the edge on that
  path alone: quiet, performance bursts, and a spike holding the peak for --spike-seconds up
  to the close, then the final result and the verification. A step is sustained when the
  spike's p99 <= --p99-ms, no request ended in an error and verification passed. Peaks rise
  through --peaks until one is not sustained, then --refine bisections between the last
  sustained peak and the first that was not: the path's sustainable maximum.
- with --seed-compress LO,HI, full seed runs (10,000 users x 10 votes, every one verified) at
  compressions between LO and HI, searched by bisection (geometric, to whole numbers): the
  highest compression that passes with p99 <= --seed-p99-ms (1 s) and no request in error.
  `--seed-users 2000` runs the same rates in a fifth of the time (a window a fifth as long).

Every step also says whether the load generator kept to its plan (loadtest/report.py
`generator_figures`): a step that failed while the generator fell behind is marked
inconclusive ("generator-limited"), not the platform's limit. And every step prints what
the votes cost each process while voting (CPU seconds from the sampler, per acknowledged
vote), which is what docs/capacity.md turns into replicas and cores for a show of N votes/s.
The machine is shared: read every figure with the load average printed beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from loadtest.plan import PATHS, SMS, LoadConfig
from loadtest.run import OWN_STACK_ENV, RunResult, Target, run
from ops.edge import ONE_LOAD_GENERATOR
from ops.processes import run_stopping_on_sigterm
from ops.stack import Stack, StackSettings

#: The processes that serve votes (everything but the load drivers), for cores per vote.
STACK_ROLES = ("vote_svc", "fraud_svc", "sms_svc", "sync_svc", "results_svc", "envoy",
               "postgres", "redis")


def cost_figures(result: RunResult) -> dict[str, Any]:
    """CPU per acknowledged vote while voting, by process role (µs), and votes/s per core."""
    figures = result.figures
    acknowledged = max(1, figures["achieved"]["acknowledged"])
    cpu = figures.get("cpu_seconds_while_voting", {})
    per_vote = {role: round(seconds / acknowledged * 1e6) for role, seconds in cpu.items()}
    stack = sum(cpu.get(role, 0.0) for role in STACK_ROLES)
    vote_svc = cpu.get("vote_svc", 0.0)
    seconds = max(figures["achieved"]["seconds"], 1e-9)
    return {"cpu_us_per_vote": per_vote,
            "vote_svc_cores": round(vote_svc / seconds, 3),
            "stack_cores": round(stack / seconds, 3),
            "stack_cpu_us_per_vote": round(stack / acknowledged * 1e6),
            "votes_per_s_per_vote_svc_core": round(acknowledged / vote_svc) if vote_svc else None,
            "votes_per_s_per_stack_core": round(acknowledged / stack) if stack else None}


def marginal_cost(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """What one more vote a second costs, from the steps of one path: the slope of the cores
    vote_svc (and the whole stack) used while voting against the votes acknowledged per
    second. Per-vote averages at low rates also carry each process's fixed cost per second
    (timers, ticks, health checks); the slope leaves it out, and the intercept is it."""
    points = [(s["acknowledged_per_s"], s["vote_svc_cores"], s["stack_cores"]) for s in steps
              if s.get("acknowledged_per_s")]
    if len({rate for rate, _, _ in points}) < 2:
        return {}
    rates = [rate for rate, _, _ in points]
    vote_svc = statistics.linear_regression(rates, [cores for _, cores, _ in points])
    stack = statistics.linear_regression(rates, [cores for _, _, cores in points])
    return {"marginal_vote_svc_cpu_us_per_vote": round(vote_svc.slope * 1e6),
            "marginal_stack_cpu_us_per_vote": round(stack.slope * 1e6),
            "idle_vote_svc_cores": round(vote_svc.intercept, 3),
            "idle_stack_cores": round(stack.intercept, 3),
            "marginal_points": len(points)}


def _generator(result: RunResult) -> dict[str, Any]:
    generator = result.figures.get("generator") or {}
    return {"generator_lagged": bool(generator.get("lagged")),
            "generator_late_p99_ms": (generator.get("late_ms") or {}).get("p99"),
            "generator_late_max_ms": (generator.get("late_ms") or {}).get("max"),
            "generator_lagged_seconds": generator.get("lagged_seconds"),
            "generator_verdict": generator.get("verdict", "")}


def _outcome(passed: bool, generator: dict[str, Any], p99_ms: float,
             p99_limit: float) -> str:
    """A failed step is the generator's when it lagged and, without its own lateness (part of
    every latency, which runs from the planned moment), the p99 would have been within the
    limit; a p99 beyond the limit even after that is the platform's."""
    if passed:
        return "sustained"
    late = generator["generator_late_p99_ms"] or 0.0
    if generator["generator_lagged"] and p99_ms - late <= p99_limit:
        return "inconclusive: generator-limited"
    return "not sustained"


def step_figures(peak: float, result: RunResult, p99_limit: float) -> dict[str, Any]:
    figures = result.figures
    spike = figures["spike"]
    p99 = max((row["p99"] for row in spike["latency_ms"].values()), default=float("inf"))
    errors = sum(figures["errors_by_reason"].values())
    generator = _generator(result)
    sustained = result.verdict.ok and errors == 0 and p99 <= p99_limit
    return {"peak_rate": peak, "spike_answered_per_s": spike["answered_per_s"],
            "spike_p99_ms": p99,
            "spike_p50_ms": max((row["p50"] for row in spike["latency_ms"].values()),
                                default=float("inf")),
            "acknowledged_per_s": figures["achieved"]["acknowledged_per_s"],
            "errors": errors, "verification_ok": result.verdict.ok,
            "verification_failures": result.verdict.failures,
            "sustained": sustained,
            "outcome": _outcome(sustained, generator, p99, p99_limit),
            **generator, **cost_figures(result),
            "load_average_start": figures["load_average"]["start"],
            "load_average_max": figures["load_average"]["max"],
            "resources": figures["resources"], "report": str(result.out_dir)}


def seed_figures(compress: float, result: RunResult, p99_limit: float) -> dict[str, Any]:
    figures = result.figures
    p99 = max((row["p99"] for row in figures["latency_ms"].values()), default=float("inf"))
    errors = sum(figures["errors_by_reason"].values())
    generator = _generator(result)
    passed = result.verdict.ok and errors == 0 and p99 <= p99_limit
    return {"compress": compress, "offered_per_s": figures["plan"]["offered_rate_per_s"],
            "acknowledged_per_s": figures["achieved"]["acknowledged_per_s"],
            "p50_ms": max((row["p50"] for row in figures["latency_ms"].values()),
                          default=float("inf")),
            "p99_ms": p99, "errors": errors, "errors_by_reason": figures["errors_by_reason"],
            "refused_by_reason": figures["refused_by_reason"],
            "verification_ok": result.verdict.ok,
            "verification_failures": result.verdict.failures,
            "passed": passed, "outcome": _outcome(passed, generator, p99, p99_limit),
            **generator, **cost_figures(result),
            "load_average_start": figures["load_average"]["start"],
            "load_average_max": figures["load_average"]["max"],
            "report": str(result.out_dir)}


def _print_step(step: dict[str, Any]) -> None:
    print(json.dumps({k: v for k, v in step.items() if k != "resources"}), flush=True)


async def search_path(stack: Stack, path: str, options: argparse.Namespace) -> dict[str, Any]:
    """Rising peaks on one path until one is not sustained, then bisection."""
    steps: list[dict[str, Any]] = []

    async def step(peak: float) -> dict[str, Any]:
        config = LoadConfig(scenario="shownight", window_s=options.window, compress=15,
                            peak_rate=peak, spike_s=options.spike_seconds, performances=2,
                            paths=(PATHS[0] if path == SMS else path,),
                            sms_share=1.0 if path == SMS else 0.0)
        out = Path(options.out) / f"{path}-{peak:.0f}"
        print(f"--- {path} peak {peak:.0f}/s, load average {os.getloadavg()[0]:.2f}",
              flush=True)
        result = await run(config, Target.of(stack), out, workers=options.workers,
                           live=False, log=lambda _: None)
        figures = step_figures(peak, result, options.p99_ms)
        steps.append(figures)
        _print_step(figures)
        await asyncio.sleep(5)  # let the previous round finish finalizing
        return figures

    best, first_failed = await _rise_then_bisect(
        [float(p) for p in options.peaks.split(",")], step, lambda f: f["sustained"],
        options.refine, options.keep_going)
    summary = {"path": path, "sustainable_peak_per_s": best, "first_not_sustained": first_failed,
               "steps": steps}
    summary.update(marginal_cost(steps))
    best_step = next((s for s in steps if s["peak_rate"] == best), None)
    if best_step is not None:
        summary.update({k: best_step[k] for k in (
            "cpu_us_per_vote", "stack_cpu_us_per_vote", "votes_per_s_per_vote_svc_core",
            "votes_per_s_per_stack_core", "load_average_start", "load_average_max")})
    limited = [s["peak_rate"] for s in steps if s["outcome"].startswith("inconclusive")]
    print(f"=== {path}: sustainable maximum {best} votes/s (p99 <= {options.p99_ms} ms, no"
          f" errors, verification passed); first not sustained {first_failed}"
          + (f"; generator-limited steps {limited}" if limited else ""), flush=True)
    return summary


async def _rise_then_bisect(rising: list[float], step: Callable[[float], Awaitable[dict[str, Any]]],
                            passed: Callable[[dict[str, Any]], bool], refine: int,
                            keep_going: bool) -> tuple[float | None, float | None]:
    """Try `rising` values in order until one fails, then `refine` bisections between the
    last that passed and the first that failed. (best passed, lowest failed)."""
    best: float | None = None
    failed: float | None = None
    for value in rising:
        if passed(await step(value)):
            best = value if best is None else max(best, value)
        else:
            failed = value if failed is None else min(failed, value)
            if not keep_going:
                break
    for _ in range(refine):
        if best is None or failed is None or failed - best <= max(10.0, best * 0.05):
            break
        middle = round((best + failed) / 2, -1) or (best + failed) / 2
        if passed(await step(middle)):
            best = middle
        else:
            failed = middle
    return best, failed


async def search_seed(stack: Stack, options: argparse.Namespace) -> dict[str, Any]:
    """The highest --compress of the full seed scenario that passes with p99 <= the limit:
    the top of the range first (it may pass), then the bottom, then bisection."""
    low, high = (float(v) for v in options.seed_compress.split(","))
    runs: list[dict[str, Any]] = []

    async def step(compress: float) -> bool:
        # Fewer users than the seed's 10,000 keep its rate at each compression by a window
        # as much shorter: the same load, for less time.
        config = LoadConfig(scenario="seed", users=options.seed_users, compress=compress,
                            window_s=1800.0 * options.seed_users / 10_000)
        out = Path(options.out) / f"seed-{compress:g}"
        offered = config.users * config.votes_per_user / config.wall_window_s
        print(f"--- seed --compress {compress:g} ({offered:,.0f} votes/s offered), load"
              f" average {os.getloadavg()[0]:.2f}", flush=True)
        result = await run(config, Target.of(stack), out, workers=options.workers,
                           live=False, log=lambda _: None)
        figures = seed_figures(compress, result, options.seed_p99_ms)
        runs.append(figures)
        _print_step(figures)
        await asyncio.sleep(5)
        return bool(figures["passed"])

    best: float | None = None
    failed: float | None = None
    if await step(high):
        best = high
    elif low < high and not await step(low):
        failed = low
    else:
        best, failed = (low if low < high else None), high
        for _ in range(options.seed_steps):
            if best is None or failed is None or failed - best < 1:
                break
            middle = float(round(math.sqrt(best * failed)))
            if middle in (best, failed):
                break
            if await step(middle):
                best = middle
            else:
                failed = middle
    print(f"=== seed: highest passing --compress {best} (p99 <= {options.seed_p99_ms:g} ms,"
          f" no errors, verification passed); lowest failing {failed}", flush=True)
    return {"highest_passing_compress": best, "lowest_failing_compress": failed, "runs": runs}


async def search(options: argparse.Namespace) -> dict[str, Any]:
    # One load generator from one address: the edge's per-address and per-subject buckets
    # (the operator granting paid votes) would otherwise be what the search measures.
    settings = StackSettings(state_dir=Path(tempfile.mkdtemp(prefix="peak-search-")),
                             edge_port=0, service_env=OWN_STACK_ENV, edge=ONE_LOAD_GENERATOR)
    settings.replicas.update({"vote_svc": options.vote_replicas})
    stack = Stack(settings)
    await stack.start()
    results: dict[str, Any] = {"replicas": dict(settings.replicas), "cores": os.cpu_count(),
                               "paths": {}}
    try:
        for path in options.paths:
            results["paths"][path] = await search_path(stack, path, options)
        if options.seed_compress:
            results["seed"] = await search_seed(stack, options)
    finally:
        await stack.stop()
    print("=== summary (votes/s; vote_svc x"
          f"{options.vote_replicas}, {os.cpu_count()} cores shared with the drivers)")
    for path, row in results["paths"].items():
        print(f"{path:8} sustainable {row['sustainable_peak_per_s']}/s;"
              f" {row.get('votes_per_s_per_vote_svc_core')} votes/s per vote_svc core,"
              f" {row.get('votes_per_s_per_stack_core')} per core of the whole stack;"
              f" marginal µs/vote vote_svc {row.get('marginal_vote_svc_cpu_us_per_vote')},"
              f" stack {row.get('marginal_stack_cpu_us_per_vote')}"
              f" (load average {row.get('load_average_start')}..{row.get('load_average_max')})")
    if "seed" in results:
        print(f"seed     highest passing --compress {results['seed']['highest_passing_compress']}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--paths", default=None,
                        help="comma-separated: json, grpc, grpcweb, sms; 'none' for only the "
                             "seed search (default: --path)")
    parser.add_argument("--path", choices=(*PATHS, SMS), default="json")
    parser.add_argument("--peaks", default="150,300,500,800")
    parser.add_argument("--refine", type=int, default=2,
                        help="bisections between the last sustained and the first failed peak")
    parser.add_argument("--spike-seconds", type=float, default=60)
    parser.add_argument("--window", type=float, default=1200,
                        help="show seconds; compressed 15x (default: 80 s of wall clock)")
    parser.add_argument("--p99-ms", type=float, default=100)
    parser.add_argument("--seed-compress", default=None,
                        help="LO,HI: search the seed scenario's highest passing compression")
    parser.add_argument("--seed-p99-ms", type=float, default=1000)
    parser.add_argument("--seed-users", type=int, default=10_000,
                        help="the seed's 10,000 unless told (each votes 10 times); fewer keep "
                             "the seed's rate at each compression with a window as much "
                             "shorter (a quicker, shorter run at the same load)")
    parser.add_argument("--seed-steps", type=int, default=3,
                        help="bisections after the range's two ends")
    parser.add_argument("--workers", type=int, default=None,
                        help="load driver processes (default: one per core)")
    parser.add_argument("--vote-replicas", type=int, default=2)
    parser.add_argument("--out", default="loadtest-runs/peak-search")
    parser.add_argument("--keep-going", action="store_true",
                        help="run every step even after one is not sustained (noisy machines)")
    parser.add_argument("--json", help="save the figures to this file")
    options = parser.parse_args()
    chosen = options.paths if options.paths is not None else options.path
    options.paths = [] if chosen == "none" else [p.strip() for p in chosen.split(",")]
    unknown = set(options.paths) - {*PATHS, SMS}
    if unknown:
        parser.error(f"unknown paths {sorted(unknown)}; some of {', '.join((*PATHS, SMS))}")
    results = run_stopping_on_sigterm(search(options))
    if options.json:
        Path(options.json).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
