"""Trains the fraud model on generated, labelled traffic and writes fraud_svc/model/v1.json.

    python -m fraud_svc.train [--out fraud_svc/model/v1.json] [--seed 1]

Training traffic and held-out traffic are generated with different seeds (different voters);
the script prints precision and recall on the held-out traffic, of the model alone (p > 0.5)
and of the whole scorer (REVIEW or BLOCK, and BLOCK alone), per vote.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fraud_svc.behaviour import TrafficMix, VoteEvent, generate, plan_intel, vpn_lists
from fraud_svc.config import FraudConfig
from fraud_svc.features import FEATURES, Facts, FeatureMemory, Scorer, Verdict, model_inputs
from fraud_svc.geoip import IpIntel
from fraud_svc.model import DEFAULT_PATH, Model

#: A config for offline use: storage URLs are not needed to compute features.
OFFLINE = {"database_url": "offline", "redis_url": "offline"}


def offline_config() -> FraudConfig:
    return FraudConfig(**OFFLINE)  # type: ignore[arg-type]


def featurize(events: Sequence[VoteEvent], config: FraudConfig,
              intel: IpIntel) -> tuple[list[list[float]], list[int]]:
    """The model's inputs for each event, replayed through the feature windows in order."""
    memory = FeatureMemory(config)
    allowed = frozenset(config.fraud_allowed_countries)
    rows, labels = [], []
    for event in events:
        history = memory.record(event.user_id, event.device_id, event.ip, event.time)
        ip = intel.lookup(event.ip)
        has_gps = event.latitude is not None and event.longitude is not None
        gps_km = None
        if has_gps and ip.latitude is not None and ip.longitude is not None:
            from fraud_svc.features import distance_km
            assert event.latitude is not None and event.longitude is not None
            gps_km = distance_km(event.latitude, event.longitude, ip.latitude, ip.longitude)
        foreign = ip.country is not None and ip.country not in allowed
        rows.append(model_inputs(history, ip, ip.country, foreign, gps_km, has_gps, config))
        labels.append(1 if event.fraud else 0)
    return rows, labels


def replay(events: Sequence[VoteEvent], scorer: Scorer, intel: IpIntel) -> list[Verdict]:
    """The scorer's verdict on each event (no flagging: every vote is scored)."""
    memory = FeatureMemory(scorer.config)
    return [scorer.score(Facts(e.user_id, e.device_id, e.ip, e.latitude, e.longitude),
                         memory.record(e.user_id, e.device_id, e.ip, e.time),
                         intel.lookup(e.ip)) for e in events]


def fit(rows: list[list[float]], labels: list[int], *, epochs: int = 400,
        rate: float = 0.5, l2: float = 1e-3) -> tuple[list[float], list[float], list[float],
                                                      float]:
    """Logistic regression by full-batch gradient descent on standardized inputs."""
    x = np.asarray(rows, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale == 0] = 1.0
    z = (x - mean) / scale
    weights = np.zeros(z.shape[1])
    bias = 0.0
    for _ in range(epochs):
        p = 1.0 / (1.0 + np.exp(-(z @ weights + bias)))
        error = p - y
        weights -= rate * (z.T @ error / len(y) + l2 * weights)
        bias -= rate * float(error.mean())
    return mean.tolist(), scale.tolist(), weights.tolist(), bias


def precision_recall(predicted: Sequence[bool], actual: Sequence[bool]) -> tuple[float, float]:
    tp = sum(1 for p, a in zip(predicted, actual, strict=True) if p and a)
    fp = sum(1 for p, a in zip(predicted, actual, strict=True) if p and not a)
    fn = sum(1 for p, a in zip(predicted, actual, strict=True) if not p and a)
    return tp / max(1, tp + fp), tp / max(1, tp + fn)


#: The held-out traffic: the default mix, with other voters (prefix) and another seed.
HELD_OUT = TrafficMix(prefix="holdout")


