"""Scenarios as plans: every vote the simulated audience will send, when, by whom, how.

Pure and deterministic for a seed, so a plan can be unit-tested and two runs of the same
scenario send the same traffic. Times are wall-clock seconds after voting opens, already
compressed: a 30-minute window at `compress=30` is a 60 s plan.

Kinds of shot (what the client does, and so what the verifier must accept):
- ONCE: one submission.
- DUPLICATE: the same request sent twice at once (a double tap); both answers must name the
  same vote, the ledger must hold one row.
- DEADLINE_RETRY: the first attempt gives up after a few ms (a phone losing signal), then
  the client retries with the same request id until it gets a definite answer.
- RESEND: after an OK, the same request again (the app never saw the answer); it must be
  answered with the original vote id.
- MISMATCH: after an OK, the same request id with another contestant; IDEMPOTENCY_MISMATCH.
"""

from __future__ import annotations

import hashlib
import math
import random
import uuid
import zlib
from collections import Counter
from dataclasses import dataclass, field

from fraud_svc.behaviour import TrafficMix, generate

PATHS = ("grpc", "json", "grpcweb")
#: Premium SMS: a share of the seed's and shownight's voters text 1255 instead, through the
#: carrier JSON API (each subscriber on one of the three carriers).
SMS = "sms"
CARRIERS = ("SMART", "CELLCARD", "METFONE")
SMS_VIA = ("api", "kannel")
SCENARIOS = ("seed", "shownight", "retries", "bots")

ONCE, DUPLICATE, DEADLINE_RETRY, RESEND, MISMATCH = (
    "once", "duplicate", "deadline_retry", "resend", "mismatch")

FREE, PAID, PREMIUM_SMS = "FREE", "PAID", "PREMIUM_SMS"

#: Reasons a refusal may carry in every scenario: a voter past the episode's free votes, a
#: vote that reached the server after the close (planned late, or held up by an overloaded
#: path), a replica shedding load (OVERLOADED: nothing recorded, retry later), and a call
#: whose deadline passed before vote_svc could admit it (reason DEADLINE_EXCEEDED: nothing
#: recorded; seen in seed --compress 30 on a starved machine). Each is also checked by the
#: verifier: NO_FREE_VOTES only for a voter whose free votes are all used, VOTING_CLOSED only
#: when the answer came after the close, and no refused vote in the ledger.
BASE_REASONS = frozenset({"NO_FREE_VOTES", "VOTING_CLOSED", "OVERLOADED", "DEADLINE_EXCEEDED"})
def _expected_reasons(config: LoadConfig) -> frozenset[str]:
    """The scenario's reasons; compressed time also makes some humans look scripted.

    Fraud scoring judges intervals in real seconds (bot timing: std dev < 1 s), so a human's
    few votes squeezed 30x closer can, by chance, look machine-timed (seen: 1 voter in 6,000
    at --compress 30, then blocked by the flag it earned). In a compressed run FRAUD_BLOCKED is
    therefore an allowed refusal (still checked against the ledger); a real-time run keeps it
    unexpected for humans."""
    reasons = EXPECTED_REASONS[config.scenario]
    return reasons | {"FRAUD_BLOCKED"} if config.compress > 1 else reasons


EXPECTED_REASONS = {
    "seed": BASE_REASONS,
    "shownight": BASE_REASONS,
    "retries": BASE_REASONS | {"IDEMPOTENCY_MISMATCH"},
    # Bots are blocked by fraud scoring and hit the per-user rate limit.
    "bots": BASE_REASONS | {"FRAUD_BLOCKED", "RATE_LIMITED"},
}


@dataclass(slots=True)
class Shot:
    """One vote a simulated user sends (with its retries and duplicates, see `kind`)."""

    at: float  # seconds after voting opens (compressed)
    user: str
    contestant: int  # index into the round's contestants
    vote_type: str  # FREE or PAID
    path: str  # grpc, json or grpcweb
    request_id: str
    kind: str = ONCE
    device_id: str = ""
    latitude: float | None = None
    longitude: float | None = None
    label: str = "human"  # the behaviour generator's label (bots scenario)


@dataclass
class LoadConfig:
    """What to simulate. Defaults are the seed's load test."""

    scenario: str = "seed"
    users: int = 10_000
    votes_per_user: int = 10
    paid_share: float = 0.3
    #: The show's window in show time (seed: 30 minutes).
    window_s: float = 1800.0
    #: Show seconds per wall-clock second: 30 runs a 30-minute window in one minute.
    compress: float = 30.0
    paths: tuple[str, ...] = PATHS
    contestants: int = 4
    free_quota: int = 5
    seed: int = 1
    # shownight
    peak_rate: float = 500.0  # votes/s at the close-of-lines spike, wall clock
    spike_s: float = 60.0  # wall-clock length of the spike, ending at the close
    performances: int = 4
    #: Share of shownight votes sent in the second after the close (expect VOTING_CLOSED).
    late_share: float = 0.005
    #: seed and shownight: share of voters who vote by premium SMS (their votes are that
    #: share of all votes).
    sms_share: float = 0.2
    #: The report says the load generator fell behind its plan when, in any second of the
    #: plan, the p99 of how late its sends left exceeds this.
    lag_threshold_ms: float = 100.0
    #: How the SMS share reaches the edge: "api" (carriers' JSON webhook) or "kannel" (the
    #: fake SMSC links of a real Kannel: bearerbox, smsbox, its get-url; loadtest/kannel_sms.py).
    sms_via: str = "api"
    # retries
    retry_share: float = 0.2  # of shots that are not ONCE, split over the four kinds
    # bots
    bots: int = 10  # of each bot kind

    @property
    def wall_window_s(self) -> float:
        return self.window_s / self.compress


