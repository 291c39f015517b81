"""The pure part of scoring: signals from feature state, the model's inputs, the combination.

The same code scores live votes (state from Redis, fraud_svc/state.py) and generated traffic
in training (state from `FeatureMemory`, which keeps the same windows in memory), so the model
is trained on exactly the features it sees in production.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import dataclass, field

from fraud_svc.config import FraudConfig
from fraud_svc.geoip import IpInfo
from fraud_svc.model import Model


@dataclass(slots=True)
class History:
    """A user's and a device's recent activity, including the vote being scored."""

    #: Votes by the user in the velocity window (60 s).
    window_votes: int
    #: Inter-vote intervals of the user within the timing window (1 h), and their statistics.
    intervals: int
    interval_mean_s: float
    interval_std_s: float
    #: Distinct IPs the user voted from within the timing window.
    distinct_ips: int
    #: Distinct users seen on the vote's device (0 without a device id).
    device_users: int
    #: The user is flagged/blocked (automatic or operator block).
    blocked: bool = False


@dataclass(slots=True)
class Facts:
    """The parts of a vote that scoring reads."""

    user_id: str
    device_id: str
    ip: str
    latitude: float | None
    longitude: float | None
    country_hint: str = ""
    #: The keyed hash of the IP (VoteFacts.ip_hash), what the audit log keeps of it.
    ip_hash: str = ""


@dataclass
class Reason:
    name: str
    contribution: float
    detail: str


@dataclass
class Verdict:
    action: str  # "ALLOW", "REVIEW", "BLOCK" or "REFUSE" (a geographic rule)
    score: float
    reasons: list[Reason]
    #: The inputs that led to it, for the audit log.
    inputs: dict[str, object] = field(default_factory=dict)
    #: For REFUSE: (reason, message), e.g. ("GEO_RESTRICTED", "Voting only allowed from ...").
    refusal: tuple[str, str] | None = None


FEATURES = ("velocity", "device_users", "vpn", "foreign", "gps_mismatch", "gps_missing",
            "few_intervals", "interval_std", "interval_mean", "interval_cv", "distinct_ips")


def distance_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance (haversine)."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 12_742.0 * math.asin(min(1.0, math.sqrt(a)))


def model_inputs(history: History, ip: IpInfo, country: str | None, foreign: bool,
                 gps_km: float | None, has_gps: bool, config: FraudConfig) -> list[float]:
    """The model's feature vector, in FEATURES order."""
    few = history.intervals < config.fraud_bot_timing_min_intervals
    return [
        math.log1p(history.window_votes),
        math.log1p(history.device_users),
        1.0 if ip.anonymous else 0.0,
        1.0 if foreign else 0.0,
        1.0 if gps_km is not None and gps_km > config.fraud_gps_mismatch_km else 0.0,
        0.0 if has_gps else 1.0,
        1.0 if few else 0.0,
        0.0 if few else math.log1p(history.interval_std_s),
        0.0 if few else math.log1p(history.interval_mean_s),
        0.0 if few or history.interval_mean_s <= 0 else
        min(3.0, history.interval_std_s / history.interval_mean_s),
        math.log1p(history.distinct_ips),
    ]


#: The names of the scoring policies (FraudScoring): "seed", the specification's rules and the
#: default, and "tuned", this project's weights as a noisy-OR.
SEED, TUNED = "seed", "tuned"
#: What a geographic rule does (GeoEnforcement).
REFUSE, SCORE = "refuse", "score"

#: The refusal of a vote from outside the allowed countries, and of a GPS far from its IP.
GEO_RESTRICTED, LOCATION_MISMATCH = "GEO_RESTRICTED", "LOCATION_MISMATCH"
_COUNTRY_NAMES = {"KH": "Cambodia"}


def geo_message(allowed: frozenset[str]) -> str:
    """The voter's message for GEO_RESTRICTED: "Voting only allowed from Cambodia"."""
    return "Voting only allowed from " + ", ".join(
        _COUNTRY_NAMES.get(code, code) for code in sorted(allowed))


@dataclass(frozen=True)
class Policy:
    """How a show's votes are judged: its own (fraud_policies) or the deployment's."""

    #: The show; empty for the deployment's defaults.
    show_id: str
    block_threshold: float
    review_threshold: float
    allowed_countries: frozenset[str]
    scoring: str = SEED
    foreign_country: str = REFUSE
    location_mismatch: str = REFUSE

    @classmethod
    def default(cls, config: FraudConfig) -> Policy:
        return cls("", config.fraud_block_threshold, config.fraud_review_threshold,
                   frozenset(config.fraud_allowed_countries), config.fraud_scoring,
                   config.fraud_geo_foreign_country, config.fraud_geo_location_mismatch)


