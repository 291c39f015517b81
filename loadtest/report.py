"""A run's figures: report.json, summary.md and plot.png (rate and latency over time).

Latency is from the planned send moment to the answer (so it includes any time a saturated
driver held the vote back); percentiles are over answered calls (acknowledged or refused).
How far the drivers themselves fell behind the plan is reported apart (`generator_figures`):
per second of the plan, votes planned against sent and how late the sends left, so a run
limited by the generator says so instead of passing for the platform's limit.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from loadtest.driver import Attempt, DriverRecord
from loadtest.plan import Plan
from loadtest.progress import percentile
from loadtest.transports import ERROR, OK
from loadtest.verify import Verdict


def figures(plan: Plan, attempts: list[Attempt], start_at: float, close_at: float,
            verdict: Verdict, resources: dict[str, dict[str, float]],
            load_average: list[float], notes: list[str],
            generator: dict[str, Any] | None = None) -> dict[str, Any]:
    answered = [a for a in attempts if a.outcome != ERROR]
    acked = [a for a in attempts if a.outcome == OK and not a.mismatch]
    last_answer = max((a.sent + a.latency_ms / 1000 for a in attempts), default=start_at)
    busy_s = max(1e-9, last_answer - start_at)
    config = plan.config
    spike_start = close_at - min(config.spike_s, config.wall_window_s)
    by_path: dict[str, list[float]] = defaultdict(list)
    spike_by_path: dict[str, list[float]] = defaultdict(list)
    for attempt in answered:
        path = plan.shots[attempt.shot].path
        by_path[path].append(attempt.latency_ms)
        if spike_start <= attempt.sent < close_at:
            spike_by_path[path].append(attempt.latency_ms)
    per_second = Counter(int(a.sent - start_at) for a in answered)
    return {
        "run_id": plan.run_id,
        "scenario": config.scenario,
        "config": {k: (list(v) if isinstance(v, tuple) else v)
                   for k, v in vars(config).items()},
        "plan": {"votes": len(plan.shots), "users": len({s.user for s in plan.shots}),
                 "paid_votes_granted": sum(plan.grants.values()),
                 "offered_rate_per_s": round(len(plan.shots) / config.wall_window_s, 1)},
        "achieved": {
            "requests": len(attempts),
            "answered_per_s": round(len(answered) / busy_s, 1),
            "acknowledged": len(acked),
            "acknowledged_per_s": round(len(acked) / busy_s, 1),
            "peak_answered_per_s_1s": max(per_second.values(), default=0),
            "seconds": round(busy_s, 1),
        },
        "latency_ms": {path: _percentiles(values) for path, values in sorted(by_path.items())},
        "spike": {
            "seconds": round(close_at - spike_start, 1),
            "answered_per_s": round(sum(len(v) for v in spike_by_path.values())
                                    / max(1e-9, close_at - spike_start), 1),
            "latency_ms": {path: _percentiles(values)
                           for path, values in sorted(spike_by_path.items())},
        },
        "refused_by_reason": dict(Counter(a.reason for a in attempts
                                          if a.outcome not in (OK, ERROR)).most_common()),
        "errors_by_reason": dict(Counter(a.reason for a in attempts
                                         if a.outcome == ERROR).most_common()),
        "by_label": _by_label(plan, attempts) if config.scenario == "bots" else {},
        "verification": {"ok": verdict.ok, "failures": verdict.failures,
                         **{k: v for k, v in verdict.facts.items()}},
        "generator": generator or {},
        "resources": resources,
        "load_average": {"start": load_average[0] if load_average else None,
                         "max": max(load_average, default=None),
                         "end": load_average[-1] if load_average else None},
        "notes": notes,
    }


#: A send counts as held back by the driver when it waited this long for an in-flight slot or
#: a connection (opening one takes a few ms on a busy machine; that is not the cap binding).
HELD_MS = 10.0


def generator_figures(plan: Plan, attempts: list[Attempt], records: list[DriverRecord],
                      start_at: float) -> dict[str, Any]:
    """Did the drivers keep to the plan? Per second of the plan: votes planned, first
    requests that left in that second, and the p99 and max of how late the sends planned in
    it left; overall lateness, sends that waited for the in-flight cap, each driver's CPU.
    `lagged` when some second's p99 exceeds the config's `lag_threshold_ms`."""
    threshold = plan.config.lag_threshold_ms
    firsts = [a for a in attempts if a.first]
    seconds = max([int(shot.at) + 1 for shot in plan.shots]
                  + [int(a.sent + a.late_ms / 1000 - start_at) + 1 for a in firsts] + [0])
    planned, sent = [0] * seconds, [0] * seconds
    late: list[list[float]] = [[] for _ in range(seconds)]
    for shot in plan.shots:
        planned[max(0, int(shot.at))] += 1
    for attempt in firsts:
        sent[max(0, int(attempt.sent + attempt.late_ms / 1000 - start_at))] += 1
        late[max(0, int(attempt.sent - start_at))].append(attempt.late_ms)
    per_second = [{"second": second, "planned": planned[second], "sent": sent[second],
                   "late_p99_ms": round(percentile(late[second], 99), 1) if late[second]
                   else None,
                   "late_max_ms": round(max(late[second]), 1) if late[second] else None}
                  for second in range(seconds)]
    lagged = [row for row in per_second
              if row["late_p99_ms"] is not None and row["late_p99_ms"] > threshold]
    every_late = [a.late_ms for a in firsts]
    held = [a.held_ms for a in firsts if a.held_ms >= HELD_MS]
    drivers = [{"worker": r.worker, "users": len(r.users),
                "sends": sum(1 for a in r.attempts if a.first),
                "requests": len(r.attempts), "cpu_s": round(r.cpu_s, 2),
                "busy_share": round(r.cpu_s / max(r.sending_s, 1e-9), 2),
                "waited_for_cpu_share": round(r.waited_for_cpu_s / max(r.sending_s, 1e-9), 2),
                "cpu_us_per_request": round(r.cpu_s / max(len(r.attempts), 1) * 1e6)}
               for r in sorted(records, key=lambda r: r.worker)]
    figures: dict[str, Any] = {
        "lag_threshold_ms": threshold, "lagged": bool(lagged),
        "lagged_seconds": len(lagged), "plan_seconds": sum(1 for n in planned if n),
        "late_ms": _percentiles(every_late),
        "worst_second": max(per_second, key=lambda r: r["late_p99_ms"] or 0.0, default=None),
        "held_by_in_flight_cap": len(held),
        "held_max_ms": round(max(held, default=0.0), 1),
        "planned_per_s_max": max(planned, default=0),
        "sent_per_s_max": max(sent, default=0),
        "drivers": drivers,
        "driver_cpu_us_per_request": round(sum(r.cpu_s for r in records)
                                           / max(len(attempts), 1) * 1e6),
        "per_second": per_second,
    }
    figures["verdict"] = lag_verdict(figures)
    return figures


def lag_verdict(generator: dict[str, Any]) -> str:
    """One line for the summary and the console: did the generator keep to its plan?"""
    late, threshold = generator["late_ms"], generator["lag_threshold_ms"]
    held = (f"; {generator['held_by_in_flight_cap']:,} sends waited >= {HELD_MS:.0f} ms for"
            f" an in-flight slot or a connection (up to {generator['held_max_ms']:,} ms)"
            if generator["held_by_in_flight_cap"] else "")
    drivers = generator["drivers"]
    starved = (f"; the drivers were busy {_shares(drivers, 'busy_share')} of the time and"
               f" waited for a core {_shares(drivers, 'waited_for_cpu_share')}"
               if drivers else "")
    if not generator["lagged"]:
        return (f"Load generator kept to its plan: sends left p99 {late['p99']} ms, max"
                f" {late['max']} ms after their planned moment (threshold {threshold:.0f} ms"
                f" per second){held}{starved}.")
    worst = generator["worst_second"]
    return (f"LOAD GENERATOR FELL BEHIND ITS PLAN in {generator['lagged_seconds']} of"
            f" {generator['plan_seconds']} seconds (p99 of a second's sends later than"
            f" {threshold:.0f} ms; worst: second {worst['second']}, {worst['planned']:,}"
            f" planned, {worst['sent']:,} sent, p99 {worst['late_p99_ms']:,} ms, max"
            f" {worst['late_max_ms']:,} ms late; overall p99 {late['p99']:,} ms){held}{starved}:"
            " the rates and latencies below are partly the generator's limit, not only the"
            " platform's.")


def _shares(drivers: list[dict[str, Any]], key: str) -> str:
    return "/".join(f"{driver[key]:.0%}" for driver in drivers)


def _percentiles(values: list[float]) -> dict[str, float]:
    return {"count": len(values), **{f"p{q}": round(percentile(values, q), 1)
                                     for q in (50, 95, 99)},
            "max": round(max(values, default=math.nan), 1)}


def _by_label(plan: Plan, attempts: list[Attempt]) -> dict[str, dict[str, int]]:
    """Bots scenario: what happened to each kind of voter (fraud's recall and false blocks)."""
    table: dict[str, Counter[str]] = defaultdict(Counter)
    for attempt in attempts:
        table[plan.shots[attempt.shot].label][attempt.reason or attempt.outcome] += 1
    return {label: dict(counts) for label, counts in sorted(table.items())}


def markdown(data: dict[str, Any]) -> str:
    achieved, verification = data["achieved"], data["verification"]
    lines = [
        f"# Load test {data['run_id']}: {data['scenario']}",
        "",
        f"- **Verification: {'PASSED' if verification['ok'] else 'FAILED'}**"
        f" ({verification.get('acknowledged', 0):,} acknowledged votes,"
        f" {verification.get('ledger_rows', 0):,} ledger rows)",
        f"- Offered {data['plan']['offered_rate_per_s']:,} votes/s"
        f" ({data['plan']['votes']:,} votes by {data['plan']['users']:,} users);"
        f" achieved {achieved['answered_per_s']:,} answers/s,"
        f" {achieved['acknowledged_per_s']:,} acknowledged/s"
        f" (peak second {achieved['peak_answered_per_s_1s']:,})",
        f"- Final result: {verification.get('final_counts', {})}",
        *([f"- Purchases: {verification['purchases']:,} packages bought"
           f" ({verification['votes_bought']:,} votes), {verification['refunds']:,} refunded"
           f" during voting ({verification['votes_clawed_back']:,} votes clawed back),"
           " reconciled with the wallets and the ledger"] if "purchases" in verification
          else []),
        f"- Load average: start {data['load_average']['start']},"
        f" max {data['load_average']['max']}",
    ]
    generator = data.get("generator") or {}
    if generator:
        lines.append(f"- **{generator['verdict']}**" if generator["lagged"]
                     else f"- {generator['verdict']}")
        lines.append(f"- Drivers: {len(generator['drivers'])} processes,"
                     f" {generator['driver_cpu_us_per_request']:,} µs CPU per request")
    for failure in verification["failures"]:
        lines.append(f"- FAILED: {failure}")
    lines += ["", "| path | answered | p50 ms | p95 ms | p99 ms | max ms |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for path, row in data["latency_ms"].items():
        lines.append(f"| {path} | {row['count']:,} | {row['p50']} | {row['p95']} | "
                     f"{row['p99']} | {row['max']} |")
    if data["scenario"] == "shownight":
        spike = data["spike"]
        lines += ["", f"Close-of-lines spike ({spike['seconds']} s):"
                  f" {spike['answered_per_s']:,} answers/s;"
                  + "; ".join(f" {path} p99 {row['p99']} ms"
                              for path, row in spike["latency_ms"].items())]
    lines += ["", "Refused: " + (", ".join(f"{k} {v:,}" for k, v in
                                            data["refused_by_reason"].items()) or "none"),
              "Errors: " + (", ".join(f"{k} {v:,}" for k, v in
                                        data["errors_by_reason"].items()) or "none"), ""]
    if data["by_label"]:
        lines += ["| voters | outcomes |", "| --- | --- |"]
        lines += [f"| {label} | {counts} |" for label, counts in data["by_label"].items()]
        lines.append("")
    lines += ["| process | CPU mean % | CPU max % | RSS max MiB |",
              "| --- | ---: | ---: | ---: |"]
    for role, usage in data["resources"].items():
        lines.append(f"| {role} | {usage['cpu_mean_pct']} | {usage['cpu_max_pct']} | "
                     f"{usage['rss_max_mib']} |")
    if generator.get("lagged"):
        worst = sorted((row for row in generator["per_second"] if row["late_p99_ms"]),
                       key=lambda row: -row["late_p99_ms"])[:10]
        lines += ["", "Seconds where the drivers fell furthest behind:", "",
                  "| second | planned | sent | late p99 ms | late max ms |",
                  "| ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {row['second']} | {row['planned']:,} | {row['sent']:,} | "
                  f"{row['late_p99_ms']:,} | {row['late_max_ms']:,} |" for row in worst]
    lines += [""] + [f"- {note}" for note in data["notes"]]
    return "\n".join(lines) + "\n"


def plot(path: Path, plan: Plan, attempts: list[Attempt], start_at: float,
         close_at: float) -> None:
    """Answers per second by outcome (by when the answer came: what the platform achieved),
    against the planned rate, and p50/p99 latency by path (by when the vote was due)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seconds = math.ceil(max((a.sent + a.latency_ms / 1000 - start_at for a in attempts),
                            default=0)) + 1
    rates: dict[str, list[int]] = {name: [0] * seconds for name in ("acknowledged", "refused",
                                                                     "error")}
    latencies: dict[str, list[list[float]]] = defaultdict(lambda: [[] for _ in range(seconds)])
    for attempt in attempts:
        answered = max(0, int(attempt.sent + attempt.latency_ms / 1000 - start_at))
        name = {OK: "acknowledged", ERROR: "error"}.get(attempt.outcome, "refused")
        rates[name][answered] += 1
        second = max(0, int(attempt.sent - start_at))
        if attempt.outcome != ERROR:
            latencies[plan.shots[attempt.shot].path][second].append(attempt.latency_ms)
    planned = [0] * seconds
    for shot in plan.shots:
        planned[min(seconds - 1, int(shot.at))] += 1
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    xs = list(range(seconds))
    sent = [0] * seconds
    for attempt in attempts:
        if attempt.first:
            sent[min(seconds - 1, max(0, int(attempt.sent + attempt.late_ms / 1000
                                             - start_at)))] += 1
    top.plot(xs, planned, color="grey", linestyle=":", label="planned")
    top.plot(xs, sent, color="black", linewidth=0.8, label="sent")
    top.stackplot(xs, rates["acknowledged"], rates["refused"], rates["error"],
                  labels=["acknowledged", "refused", "error"],
                  colors=["#2a9d8f", "#e9c46a", "#e63946"], alpha=0.8)
    top.set_ylabel("answers per second")
    top.legend(loc="upper left")
    top.set_title(f"{plan.config.scenario} {plan.run_id}: {len(plan.shots):,} votes, "
                  f"window {plan.config.window_s:.0f} s show time / "
                  f"{plan.config.wall_window_s:.0f} s wall")
    for path_name, buckets in sorted(latencies.items()):
        p50 = [percentile(b, 50) if b else math.nan for b in buckets]
        p99 = [percentile(b, 99) if b else math.nan for b in buckets]
        line = bottom.plot(xs, p99, label=f"{path_name} p99")[0]
        bottom.plot(xs, p50, color=line.get_color(), linestyle="--", label=f"{path_name} p50")
    bottom.axhline(100, color="red", linewidth=0.8, linestyle=":", label="100 ms")
    bottom.set_yscale("log")
    bottom.set_ylabel("latency ms (log)")
    bottom.set_xlabel("seconds since voting opened (latency: by the vote's planned moment)")
    bottom.legend(loc="upper left", ncol=3, fontsize=8)
    for axis in (top, bottom):
        axis.axvline(close_at - start_at, color="black", linewidth=1)
        for _, starts, ends in plan.performances:
            axis.axvspan(starts, ends, color="#457b9d", alpha=0.08)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write(out_dir: Path, data: dict[str, Any], plan: Plan, attempts: list[Attempt],
          start_at: float, close_at: float) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    (out_dir / "summary.md").write_text(markdown(data))
    plot(out_dir / "plot.png", plan, attempts, start_at, close_at)