@dataclass
class Plan:
    config: LoadConfig
    run_id: str
    shots: list[Shot]
    #: user -> paid votes to grant before voting opens (PurchaseVotePackage is UNIMPLEMENTED,
    #: so the simulator funds paid voters as an operator through GrantVotes).
    grants: dict[str, int]
    expected_reasons: frozenset[str]
    #: shownight's performances: (number, starts at, ends at) in wall seconds after opening
    performances: list[tuple[int, float, float]] = field(default_factory=list)

    def summary(self) -> str:
        kinds = Counter(shot.kind for shot in self.shots)
        types = Counter(shot.vote_type for shot in self.shots)
        paths = Counter(shot.path for shot in self.shots)
        return (f"{len(self.shots):,} votes by {len({s.user for s in self.shots}):,} users over "
                f"{self.config.wall_window_s:.0f} s; {dict(types)}; {dict(paths)}; "
                f"{dict(kinds)}")


def validate(config: LoadConfig) -> None:
    """Raise ValueError naming what is wrong with a configuration."""
    if config.scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {config.scenario!r}; one of {', '.join(SCENARIOS)}")
    bad_paths = set(config.paths) - set(PATHS)
    if not config.paths or bad_paths:
        raise ValueError(f"paths must be some of {', '.join(PATHS)}")
    if config.compress <= 0 or config.window_s <= 0:
        raise ValueError("window and compression must be positive")
    if not 0 <= config.paid_share <= 1:
        raise ValueError("paid share must be between 0 and 1")
    if not 0 <= config.sms_share <= 1:
        raise ValueError("SMS share must be between 0 and 1")
    if config.sms_via not in SMS_VIA:
        raise ValueError(f"SMS goes via {' or '.join(SMS_VIA)}")
    if config.users < 1 or config.votes_per_user < 1 or config.contestants < 2:
        raise ValueError("need at least 1 user, 1 vote per user and 2 contestants")
    if config.scenario == "shownight" and (config.peak_rate <= 0 or config.spike_s <= 0):
        raise ValueError("peak rate and spike length must be positive")


def build(config: LoadConfig, run_id: str | None = None) -> Plan:
    validate(config)
    run_id = run_id or uuid.uuid4().hex[:8]
    rng = random.Random(config.seed)
    builder = {"seed": _seed, "retries": _retries, "shownight": _shownight, "bots": _bots}
    shots, performances = builder[config.scenario](config, run_id, rng)
    shots.sort(key=lambda shot: shot.at)
    if config.scenario == "bots":
        grants = _grants_after_free(shots, config.free_quota)
    else:
        grants = dict(Counter(shot.user for shot in shots if shot.vote_type == PAID))
    return Plan(config, run_id, shots, grants, _expected_reasons(config),
                performances)


def _user_votes(config: LoadConfig, run_id: str, rng: random.Random,
                times: list[float]) -> list[Shot]:
    """Deal `times` out to users, `votes_per_user` each; a user keeps one path and device."""
    rng.shuffle(times)
    sms_share = config.sms_share if config.scenario in ("seed", "shownight") else 0.0
    shots = []
    for index, at in enumerate(times):
        number = index // config.votes_per_user
        user = f"lt-{run_id}-u{number}"
        texts = zlib.crc32(user.encode()) % 1000 < sms_share * 1000
        paid = rng.random() < config.paid_share
        shots.append(Shot(
            at=at, user=user, contestant=rng.randrange(config.contestants),
            vote_type=PREMIUM_SMS if texts else PAID if paid else FREE,
            path=SMS if texts else config.paths[number % len(config.paths)],
            request_id=_request_id(rng, run_id),
            device_id=f"{user}-phone"))
    return shots


def _request_id(rng: random.Random, run_id: str) -> str:
    """A shot's request id: from the plan's seed, and unique to the run. Carriers' message ids
    are the SMS shots' request ids and sms_svc deduplicates on them, so two runs of one seed
    against one stack (bench.peak_search) must not share any: the second run's texts were
    answered as redeliveries of the first's, counted in another round."""
    run_bits = int.from_bytes(hashlib.blake2b(run_id.encode(), digest_size=16).digest())
    return str(uuid.UUID(int=rng.getrandbits(128) ^ run_bits, version=4))


