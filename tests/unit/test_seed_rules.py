"""The specification's rules ("Seed behaviour to keep as defaults") are the defaults, each at
its boundary: the seed fraud policy, the geographic refusals, the countdown ticks. Changing a
default fails here, so it is a visible decision."""

from __future__ import annotations

import math

import pytest

from fraud_svc.features import (
    FEATURES,
    Facts,
    FeatureMemory,
    History,
    Scorer,
    Verdict,
    distance_km,
)
from fraud_svc.geoip import IpInfo
from fraud_svc.model import Model
from fraud_svc.train import offline_config
from sync_svc.config import SyncConfig
from sync_svc.hub import tick_kinds
from televote.sync.v1 import show_watch_service_pb2 as watch
from vote_svc.config import VoteConfig

PHNOM_PENH = (11.5564, 104.9282)
KH = IpInfo("KH", *PHNOM_PENH, 64_601, "100.64.0.0/16", False)
TH = IpInfo("TH", 13.7563, 100.5018, 64_700, "100.80.0.0/16", False)
VPN = IpInfo("KH", *PHNOM_PENH, 64_999, "100.100.0.0/16", True)
#: One degree of latitude on fraud_svc's sphere (diameter 12,742 km).
KM_PER_DEGREE = 12_742 * math.pi / 360


def constant_model(p: float) -> Model:
    """A model that says `p` whatever the vote (p in {0, 0.5, 1} exactly)."""
    n = len(FEATURES)
    bias = -100.0 if p == 0 else 100.0 if p == 1 else math.log(p / (1 - p))
    return Model("constant", FEATURES, (0.0,) * n, (1.0,) * n, (0.0,) * n, bias)


def seed(p: float = 0.0, **config: object) -> Scorer:
    """The default scorer (nothing configured but the model's constant answer)."""
    return Scorer(offline_config().model_copy(update=config), constant_model(p))


def history(window_votes: int = 1, intervals: int = 0, std: float = 0.0,
            device_users: int = 1) -> History:
    return History(window_votes=window_votes, intervals=intervals, interval_mean_s=5.0,
                   interval_std_s=std, distinct_ips=1, device_users=device_users)


def score(scorer: Scorer, h: History | None = None, ip: IpInfo = KH,
          gps: tuple[float, float] | None = None, traveller: bool = False) -> Verdict:
    facts = Facts("u", "d", "100.64.0.1", *(gps or (None, None)))
    return scorer.score(facts, h or history(), ip, traveller=traveller)


def reasons(verdict: Verdict) -> dict[str, float]:
    return {r.name: round(r.contribution, 9) for r in verdict.reasons}


def test_the_defaults_are_the_specifications_numbers() -> None:
    fraud = offline_config()
    assert fraud.fraud_scoring == "seed"
    assert (fraud.fraud_geo_foreign_country, fraud.fraud_geo_location_mismatch) == (
        "refuse", "refuse")
    assert fraud.fraud_allowed_countries == ("KH",)
    assert (fraud.fraud_block_threshold, fraud.fraud_review_threshold) == (0.8, 0.5)
    assert (fraud.fraud_velocity_max_votes, fraud.fraud_velocity_window_seconds) == (50, 60)
    assert fraud.fraud_device_max_users == 3
    assert (fraud.fraud_bot_timing_window_seconds,
            fraud.fraud_bot_timing_min_std_seconds) == (3600, 1.0)
    assert fraud.fraud_gps_mismatch_km == 100
    assert (fraud.fraud_seed_weight_velocity, fraud.fraud_seed_weight_shared_device,
            fraud.fraud_seed_weight_vpn_proxy, fraud.fraud_seed_weight_foreign_country,
            fraud.fraud_seed_weight_bot_timing) == (0.3, 0.2, 0.4, 0.3, 0.5)
    sync = SyncConfig(database_url="-", redis_url="-")
    assert sync.sync_default_window_ms == 30 * 60 * 1000
    assert (sync.sync_time_update_every_s, sync.sync_warning_at_s,
            sync.sync_countdown_from_s) == (10, 60, 10)
    assert (sync.sync_default_free_votes, sync.sync_default_rate_limit_per_minute) == (5, 100)
    vote = VoteConfig(database_url="-", redis_url="-", vote_pseudonym_salt="s",
                      vote_ip_hash_key="k")
    assert vote.vote_rate_limit_per_minute == 100


def test_velocity_fires_over_50_votes_in_the_window_for_0_3() -> None:
    assert reasons(score(seed(), history(window_votes=50))) == {}
    verdict = score(seed(), history(window_votes=51))
    # Its share of the final score: (0.3 + model 0) / 2.
    assert reasons(verdict) == {"velocity": 0.15} and verdict.score == pytest.approx(0.15)


def test_velocity_counts_votes_not_calls() -> None:
    memory = FeatureMemory(offline_config())
    assert memory.record("u", "", "ip", 0.0, count=50).window_votes == 50
    assert memory.record("u", "", "ip", 1.0).window_votes == 51
    assert memory.record("u", "", "ip", 61.5).window_votes == 1  # the first two left


def test_a_device_of_more_than_3_users_adds_0_2() -> None:
    assert reasons(score(seed(), history(device_users=3))) == {}
    assert reasons(score(seed(), history(device_users=4))) == {"shared_device": 0.1}


def test_a_vpn_or_proxy_adds_0_4() -> None:
    assert reasons(score(seed(), ip=VPN)) == {"vpn_proxy": 0.2}