def evaluate(model: Model, config: FraudConfig, seed: int = 2,
             mix: TrafficMix = HELD_OUT) -> dict[str, float]:
    """Precision and recall on held-out traffic (other voters, other seed)."""
    intel = plan_intel()
    held_out = generate(mix, seed=seed)
    rows, labels = featurize(held_out, config, intel)
    actual = [label == 1 for label in labels]
    model_p, model_r = precision_recall([model.predict(r) > 0.5 for r in rows], actual)
    verdicts = replay(held_out, Scorer(config, model), intel)
    flagged_p, flagged_r = precision_recall([v.action != "ALLOW" for v in verdicts], actual)
    block_p, block_r = precision_recall([v.action == "BLOCK" for v in verdicts], actual)
    stopped_p, stopped_r = precision_recall([v.action in ("BLOCK", "REFUSE") for v in verdicts],
                                            actual)
    refused = [v.action == "REFUSE" for v in verdicts]
    refuse_p, _ = precision_recall(refused, actual)
    return {"votes": float(len(held_out)), "fraud_share": sum(labels) / len(labels),
            "model_precision": model_p, "model_recall": model_r,
            "flagged_precision": flagged_p, "flagged_recall": flagged_r,
            "block_precision": block_p, "block_recall": block_r,
            "stopped_precision": stopped_p, "stopped_recall": stopped_r,
            "refused_share": sum(refused) / len(refused), "refused_precision": refuse_p}


def compare_policies(model: Model, config: FraudConfig, seed: int = 2,
                     mix: TrafficMix = HELD_OUT) -> dict[tuple[str, str], dict[str, float]]:
    """`evaluate` for each scoring policy and each setting of the geographic rules, on the
    same held-out traffic."""
    return {(scoring, geo): evaluate(model, config.model_copy(update={
        "fraud_scoring": scoring, "fraud_geo_foreign_country": geo,
        "fraud_geo_location_mismatch": geo}), seed, mix)
        for geo in ("refuse", "score") for scoring in ("seed", "tuned")}


def print_comparison(results: dict[tuple[str, str], dict[str, float]]) -> None:
    """Precision and recall per vote of each policy, side by side."""
    first = next(iter(results.values()))
    print(f"policies on held-out generated traffic ({first['votes']:.0f} votes, "
          f"{first['fraud_share']:.0%} fraudulent); P precision, R recall per vote:")
    print(f"  model alone (p > 0.5)   P {first['model_precision']:.3f}  "
          f"R {first['model_recall']:.3f}")
    print(f"  {'scoring':<7} {'geo rules':<9} {'not ALLOW':>17} {'BLOCK':>17} "
          f"{'BLOCK or refused':>17} {'refused':>16}")
    for (scoring, geo), m in results.items():
        print(f"  {scoring:<7} {geo:<9} "
              f"P {m['flagged_precision']:.3f} R {m['flagged_recall']:.3f}  "
              f"P {m['block_precision']:.3f} R {m['block_recall']:.3f}  "
              f"P {m['stopped_precision']:.3f} R {m['stopped_recall']:.3f}  "
              f"{m['refused_share']:6.1%} P {m['refused_precision']:.3f}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(DEFAULT_PATH))
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    config = offline_config().model_copy(update={"fraud_vpn_cidrs": tuple(
        str(n) for n in vpn_lists().networks)})
    events = generate(TrafficMix(prefix="train"), seed=args.seed)
    rows, labels = featurize(events, config, plan_intel())
    mean, scale, weights, bias = fit(rows, labels)
    model = Model("v1", FEATURES, tuple(mean), tuple(scale), tuple(weights), bias)
    metrics = evaluate(model, config)
    Path(args.out).write_text(json.dumps({
        "version": model.version, "features": list(FEATURES), "mean": mean, "scale": scale,
        "weights": weights, "bias": bias,
        "trained_on": {"votes": len(events), "seed": args.seed, "held_out_seed": 2},
        "held_out": {k: round(v, 4) for k, v in metrics.items()},
    }, indent=2) + "\n")
    print(f"trained on {len(events)} votes ({sum(labels)} fraudulent); wrote {args.out}")
    for name, value in metrics.items():
        print(f"{name:>18}: {value:.3f}")
    print_comparison(compare_policies(model, config))


if __name__ == "__main__":
    main()
