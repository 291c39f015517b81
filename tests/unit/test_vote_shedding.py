"""Load shedding by cost: a gateway batch's votes weigh what they cost, not a unary vote each."""

from __future__ import annotations

from typing import Any

from vote_svc.config import VoteConfig
from vote_svc.ingest import Ingestor
from vote_svc.overload import QueueTimeAdmission


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
