"""Load shedding by cost: a gateway batch's votes weigh what they cost, not a unary vote each."""

from __future__ import annotations

from typing import Any

from vote_svc.config import VoteConfig
from vote_svc.ingest import Ingestor


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
