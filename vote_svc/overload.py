"""Admission by queue time: under any offered load, answer the votes that can be answered in
time and refuse the rest at once.

Under overload the queues are in front of the code that could refuse: the gRPC server's
completion queue and this process's event loop (the edge bounds the calls let through to a
replica, runtime/overload.py, so the queue in front of it is short). A call cannot be seen
until it is taken out of them, so it is judged by how long it waited since it reached this
host, on this host's clock (`runtime.overload.waited_ms`, from the deadline the edge states;
never the edge's clock against this one). This is CoDel's rule (Nichols and Jacobson,
"Controlling Queue Delay", 2012), as servers use it for requests (Facebook's "Fail at
Scale", 2015):

- A standing queue is one that no request got through quickly for a whole interval
  (`vote_queue_interval_ms`): the shortest wait seen in the last interval was above the
  target (`vote_queue_target_ms`). While there is one, a call that waited more than the
  target is refused: the server keeps about one target's worth of queue (so it is never idle)
  and refuses the excess after about the target, not after seconds.
- Without a standing queue (a burst, a slow moment of a shared machine) a call is only
  refused past half the budget (`vote_queue_budget_ms`): a short burst is absorbed.
- Whatever happened on the way, a vote not admitted in Redis within the budget is refused
  before it is admitted (`late`): its client would wait past any useful answer.

Times here are this process's monotonic clock in ms: `arrived_ms` is when the call reached
this host (now minus what it has waited).

Nothing in it depends on the machine's speed: a faster replica simply lets more calls in
before their waits grow. A refusal costs a fraction of a vote (it is answered before
validation, scoring, Redis or PostgreSQL), so goodput stays near the replica's maximum.
"""

from __future__ import annotations

import math
import time


def monotonic_ms() -> float:
    return time.monotonic() * 1000


def arrival_ms(waited_ms: float | None) -> float | None:
    """When a call that has waited `waited_ms` on this host reached it (`monotonic_ms`)."""
    return None if waited_ms is None else monotonic_ms() - waited_ms


class QueueTimeAdmission:
    """One replica's judge of queue times (not thread-safe: one event loop)."""

    def __init__(self, *, target_ms: float, interval_ms: float, budget_ms: float) -> None:
        self._target_ms = target_ms
        self._interval_ms = interval_ms
        self._budget_ms = budget_ms
        self._interval_ends = -math.inf  # monotonic ms
        self._shortest = math.inf  # shortest wait seen in the current interval
        self.standing = False  # the last whole interval had a standing queue

    def refuse(self, arrived_ms: float, now_ms: float | None = None) -> bool:
        """True when a call that reached this host at `arrived_ms` should be refused now."""
        now_ms = monotonic_ms() if now_ms is None else now_ms
        waited = now_ms - arrived_ms
        if now_ms >= self._interval_ends:
            # An interval with no call at all has no queue either.
            self.standing = self._target_ms < self._shortest < math.inf
            self._shortest = math.inf
            self._interval_ends = now_ms + self._interval_ms
        self._shortest = min(self._shortest, waited)
        return waited > (self._target_ms if self.standing else self._budget_ms / 2)

    def late(self, arrived_ms: float, now_ms: float | None = None) -> bool:
        """True when a call that reached this host at `arrived_ms` can no longer be admitted
        in its budget."""
        now_ms = monotonic_ms() if now_ms is None else now_ms
        return now_ms - arrived_ms > self._budget_ms