@dataclass(frozen=True, slots=True)
class Weights:
    """One scoring policy's signal weights."""

    velocity: float
    shared_device: float
    vpn_proxy: float
    foreign_country: float
    gps_mismatch: float
    bot_timing: float
    #: The model's probability times this (the tuned policy's; the seed averages it in).
    model: float

    @classmethod
    def of(cls, config: FraudConfig, scoring: str) -> Weights:
        c = config
        if scoring == SEED:
            return cls(c.fraud_seed_weight_velocity, c.fraud_seed_weight_shared_device,
                       c.fraud_seed_weight_vpn_proxy, c.fraud_seed_weight_foreign_country,
                       c.fraud_seed_weight_gps_mismatch, c.fraud_seed_weight_bot_timing, 1.0)
        return cls(c.fraud_weight_velocity, c.fraud_weight_shared_device,
                   c.fraud_weight_vpn_proxy, c.fraud_weight_foreign_country,
                   c.fraud_weight_gps_mismatch, c.fraud_weight_bot_timing, c.fraud_weight_model)


@dataclass(slots=True)
class Prepared:
    """What a vote's verdict takes from the vote alone, before its feature state is known."""

    blocked_by: str | None
    policy: Policy
    weights: Weights
    #: The signals that do not depend on the history, in the order they are combined.
    fired: list[tuple[float, str, str]]
    inputs: dict[str, object]
    #: The model's inputs that do not depend on the history.
    ip: IpInfo
    country: str | None
    foreign: bool
    gps_km: float | None
    has_gps: bool
    #: (reason, message) when a geographic rule refuses the vote.
    refusal: tuple[str, str] | None = None


class Scorer:
    """Turns a vote's facts and state into a verdict, by its show's policy (`Policy`).

    In two steps, so that the service does the first (`prepare`, the vote alone) while Redis
    computes the feature state the second (`finish`) needs; `score` does both.
    """

    def __init__(self, config: FraudConfig, model: Model) -> None:
        self.config = config
        self.model = model
        self.default = Policy.default(config)
        self._weights = {SEED: Weights.of(config, SEED), TUNED: Weights.of(config, TUNED)}
        self._model_detail = f"model {model.version} p="

    def score(self, facts: Facts, history: History, ip: IpInfo,
              traveller: bool = False, blocked_by: str | None = None,
              policy: Policy | None = None) -> Verdict:
        """The verdict on one vote; `policy` is its show's fraud policy, if it has one (the
        deployment's otherwise)."""
        return self.finish(self.prepare(facts, ip, traveller, blocked_by, policy), history)

    def prepare(self, facts: Facts, ip: IpInfo, traveller: bool = False,
                blocked_by: str | None = None, policy: Policy | None = None) -> Prepared:
        """The part of `score` that needs no feature state."""
        c = self.config
        if policy is None:
            policy = self.default
        weights = self._weights[policy.scoring]
        if blocked_by is not None:
            return Prepared(blocked_by, policy, weights, [], {}, ip, None, False, None, False)
        # (contribution, name, detail): plain tuples, several are made per vote.
        fired: list[tuple[float, str, str]] = []
        inputs: dict[str, object] = {"ip_hash": facts.ip_hash, "ip_country": ip.country,
                                     "ip_network": ip.network, "ip_asn": ip.asn,
                                     "scoring": policy.scoring}
        refusal: tuple[str, str] | None = None
        if ip.anonymous:
            fired.append((weights.vpn_proxy, "vpn_proxy",
                          f"VPN/proxy/hosting network {ip.network}"))
        country = facts.country_hint.upper() or ip.country
        inputs["country"] = country
        foreign = country is not None and country not in policy.allowed_countries
        if policy.show_id:
            inputs["policy_show_id"] = policy.show_id
        if foreign and traveller:
            inputs["traveller_exemption"] = True
        if foreign and not traveller and policy.foreign_country == REFUSE:
            refusal = (GEO_RESTRICTED, geo_message(policy.allowed_countries))
        elif foreign and (not traveller or policy.scoring == SEED):
            # The seed's rule is "country other than KH" whoever votes; the tuned policy
            # trusts a traveller's exemption.
            fired.append((weights.foreign_country, "foreign_country", f"voting from {country}"))
        has_gps = facts.latitude is not None and facts.longitude is not None
        gps_km: float | None = None
        if has_gps and ip.latitude is not None and ip.longitude is not None:
            assert facts.latitude is not None and facts.longitude is not None
            gps_km = distance_km(facts.latitude, facts.longitude, ip.latitude, ip.longitude)
            inputs["gps_km"] = gps_km
            if gps_km > c.fraud_gps_mismatch_km:
                detail = f"GPS {gps_km:.0f} km from the IP's location"
                if policy.location_mismatch == REFUSE:
                    # The distance stays in the audit log: told to the voter, it would
                    # show a spoofer how far off they are.
                    refusal = refusal or (LOCATION_MISMATCH, "Your device's location does "
                                          "not match your network's location")
                else:
                    fired.append((weights.gps_mismatch, "gps_mismatch", detail))
        return Prepared(None, policy, weights, fired, inputs, ip, country,
                        foreign and not traveller, gps_km, has_gps, refusal)

    def finish(self, prepared: Prepared, history: History) -> Verdict:
        """The verdict, from the prepared vote and its feature state."""
        c = self.config
        if prepared.blocked_by is not None or history.blocked:
            detail = prepared.blocked_by or "user flagged"
            return Verdict("BLOCK", 1.0, [Reason("blocklist", 1.0, detail)],
                           {"blocklist": detail})
        weights, policy = prepared.weights, prepared.policy
        fired: list[tuple[float, str, str]] = []
        if history.window_votes > c.fraud_velocity_max_votes:
            fired.append((weights.velocity, "velocity",
                          f"{history.window_votes} votes in "
                          f"{c.fraud_velocity_window_seconds:g} s"))
        if history.device_users > c.fraud_device_max_users:
            fired.append((weights.shared_device, "shared_device",
                          f"device used by {history.device_users} users"))
        fired += prepared.fired
        if (history.intervals >= c.fraud_bot_timing_min_intervals
                and history.interval_std_s < c.fraud_bot_timing_min_std_seconds):
            fired.append((weights.bot_timing, "bot_timing",
                          f"interval std dev {history.interval_std_s:.2f} s over "
                          f"{history.intervals} intervals"))
        probability = self.model.predict(model_inputs(
            history, prepared.ip, prepared.country, prepared.foreign, prepared.gps_km,
            prepared.has_gps, c))
        fired.append((weights.model * probability, "model",
                      f"{self._model_detail}{probability:.2f}"))
        if policy.scoring == SEED:
            score, reasons = _seed(fired)
        else:
            score, reasons = _noisy_or(fired)
        if prepared.refusal is not None:
            action = "REFUSE"
            reasons.insert(0, Reason(prepared.refusal[0].lower(), 0.0, prepared.refusal[1]))
        elif score > policy.block_threshold + _ON_THRESHOLD:
            action = "BLOCK"
        elif score > policy.review_threshold + _ON_THRESHOLD:
            action = "REVIEW"
        else:
            action = "ALLOW"
        inputs = {"window_votes": history.window_votes, "device_users": history.device_users,
                  "intervals": history.intervals, "interval_std_s": history.interval_std_s,
                  "distinct_ips": history.distinct_ips, **prepared.inputs,
                  "model": probability, "model_version": self.model.version}
        return Verdict(action, score, reasons, inputs, prepared.refusal)


