"""When a request arrived, and what a gateway may claim about it.

The edge stamps every request with the time it arrived (`x-televote-received-ms`, which it
always overwrites: envoy/edge.yaml). A gateway (a carrier, an SMS gateway, sms_svc) may also
say when it received a message; that claim is recorded for audit and used for fraud timing,
but it must never move a vote into a window: it is accepted only if it is no later than the
edge's clock and no older than a bounded skew. Both vote_svc (SubmitVotes) and sms_svc
(ReceiveInboundSms) hold gateways to this one rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

RECEIVED_HEADER = "x-televote-received-ms"


def edge_received_ms(metadata: Sequence[tuple[str, str | bytes]] | None) -> int | None:
    """When the edge received the call (epoch ms), or None for a call from inside the mesh
    (or a value that is not a time)."""
    for key, value in metadata or ():
        if key == RECEIVED_HEADER and isinstance(value, str) and value.isdigit():
            return int(value)
    return None


def edge_received_at(metadata: Sequence[tuple[str, str | bytes]] | None) -> datetime | None:
    """`edge_received_ms` as a time."""
    return received_time(edge_received_ms(metadata))


def received_time(received_ms: int | None) -> datetime | None:
    return None if received_ms is None else datetime.fromtimestamp(received_ms / 1000, UTC)


def gateway_time_problem(claimed: datetime, reference: datetime, *, max_age_ms: int,
                         tolerance_ms: int = 0) -> str | None:
    """Why a gateway's `claimed` receive time is refused against `reference` (the edge's
    clock, or this process's when the call did not come through the edge, then with
    `tolerance_ms` for the clocks of two hosts), or None when it is acceptable."""
    if claimed > reference + timedelta(milliseconds=tolerance_ms):
        return "must not be later than when the edge received the request"
    if claimed < reference - timedelta(milliseconds=max_age_ms):
        return f"must be at most {max_age_ms} ms before the edge received the request"
    return None
