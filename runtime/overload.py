"""The overload budget: where a surge of votes may queue, for how long, and how its excess is
refused (issue 22). One place for the numbers the edge (ops/edge.py) and vote_svc
(vote_svc/config.py, vote_svc/overload.py) each enforce a part of, so they cannot drift apart.

Where the queue built (bench/RESULTS.md, "Overload and the close"): with 500 calls let through
per vote_svc replica the edge kept vote_svc's gRPC queue full, and vote_svc's refusals, a
Python call each behind that queue, could not drain it (goodput 0.34 of capacity); Envoy's
adaptive concurrency limit, whose latency target includes the service time, then refused
every vote for seconds at a load the replica could carry. So:

1. The edge lets at most `VOTES_IN_FLIGHT_PER_REPLICA` SubmitVote calls per vote_svc replica
   through, on a route of their own (its own Envoy cluster and circuit breaker): beyond it
   the edge refuses at once (microseconds of Envoy) with OVERLOADED. Only SubmitVote is
   bounded so: purchases, balances and gateway batches keep the service-wide ceiling
   (`UNARY_REQUESTS_PER_REPLICA`), so 100 concurrent purchases of one receipt are never
   refused as overload.
2. Behind that bound vote_svc judges each call by how long it has waited on vote_svc's own
   host (`waited_ms`: from the deadline the edge states, never the edge's clock against
   this one) and refuses calls that queued past the target while a queue stands (CoDel,
   vote_svc/overload.py), and a vote not admitted within the budget.
3. Every refusal is UNAVAILABLE `OVERLOADED` with a RetryInfo whose delay differs from
   refusal to refusal, so a refused burst does not come back as the same burst.

The bound on calls in flight is a number of calls (the one thing a proxy can count), sized by
Little's law: a replica near its maximum (a few hundred votes/s on a shared 2-core machine)
with votes taking 100-200 ms needs a few dozen in flight to keep its batches (scoring, the
Lua pipeline, the group commit) full; 64 keeps it busy and bounds its queue to 64 calls, about
0.2-0.6 s of work at those rates, well inside the 1 s p99 a viewer may wait. A faster replica
drains the same 64 sooner: its queue in time only shrinks.
"""

from __future__ import annotations

from collections.abc import Sequence

#: SubmitVote calls the edge lets through per vote_svc replica at once (the SubmitVote route's
#: circuit breaker, ops/edge.py); the next one is refused at the edge with OVERLOADED.
VOTES_IN_FLIGHT_PER_REPLICA = 64
#: Every other unary call per replica of a service (purchases, balances, gateway batches,
#: reviews): a ceiling against a flood, about what a replica answers in a second or two.
UNARY_REQUESTS_PER_REPLICA = 500

#: vote_svc's queue-time admission (vote_svc/overload.py): the wait (on vote_svc's host) that
#: counts as queueing, the interval a queue must stand for, and the most a vote may have
#: waited when it is admitted in Redis. The target is above what an unqueued call takes to be
#: seen on a busy machine (tens of ms on a shared 2-core one); the budget stays below the
#: rounds' receive lag (migrations/0018) so a vote received before the close is admitted, or
#: refused, within it.
QUEUE_TARGET_MS = 200.0
QUEUE_INTERVAL_MS = 500.0
QUEUE_BUDGET_MS = 800.0

#: The retry delay an OVERLOADED refusal asks for, on average; vote_svc draws each from
#: `RETRY_SPREAD` times it (uniform), the edge, whose static replies cannot draw, picks one
#: of `EDGE_RETRY_DELAYS_MS` at random.
RETRY_MS = 1000.0
RETRY_SPREAD = (0.5, 1.5)
EDGE_RETRY_DELAYS_MS = (500, 750, 1000, 1250, 1500)

#: The goal the overload test holds the mesh to (tests/e2e/test_overload.py): refusals
#: answered within this, client side, at twice the capacity.
REFUSAL_WITHIN_MS = 100.0

#: The timeout Envoy states for a call it forwards (the route's `max_grpc_timeout` capped
#: grpc-timeout, which Envoy also rewrites the call's grpc-timeout to): with the deadline the
#: gRPC server set from that grpc-timeout when the call reached this host, it tells how long
#: the call has been here, on this host's clock.
EXPECTED_TIMEOUT_HEADER = "x-envoy-expected-rq-timeout-ms"


def waited_ms(metadata: Sequence[tuple[str, str | bytes]] | None,
              time_remaining_s: float | None) -> float | None:
    """How long a call forwarded by the edge has waited on this host (ms), or None for a call
    that did not come through the edge (no stated timeout) or has no deadline.

    The edge's `x-televote-received-ms` is the edge host's clock: against this host's clock it
    is off by the hosts' skew (an edge an hour off made every call look an hour late), so it
    decides lines-open (the rule: when the edge received the vote) but never queue time.
    """
    if time_remaining_s is None:
        return None
    for key, value in metadata or ():
        if key == EXPECTED_TIMEOUT_HEADER and isinstance(value, str) and value.isdigit():
            return max(0.0, int(value) - time_remaining_s * 1000)
    return None
