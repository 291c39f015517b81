"""Load shedding by cost (a gateway batch's votes weigh what they cost, not a unary vote each)
and by queue time on this host's clock."""

from __future__ import annotations

import time
from typing import Any

from runtime import overload
from runtime.gateway_time import RECEIVED_HEADER
from runtime.overload import waited_ms
from vote_svc.config import VoteConfig
from vote_svc.ingest import Ingestor
from vote_svc.overload import QueueTimeAdmission, arrival_ms


def ingestor(**settings: Any) -> Ingestor:
    config = VoteConfig(database_url="postgresql://unused", redis_url="redis://unused",
                        vote_pseudonym_salt="salt", vote_ip_hash_key="key", **settings)
    return Ingestor(None, None, None, None, config)  # type: ignore[arg-type]


def test_a_1000_vote_gateway_batch_in_flight_leaves_room_for_other_calls() -> None:
    replica = ingestor(vote_max_inflight_votes=500)
    replica._inflight = replica.cost(1000, gateway=True)  # one full batch being worked on
    assert replica.shed(1, None) is None  # a voter's unary vote
    assert replica.shed(1000, None, gateway=True) is None  # an SMS batch at the peak


def test_a_replica_at_its_limit_still_refuses_with_overloaded() -> None:
    replica = ingestor(vote_max_inflight_votes=500)
    replica._inflight = replica.cost(500)
    refusal = replica.shed(1, None)
    assert refusal is not None and refusal.reason == "OVERLOADED"
    assert refusal.retry_after_seconds is not None
    replica._inflight = replica.cost(3400, gateway=True)
    refusal = replica.shed(1000, None, gateway=True)
    assert refusal is not None and refusal.reason == "OVERLOADED"


def test_queue_time_refuses_past_the_target_only_while_a_queue_stands() -> None:
    judge = QueueTimeAdmission(target_ms=100, interval_ms=500, budget_ms=800)
    # A burst: waits above the target, but some call got through quickly this interval.
    assert not judge.refuse(arrived_ms=0, now_ms=10)
    assert not judge.refuse(arrived_ms=0, now_ms=300)
    assert judge.refuse(arrived_ms=0, now_ms=401)  # past half the budget
    # A whole interval in which no call waited less than the target: a standing queue.
    for now in (520, 700, 900):
        judge.refuse(arrived_ms=now - 150, now_ms=now)
    assert judge.refuse(arrived_ms=1000, now_ms=1150)  # beyond the target: refused
    assert not judge.refuse(arrived_ms=1100, now_ms=1150)
    assert judge.late(arrived_ms=0, now_ms=801) and not judge.late(arrived_ms=0, now_ms=800)


def test_overloaded_refusals_ask_for_retry_delays_spread_around_the_configured_one() -> None:
    replica = ingestor(vote_overload_retry_ms=1000)
    delays = {replica.overloaded().retry_after_seconds for _ in range(50)}
    assert len(delays) > 10
    assert all(d is not None and 0.5 <= d <= 1.5 for d in delays)


def test_queue_time_is_read_from_the_deadline_the_edge_states_not_from_the_edges_clock(
) -> None:
    """The edge's receive time is its host's clock: an edge an hour ahead or behind must not
    make every call look an hour early or late. The wait is the timeout the edge stated
    minus what is left of the deadline the gRPC server set from it, both on this host."""
    hour_ms = 3_600_000
    now_ms = int(time.time() * 1000)
    for edge_clock_ms in (now_ms - hour_ms, now_ms + hour_ms):
        metadata = ((RECEIVED_HEADER, str(edge_clock_ms)),
                    (overload.EXPECTED_TIMEOUT_HEADER, "15000"))
        replica = ingestor()
        just_in = waited_ms(metadata, 14.99)
        assert just_in is not None and 9 < just_in < 11
        assert replica.shed(1, 14.99, arrived_ms=arrival_ms(just_in)) is None
        # Waited a second here (past half the 800 ms budget): refused, whatever the edge's
        # clock says.
        refusal = replica.shed(1, 14.0, arrived_ms=arrival_ms(waited_ms(metadata, 14.0)))
        assert refusal is not None and refusal.reason == "OVERLOADED"
    # From inside the mesh (no stated timeout) or without a deadline: not judged by queue time.
    assert waited_ms(((RECEIVED_HEADER, str(now_ms - hour_ms)),), 14.0) is None
    assert waited_ms(((overload.EXPECTED_TIMEOUT_HEADER, "15000"),), None) is None
