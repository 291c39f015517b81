"""CPU and memory per process while a run goes, sampled once a second with psutil.

Processes are this process's descendants (the stack it started, its load drivers), grouped
by role: each service, envoy, postgres, redis, the load drivers. Against an edge started
elsewhere only the drivers are seen, so the report says so instead of guessing at other
people's processes on a shared machine.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

import psutil

SERVICES = ("fraud_svc", "sync_svc", "vote_svc", "results_svc", "sms_svc")


def role_of(process: psutil.Process) -> str:
    try:
        command = process.cmdline()
        name = str(process.name())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""
    text = " ".join(command)
    for service in SERVICES:
        if f"-m {service}" in text:
            return service
    if "envoy" in name:
        return "envoy"
    if "postgres" in name or "postgres" in text.split(" ")[0]:
        return "postgres"
    if "redis" in name:
        return "redis"
    if "multiprocessing" in text or "loadtest" in text:
        return "load drivers"
    return name


@dataclass
class Usage:
    cpu_percent: list[float] = field(default_factory=list)  # of one core, per sample
    rss_mib: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        samples = len(self.cpu_percent) or 1
        return {"cpu_mean_pct": round(sum(self.cpu_percent) / samples, 1),
                "cpu_max_pct": round(max(self.cpu_percent, default=0.0), 1),
                "rss_max_mib": round(max(self.rss_mib, default=0.0), 1)}


class Sampler:
    """Samples in a thread so a busy event loop does not skew the figures."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.usage: dict[str, Usage] = defaultdict(Usage)
        self.load_average: list[float] = []
        #: (when, role -> CPU % of one core over the interval before) per sample
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="resource-sampler", daemon=True)
        self._known: dict[int, tuple[psutil.Process, str]] = {}

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> dict[str, dict[str, float]]:
        self._stop.set()
        self._thread.join(timeout=5)
        return {role: usage.summary() for role, usage in sorted(self.usage.items())}

    def cpu_seconds(self, since: float, until: float) -> dict[str, float]:
        """CPU seconds by role over the samples taken between `since` and `until` (epoch
        s; each sample covers the interval before it): what a phase of the run cost."""
        totals: dict[str, float] = defaultdict(float)
        for when, by_role in self.samples:
            if since < when <= until + self.interval:
                for role, cpu in by_role.items():
                    totals[role] += cpu / 100 * self.interval
        return {role: round(seconds, 2) for role, seconds in sorted(totals.items())}

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            for child in me.children(recursive=True):
                if child.pid not in self._known:
                    self._known[child.pid] = (child, role_of(child))
                    try:
                        child.cpu_percent(None)  # the first call only starts the meter
                    except psutil.Error:
                        pass
            time.sleep(self.interval)
            totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
            for pid, (process, role) in list(self._known.items()):
                try:
                    with process.oneshot():
                        totals[role][0] += process.cpu_percent(None)
                        totals[role][1] += process.memory_info().rss / 2**20
                except psutil.Error:
                    del self._known[pid]
            for role, (cpu, rss) in totals.items():
                if role:
                    self.usage[role].cpu_percent.append(cpu)
                    self.usage[role].rss_mib.append(rss)
            self.samples.append((time.time(), {role: cpu for role, (cpu, _) in totals.items()
                                               if role}))
            self.load_average.append(psutil.getloadavg()[0])
