"""The live terminal display while a run goes (rich), and the running figures behind it."""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from rich.console import Console
from rich.live import Live
from rich.table import Table

from loadtest.transports import OK


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


@dataclass
class Progress:
    """Aggregates the workers' reports; `render()` draws them."""

    title: str
    planned: int
    window_s: float
    start_at: float = 0.0
    sent: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    #: (sent at, latency ms) of the last few seconds, for the rolling rate and percentiles
    recent: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=200_000))
    #: (planned at, ms late) of the drivers' first sends: is the generator keeping up?
    lateness: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=200_000))
    phase: str = "preparing"

    def add(self, sent: int, outcomes: dict[str, int],
            latencies: list[tuple[float, float]],
            lateness: Iterable[tuple[float, float]] = ()) -> None:
        self.sent += sent
        self.outcomes.update(outcomes)
        self.recent.extend(latencies)
        self.lateness.extend(lateness)

    def render(self) -> Table:
        now = time.time()
        window = [ms for at, ms in self.recent if at >= now - 5]
        elapsed = max(0.0, now - self.start_at) if self.start_at else 0.0
        table = Table(title=self.title, show_header=False, expand=False)
        table.add_column(justify="right", style="bold")
        table.add_column()
        table.add_row("phase", self.phase)
        table.add_row("time", f"{min(elapsed, self.window_s):5.1f} / {self.window_s:.0f} s")
        table.add_row("sent", f"{self.sent:,} of {self.planned:,} planned")
        table.add_row("acknowledged", f"{self.outcomes[OK]:,}")
        table.add_row("rate (last 5 s)", f"{len(window) / 5:,.0f} answers/s")
        table.add_row("latency (last 5 s)", f"p50 {percentile(window, 50):.1f} ms   "
                      f"p99 {percentile(window, 99):.1f} ms")
        late = [ms for at, ms in self.lateness if at >= now - 5]
        table.add_row("drivers late (last 5 s)", f"p99 {percentile(late, 99):.1f} ms   "
                      f"max {max(late, default=float('nan')):.1f} ms")
        others = ", ".join(f"{reason} {count:,}" for reason, count in
                           self.outcomes.most_common() if reason != OK)
        table.add_row("refused / errors", others or "none")
        return table


def live_display(progress: Progress, enabled: bool) -> Live:
    """A Live that draws `progress` when the caller calls `refresh()` (from the thread that
    updates it: rich's own refresh thread would read the figures while they change);
    disabled it prints nothing (tests, CI logs)."""
    console = Console(stderr=True, quiet=not enabled)
    return Live(get_renderable=progress.render, console=console, auto_refresh=False,
                transient=False)