def test_bot_timing_fires_under_1_s_of_interval_std_dev_for_0_5() -> None:
    assert reasons(score(seed(), history(intervals=5, std=1.0))) == {}
    assert reasons(score(seed(), history(intervals=5, std=0.999))) == {"bot_timing": 0.25}
    # Fewer than 5 intervals say nothing about a rhythm (one interval's std dev is 0).
    assert reasons(score(seed(), history(intervals=4, std=0.0))) == {}


def test_a_vote_from_outside_cambodia_is_refused_unless_the_voter_is_a_traveller() -> None:
    abroad = score(seed(), ip=TH)
    assert abroad.action == "REFUSE"
    assert abroad.refusal == ("GEO_RESTRICTED", "Voting only allowed from Cambodia")
    assert score(seed(), ip=KH).action == "ALLOW"
    # A traveller is let through, and the seed's "country other than KH" still adds 0.3.
    traveller = score(seed(), ip=TH, traveller=True)
    assert traveller.action == "ALLOW" and reasons(traveller) == {"foreign_country": 0.15}
    # A show that scores instead of refusing.
    scored = score(seed(fraud_geo_foreign_country="score"), ip=TH)
    assert scored.action == "ALLOW" and reasons(scored) == {"foreign_country": 0.15}


def test_gps_more_than_100_km_from_the_ip_is_refused_as_a_location_mismatch() -> None:
    near = (PHNOM_PENH[0] + 99.9 / KM_PER_DEGREE, PHNOM_PENH[1])
    far = (PHNOM_PENH[0] + 100.1 / KM_PER_DEGREE, PHNOM_PENH[1])
    assert distance_km(*near, *PHNOM_PENH) == pytest.approx(99.9)
    assert distance_km(*far, *PHNOM_PENH) == pytest.approx(100.1)
    assert score(seed(), gps=near).action == "ALLOW"
    refused = score(seed(), gps=far)
    assert refused.action == "REFUSE" and refused.refusal is not None
    assert refused.refusal[0] == "LOCATION_MISMATCH"
    scored = score(seed(fraud_geo_location_mismatch="score"), gps=far)
    assert scored.action == "ALLOW" and set(reasons(scored)) == {"gps_mismatch"}


def test_the_final_score_averages_the_rules_with_the_model_and_thresholds_are_exclusive(
) -> None:
    # (0.5 + 0.5) / 2 = 0.5: not above 0.5, ALLOW.
    at_review = score(seed(0.5), history(intervals=5, std=0.1))
    assert at_review.score == pytest.approx(0.5) and at_review.action == "ALLOW"
    # (0.5 + 0.3 + 0.5) / 2 = 0.65: REVIEW.
    review = score(seed(0.5), history(window_votes=51, intervals=5, std=0.1))
    assert review.score == pytest.approx(0.65) and review.action == "REVIEW"
    # (0.5 + 0.4 + 0.2 + 0.5) / 2 = 0.8: not above 0.8, REVIEW.
    at_block = score(seed(0.5), history(intervals=5, std=0.1, device_users=4), ip=VPN)
    assert at_block.score == pytest.approx(0.8) and at_block.action == "REVIEW"
    # Velocity on top: 0.95, BLOCK.
    block = score(seed(0.5), history(window_votes=51, intervals=5, std=0.1, device_users=4),
                  ip=VPN)
    assert block.score == pytest.approx(0.95) and block.action == "BLOCK"
    # Every rule and a certain model: (1.7 + 1) / 2 capped at 1.
    everything = score(seed(1.0), history(window_votes=51, intervals=5, std=0.1,
                                          device_users=4), ip=TH, traveller=True)
    assert everything.score == 1.0 and everything.action == "BLOCK"
    for verdict in (review, block, everything):
        assert sum(r.contribution for r in verdict.reasons) == pytest.approx(verdict.score)


def test_the_two_policies_judge_the_same_votes_differently() -> None:
    """The tuned policy weighs each signal more and combines them as a noisy-OR: a bot that
    votes fast at a machine's rhythm is blocked by it and let through by the seed."""
    tuned = seed(0.0, fraud_scoring="tuned", fraud_weight_model=0.0)
    bot = history(window_votes=52, intervals=51, std=0.01)
    assert (score(seed(), bot).action, score(tuned, bot).action) == ("ALLOW", "BLOCK")
    farm = history(device_users=5)
    assert (score(seed(), farm, ip=VPN).action,
            score(tuned, farm, ip=VPN).action) == ("ALLOW", "REVIEW")


def test_ticks_are_a_time_update_every_10_s_beside_the_warning_and_the_countdown() -> None:
    config = SyncConfig(database_url="-", redis_url="-")
    kinds = {s: [watch.ShowEventType.Name(k).removeprefix("SHOW_EVENT_TYPE_")
                 for k in tick_kinds(config, s)] for s in range(1, 1801)}
    ticking = {s: k for s, k in kinds.items() if k}
    assert ticking[1800] == ["TIME_UPDATE"] and ticking[70] == ["TIME_UPDATE"]
    assert ticking[60] == ["TIME_UPDATE", "WARNING"]
    assert ticking[10] == ["TIME_UPDATE", "COUNTDOWN"]
    assert [s for s, k in ticking.items() if "TIME_UPDATE" in k] == list(range(10, 1801, 10))
    assert [s for s, k in ticking.items() if "WARNING" in k] == [60]
    assert [s for s, k in ticking.items() if "COUNTDOWN" in k] == list(range(1, 11))
