"""Admission by queue time: under any offered load, answer the votes that can be answered in
time and refuse the rest at once.

Under overload the queues are in front of the code that could refuse: the edge, the gRPC
server's completion queue, this process's event loop. A call cannot be seen until it is taken
out of them, so it is judged by how long it waited since the edge received it (the edge stamps
`x-televote-received-ms`, runtime/gateway_time.py). This is CoDel's rule (Nichols and
Jacobson, "Controlling Queue Delay", 2012), as servers use it for requests (Facebook's
"Fail at Scale", 2015):

- A standing queue is one that no request got through quickly for a whole interval
  (`vote_queue_interval_ms`): the shortest wait seen in the last interval was above the
  target (`vote_queue_target_ms`). While there is one, a call that waited more than the
  target is refused: the server keeps about one target's worth of queue (so it is never idle)
  and refuses the excess after about the target, not after seconds.
- Without a standing queue (a burst, a slow moment of a shared machine) a call is only
  refused past half the budget (`vote_queue_budget_ms`): a short burst is absorbed.
- Whatever happened on the way, a vote not admitted in Redis within the budget is refused
  before it is admitted (`late`): its client would wait past any useful answer.

Nothing in it depends on the machine's speed: a faster replica simply lets more calls in
before their waits grow, where a fixed number of calls in flight would need tuning per
machine and per mix of calls. A refusal costs a fraction of a vote (it is answered before
validation, scoring, Redis or PostgreSQL), so goodput stays near the replica's maximum.
"""

from __future__ import annotations

import math
import time


class QueueTimeAdmission:
    """One replica's judge of queue times (not thread-safe: one event loop)."""

    def __init__(self, *, target_ms: float, interval_ms: float, budget_ms: float) -> None:
        self._target_ms = target_ms
        self._interval_ms = interval_ms
        self._budget_ms = budget_ms
        self._interval_ends = 0.0  # epoch ms
        self._shortest = math.inf  # shortest wait seen in the current interval
        self.standing = False  # the last whole interval had a standing queue

    def refuse(self, arrived_ms: int, now_ms: float | None = None) -> bool:
        """True when a call the edge received at `arrived_ms` should be refused now."""
        now_ms = time.time() * 1000 if now_ms is None else now_ms
        waited = now_ms - arrived_ms
        if now_ms >= self._interval_ends:
            # An interval with no call at all has no queue either.
            self.standing = self._target_ms < self._shortest < math.inf
            self._shortest = math.inf
            self._interval_ends = now_ms + self._interval_ms
        self._shortest = min(self._shortest, waited)
        return waited > (self._target_ms if self.standing else self._budget_ms / 2)

    def late(self, arrived_ms: int, now_ms: float | None = None) -> bool:
        """True when a call the edge received at `arrived_ms` can no longer be admitted in
        its budget."""
        now_ms = time.time() * 1000 if now_ms is None else now_ms
        return now_ms - arrived_ms > self._budget_ms