#: A score this close above a threshold is on it: the weights are decimals that binary floats
#: only approximate (0.3 + 0.2 + 0.3 is 0.8000000000000002), and "above 0.8" must not turn on
#: the last bit of a sum.
_ON_THRESHOLD = 1e-9


def _seed(fired: list[tuple[float, str, str]]) -> tuple[float, list[Reason]]:
    """The specification's combination: min(1, (sum of the rules + the model) / 2), the last
    entry of `fired` being the model. Each reason reports its share of the score."""
    raw = sum(contribution for contribution, _, _ in fired) / 2
    score = min(1.0, raw)
    scale = score / raw / 2 if raw > 0 else 0.0
    reasons = [Reason(name, contribution * scale, detail)
               for contribution, name, detail in sorted(fired, key=_contribution, reverse=True)
               if contribution > 0]
    return score, reasons


def _noisy_or(fired: list[tuple[float, str, str]]) -> tuple[float, list[Reason]]:
    """Each signal removes its share of the remaining doubt. Signals are applied largest
    first and each reports what it added, so the contributions sum to the score. (The sort is
    stable: equal contributions keep their order.)"""
    fired.sort(key=_contribution, reverse=True)
    clean = 1.0
    reasons = []
    for contribution, name, detail in fired:
        added = clean * min(1.0, max(0.0, contribution))
        clean -= added
        if added > 0:
            reasons.append(Reason(name, added, detail))
    return 1.0 - clean, reasons


def _contribution(fired: tuple[float, str, str]) -> float:
    return fired[0]


class FeatureMemory:
    """The Redis feature state (state.py's scripts) kept in memory, for training and tests."""

    def __init__(self, config: FraudConfig) -> None:
        self.config = config
        self._votes: dict[str, deque[tuple[float, str, int]]] = {}
        self._devices: dict[str, set[str]] = {}

    def record(self, user_id: str, device_id: str, ip: str, now: float,
               count: int = 1) -> History:
        c = self.config
        votes = self._votes.setdefault(user_id, deque())
        votes.append((now, ip, count))
        while votes and votes[0][0] <= now - c.fraud_bot_timing_window_seconds:
            votes.popleft()
        while len(votes) > c.fraud_user_history:
            votes.popleft()
        window = sum(n for t, _, n in votes if t > now - c.fraud_velocity_window_seconds)
        times = sorted(t for t, _, _ in votes)
        intervals = [b - a for a, b in itertools.pairwise(times)]
        mean, std = _stats(intervals)
        users = 0
        if device_id:
            seen = self._devices.setdefault(device_id, set())
            seen.add(user_id)
            users = len(seen)
        return History(window, len(intervals), mean, std, len({ip for _, ip, _ in votes if ip}),
                       users)


def _stats(values: list[float]) -> tuple[float, float]:
    if not values:
        return 0.0, 0.0
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