def sms_sender(user: str) -> tuple[str, str]:
    """An SMS voter's carrier and number (E.164), from the user's number in the plan."""
    number = int(user.rpartition("-u")[2])
    return CARRIERS[number % len(CARRIERS)], f"+8551{number % 10_000_000:07d}"


def _seed(config: LoadConfig, run_id: str,
          rng: random.Random) -> tuple[list[Shot], list[tuple[int, float, float]]]:
    """The seed's test: every user votes `votes_per_user` times at uniform random moments.

    The end of the window (2 %, at least 0.3 s) stays empty so no vote is planned to race the
    close (shownight is the one that sends votes into the close).
    """
    window = config.wall_window_s
    end = window - min(max(window * 0.02, 0.3), window * 0.5)
    times = [rng.uniform(0, end) for _ in range(config.users * config.votes_per_user)]
    return _user_votes(config, run_id, rng, times), []


def _retries(config: LoadConfig, run_id: str,
             rng: random.Random) -> tuple[list[Shot], list[tuple[int, float, float]]]:
    shots, _ = _seed(config, run_id, rng)
    for shot in shots:
        if rng.random() < config.retry_share:
            shot.kind = rng.choice((DUPLICATE, DEADLINE_RETRY, RESEND, MISMATCH))
    return shots, []


def shownight_rate(config: LoadConfig) -> tuple[list[float], list[tuple[int, float, float]]]:
    """Votes per second for each 100 ms of the window, and the performances' (number, start,
    end) in wall seconds.

    Quiet at 5 % of the peak; after each performance a burst to a third of the peak that
    decays over 10 s; the close-of-lines spike ramps up over its first tenth and holds the peak
    to the close.
    """
    total = config.wall_window_s
    spike = min(config.spike_s, total)
    spike_start = total - spike
    step = 0.1
    quiet, burst = config.peak_rate * 0.05, config.peak_rate / 3
    performances = []
    if config.performances > 0 and spike_start > 0:
        slot = spike_start / config.performances
        for number in range(config.performances):
            start = number * slot + slot * 0.1
            performances.append((number + 1, start, start + slot * 0.6))
    rates = []
    for tick in range(math.ceil(total / step)):
        t = tick * step
        rate = quiet
        for _, _, ends in performances:
            if t >= ends:
                rate = max(rate, quiet + burst * math.exp(-(t - ends) / 10.0))
        if t >= spike_start:
            ramp = min(1.0, (t - spike_start) / max(spike * 0.1, step))
            rate = max(rate, config.peak_rate * ramp)
        rates.append(rate)
    return rates, performances


def _shownight(config: LoadConfig, run_id: str,
               rng: random.Random) -> tuple[list[Shot], list[tuple[int, float, float]]]:
    rates, performances = shownight_rate(config)
    times: list[float] = []
    for tick, rate in enumerate(rates):
        expected = rate * 0.1
        count = int(expected) + (rng.random() < expected - int(expected))
        times.extend(tick * 0.1 + rng.random() * 0.1 for _ in range(count))
    late = int(len(times) * config.late_share)
    times.extend(config.wall_window_s + rng.random() for _ in range(late))
    return _user_votes(config, run_id, rng, times), performances


def _bots(config: LoadConfig, run_id: str,
          rng: random.Random) -> tuple[list[Shot], list[tuple[int, float, float]]]:
    """Humans and bots from fraud_svc's behaviour generator, on the show's clock.

    Only what reaches vote_svc through the edge can be simulated: device ids and GPS travel in
    ClientMetadata, but the edge sets the client IP from the connection (use_remote_address),
    so the generator's IP plan is not seen by fraud scoring through the edge.
    """
    mix = TrafficMix(humans=config.users, fixed_interval_bots=config.bots,
                     device_farms=max(1, config.bots // 3), farm_accounts=8,
                     proxy_rotators=config.bots, duration_seconds=config.window_s,
                     prefix=f"lt-{run_id}")
    shots = []
    for event in generate(mix, seed=config.seed):
        shots.append(Shot(
            at=event.time / config.compress, user=event.user_id,
            contestant=rng.randrange(config.contestants), vote_type=FREE,
            path=config.paths[zlib.crc32(event.user_id.encode()) % len(config.paths)],
            request_id=_request_id(rng, run_id),
            device_id=event.device_id, latitude=event.latitude, longitude=event.longitude,
            label=event.label))
    return shots, []


def _grants_after_free(shots: list[Shot], free_quota: int) -> dict[str, int]:
    """A voter's first `free_quota` votes are free, the rest paid and funded exactly."""
    seen: Counter[str] = Counter()
    for shot in sorted(shots, key=lambda s: s.at):
        seen[shot.user] += 1
        shot.vote_type = FREE if seen[shot.user] <= free_quota else PAID
    return {user: count - free_quota for user, count in seen.items() if count > free_quota}
