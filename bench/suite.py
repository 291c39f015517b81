"""Every benchmark in one command, with ratios measured in the same run.

    python -m bench            # short: a few minutes
    python -m bench --full     # the figures the issues ask for (longer)
    python -m bench --only vote,seed --json bench.json

Runs each benchmark as its own process (each starts its own mesh, one after the other, so
they never compete), shows its output as it goes, and collects its figures. Absolute figures
depend on the machine and on whatever else runs on it; ratios measured minutes apart on the
same machine (the vote path against the no-op ceiling through the same edge, a simulated
show against that ceiling) are what compare across machines and over time. The load average
is printed with every benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Bench:
    name: str
    short: list[str]
    full: list[str]
    #: Reads the figures from the captured output and the scratch directory.
    figures: Callable[[str, Path], dict[str, Any]]


def _last_json_object(output: str) -> dict[str, Any]:
    """The JSON object printed last (vote_bench ends with its figures, indented)."""
    start = output.rfind("\n{")
    if start < 0:
        return {}
    try:
        parsed: dict[str, Any] = json.loads(output[start:])
    except ValueError:
        return {}
    return parsed


def _json_file(name: str) -> Callable[[str, Path], dict[str, Any]]:
    def read(_: str, scratch: Path) -> dict[str, Any]:
        path = scratch / name
        if not path.exists():
            return {}
        loaded: dict[str, Any] = json.loads(path.read_text())
        return loaded
    return read


def _lines_with(*words: str) -> Callable[[str, Path], dict[str, Any]]:
    """Benchmarks that print prose: keep the lines with figures."""
    def read(output: str, _: Path) -> dict[str, Any]:
        return {"lines": [line.strip() for line in output.splitlines()
                          if any(word in line for word in words)]}
    return read


def _loadtest(scenario: str, *arguments: str) -> list[str]:
    return [sys.executable, "-m", "bench.loadtest", scenario, "--no-live",
            "--out", "{scratch}/" + scenario, *arguments]


BENCHES = (
    Bench("vote",
          [sys.executable, "bench/vote_bench.py", "--duration", "5",
           "--modes", "bare,runtime,noop,json,grpc_noop,grpc,batch"],
          [sys.executable, "bench/vote_bench.py", "--duration", "10"],
          lambda output, _: _last_json_object(output)),
    Bench("ingest",
          [sys.executable, "-m", "bench.ingest_bench", "--votes", "2000",
           "--concurrency", "1,8,64"],
          [sys.executable, "-m", "bench.ingest_bench"],
          _lines_with("concurrency")),
    Bench("seed",
          _loadtest("seed", "--users", "1000"),
          _loadtest("seed", "--compress", "30"),
          _json_file("seed/report.json")),
    Bench("shownight",
          _loadtest("shownight", "--window", "900", "--compress", "15", "--peak-rate", "200",
                    "--spike-seconds", "20", "--performances", "2"),
          _loadtest("shownight", "--window", "1800", "--compress", "15", "--peak-rate",
                    "400", "--spike-seconds", "60"),
          _json_file("shownight/report.json")),
    Bench("purchase",
          [sys.executable, "-m", "bench.purchase_bench", "--purchases", "200"],
          [sys.executable, "-m", "bench.purchase_bench", "--purchases", "1000"],
          lambda output, _: _last_json_object(output)),
    Bench("fraud",
          [sys.executable, "bench/fraud_bench.py", "--batches", "100", "--json",
           "{scratch}/fraud.json"],
          [sys.executable, "bench/fraud_bench.py", "--json", "{scratch}/fraud.json"],
          _json_file("fraud.json")),
    Bench("results",
          [sys.executable, "-m", "bench.results_bench", "--grpc", "1000", "--sse", "100",
           "--seconds", "5"],
          [sys.executable, "-m", "bench.results_bench"],
          _lines_with("p50", "p99", "CPU", "RSS", "subscribed")),
    Bench("audit",
          [sys.executable, "-m", "bench.audit_bench", "--votes", "1000000"],
          [sys.executable, "-m", "bench.audit_bench", "--votes", "10000000"],
          _lines_with("televote audit verify:")),
    Bench("report",
          [sys.executable, "-m", "bench.report_bench", "--votes", "300000", "--state-dir",
           "{scratch}/report"],
          [sys.executable, "-m", "bench.report_bench", "--votes", "10000000", "--state-dir",
           "{scratch}/report"],
          _lines_with("report of")),
    Bench("watch",
          [sys.executable, "-m", "bench.watch_bench", "--grpc", "1000", "--sse", "100"],
          [sys.executable, "-m", "bench.watch_bench"],
          _lines_with("p50", "p99", "CPU", "subscribed")),
    Bench("web",
          [sys.executable, "-m", "bench.web_bench", "--seconds", "10"],
          [sys.executable, "-m", "bench.web_bench", "--seconds", "30"],
          lambda output, _: _last_json_object(output)),
)


def ratios(figures: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Figures divided by the no-op ceiling measured in the same run."""
    vote = figures.get("vote", {})
    ceiling = vote.get("noop", {}).get("max_per_s")
    if not ceiling:
        return {}
    out = {f"{mode} max / no-op ceiling": vote[mode]["max_per_s"] / ceiling
           for mode in ("json", "grpc", "batch") if mode in vote}
    if vote.get("grpc") and vote.get("grpc_noop", {}).get("max_per_s"):
        out["grpc max / gRPC no-op ceiling"] = vote["grpc"]["max_per_s"] / \
            vote["grpc_noop"]["max_per_s"]
    if "json" in vote and vote["json"].get("p99_ms") and vote["noop"].get("p99_ms"):
        out["json p99 at 70 % / no-op p99 at 70 %"] = vote["json"]["p99_ms"] / \
            vote["noop"]["p99_ms"]
    bounds = vote.get("machine_bounds", {})
    for mode in ("json", "grpc"):
        if mode in vote and bounds.get(f"{mode}_if_votes_cost_as_in_a_batch"):
            out[f"{mode} max / its bound on this machine"] = vote[mode]["max_per_s"] / \
                bounds[f"{mode}_if_votes_cost_as_in_a_batch"]
    seed = figures.get("seed", {}).get("achieved", {})
    if seed:
        out["seed scenario acknowledged/s / no-op ceiling"] = seed["acknowledged_per_s"] / \
            ceiling
        out["seed scenario answered/s / offered/s"] = seed["answered_per_s"] / \
            figures["seed"]["plan"]["offered_rate_per_s"]
    spike = figures.get("shownight", {}).get("spike", {})
    if spike:
        out["shownight spike answered/s / no-op ceiling"] = spike["answered_per_s"] / ceiling
    return {name: round(value, 3) for name, value in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="the long versions")
    parser.add_argument("--only", help="comma-separated: " + ",".join(b.name for b in BENCHES))
    parser.add_argument("--json", help="write every figure and ratio to this file")
    options = parser.parse_args()
    chosen = options.only.split(",") if options.only else [b.name for b in BENCHES]
    unknown = set(chosen) - {b.name for b in BENCHES}
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    scratch = Path(tempfile.mkdtemp(prefix="bench-suite-"))
    figures: dict[str, dict[str, Any]] = {}
    timings: dict[str, dict[str, float]] = {}
    failed: list[str] = []
    for bench in BENCHES:
        if bench.name not in chosen:
            continue
        argv = [part.replace("{scratch}", str(scratch))
                for part in (bench.full if options.full else bench.short)]
        load = os.getloadavg()[0]
        print(f"=== {bench.name}: {' '.join(argv)}  (load average {load:.2f})", flush=True)
        started = time.monotonic()
        process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        assert process.stdout is not None
        lines = []
        for line in process.stdout:
            print(f"  {line}", end="", flush=True)
            lines.append(line)
        if process.wait() != 0:
            failed.append(bench.name)
        figures[bench.name] = bench.figures("".join(lines), scratch)
        timings[bench.name] = {"seconds": round(time.monotonic() - started, 1),
                               "load_average_before": round(load, 2)}
    measured = ratios(figures)
    print("\n=== ratios measured in this run")
    for name, value in measured.items():
        print(f"  {name:50s} {value:8.3f}")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    if options.json:
        Path(options.json).write_text(json.dumps(
            {"full": options.full, "figures": figures, "ratios": measured,
             "timings": timings, "failed": failed}, indent=2, default=str))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
