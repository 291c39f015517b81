"""Fraud scoring logic without services: the generator, the model, and the tuned policy's
combination (the seed's, the default, is in tests/unit/test_seed_rules.py)."""

from __future__ import annotations

from collections import Counter

import pytest

from fraud_svc.behaviour import LABELS, TrafficMix, generate, plan_intel
from fraud_svc.features import Facts, History, Scorer, distance_km
from fraud_svc.geoip import IpInfo
from fraud_svc.model import Model
from fraud_svc.train import evaluate, offline_config

CLEAN = History(window_votes=1, intervals=0, interval_mean_s=0.0, interval_std_s=0.0,
                distinct_ips=1, device_users=1)
KH = IpInfo("KH", 11.5564, 104.9282, 64_601, "100.64.0.0/16", False)


def _scorer(**weights: float) -> Scorer:
    """The tuned policy (FRAUD_SCORING=tuned), with the geographic rules as signals."""
    config = offline_config().model_copy(update={
        "fraud_scoring": "tuned", "fraud_geo_foreign_country": "score",
        "fraud_geo_location_mismatch": "score", "fraud_weight_model": 0.0, **weights})
    return Scorer(config, Model.load())


def test_the_generator_is_deterministic_and_labels_every_kind_of_voter() -> None:
    mix = TrafficMix(humans=50, fixed_interval_bots=3, device_farms=1, farm_accounts=5,
                     proxy_rotators=3, duration_seconds=600)
    first, second = generate(mix, seed=3), generate(mix, seed=3)
    assert first == second
    assert set(Counter(event.label for event in first)) == set(LABELS)
    assert [e.time for e in first] == sorted(e.time for e in first)
    farm_devices = Counter(e.device_id for e in first if e.label == "device_farm")
    users_per_device = {d: len({e.user_id for e in first if e.device_id == d})
                        for d in farm_devices}
    assert max(users_per_device.values()) > 3
    assert plan_intel().lookup(first[0].ip).country is not None


def test_the_shipped_model_separates_bots_from_humans_on_held_out_traffic() -> None:
    config = offline_config().model_copy(update={"fraud_vpn_cidrs": (
        "100.96.0.0/16", "100.97.0.0/16", "100.98.0.0/16")})
    small = TrafficMix(humans=500, fixed_interval_bots=10, device_farms=2, proxy_rotators=10,
                       prefix="holdout")
    metrics = evaluate(Model.load(), config, seed=5, mix=small)
    assert metrics["model_precision"] > 0.9, metrics
    assert metrics["model_recall"] > 0.9, metrics
    assert metrics["block_precision"] > 0.95, metrics


def test_scores_at_the_thresholds_take_the_lower_action() -> None:
    exactly_review = _scorer(fraud_weight_foreign_country=0.5)
    verdict = exactly_review.score(Facts("u", "", "1.2.3.4", None, None),
                                   CLEAN, IpInfo(country="TH", anonymous=False))
    assert verdict.score == 0.5 and verdict.action == "ALLOW"
    just_over = _scorer(fraud_weight_foreign_country=0.5001)
    assert just_over.score(Facts("u", "", "1.2.3.4", None, None), CLEAN,
                           IpInfo(country="TH", anonymous=False)).action == "REVIEW"
    exactly_block = _scorer(fraud_weight_foreign_country=0.8)
    verdict = exactly_block.score(Facts("u", "", "1.2.3.4", None, None), CLEAN,
                                  IpInfo(country="TH", anonymous=False))
    assert abs(verdict.score - 0.8) < 1e-12 and verdict.action == "REVIEW"
    assert _scorer(fraud_weight_foreign_country=0.8001).score(
        Facts("u", "", "1.2.3.4", None, None), CLEAN,
        IpInfo(country="TH", anonymous=False)).action == "BLOCK"


def test_signals_combine_so_their_contributions_add_up_to_the_score() -> None:
    history = History(window_votes=60, intervals=59, interval_mean_s=1.0, interval_std_s=0.01,
                      distinct_ips=1, device_users=5)
    verdict = _scorer().score(Facts("u", "d", "100.96.0.1", None, None), history,
                              IpInfo("SG", 1.35, 103.8, 64_500, "100.96.0.0/16", True))
    names = [reason.name for reason in verdict.reasons]
    assert names == ["velocity", "bot_timing", "shared_device", "vpn_proxy", "foreign_country"]
    assert abs(sum(r.contribution for r in verdict.reasons) - verdict.score) < 1e-9
    assert verdict.action == "BLOCK"


def test_a_traveller_abroad_is_not_geofenced_and_gps_far_from_the_ip_is_a_mismatch() -> None:
    scorer = _scorer()
    abroad = IpInfo("TH", 13.7563, 100.5018, 64_700, "100.80.0.0/16", False)
    assert [r.name for r in scorer.score(Facts("u", "", "ip", None, None), CLEAN, abroad)
            .reasons] == ["foreign_country"]
    assert scorer.score(Facts("u", "", "ip", None, None), CLEAN, abroad,
                        traveller=True).reasons == []
    siem_reap = (13.3633, 103.8564)
    assert 200 < distance_km(*siem_reap, 11.5564, 104.9282) < 260
    far = scorer.score(Facts("u", "", "ip", *siem_reap), CLEAN, KH)
    assert [r.name for r in far.reasons] == ["gps_mismatch"]
    near = scorer.score(Facts("u", "", "ip", 11.60, 104.90), CLEAN, KH)
    assert near.reasons == []


def test_model_inference_is_a_cheap_probability() -> None:
    model = Model.load()
    assert model.version == "v1"
    p = model.predict([0.0] * len(model.features))
    assert 0.0 <= p <= 1.0


def test_the_model_refuses_inputs_of_another_length() -> None:
    model = Model.load()
    with pytest.raises(ValueError, match="inputs"):
        model.predict([0.0] * (len(model.features) - 1))


def test_equal_signals_combine_in_the_documented_order_whichever_step_finds_them() -> None:
    """Ties keep the order velocity, shared_device, vpn_proxy, foreign_country, gps_mismatch,
    bot_timing, although the service finds the vote's own signals (`Scorer.prepare`) before
    the ones from its history (`Scorer.finish`)."""
    same = 0.3
    scorer = _scorer(fraud_weight_velocity=same, fraud_weight_shared_device=same,
                     fraud_weight_vpn_proxy=same, fraud_weight_foreign_country=same,
                     fraud_weight_gps_mismatch=same, fraud_weight_bot_timing=same)
    history = History(window_votes=60, intervals=59, interval_mean_s=1.0, interval_std_s=0.01,
                      distinct_ips=1, device_users=5)
    ip = IpInfo("SG", 1.35, 103.8, 64_500, "100.96.0.0/16", True)
    facts = Facts("u", "d", "100.96.0.1", 11.5564, 104.9282)
    verdict = scorer.score(facts, history, ip)
    assert [r.name for r in verdict.reasons] == [
        "velocity", "shared_device", "vpn_proxy", "foreign_country", "gps_mismatch",
        "bot_timing"]
    assert scorer.finish(scorer.prepare(facts, ip), history) == verdict

