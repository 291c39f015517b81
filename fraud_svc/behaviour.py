"""A voter-behaviour generator: labelled vote traffic of humans and several kinds of bots.

Used to train the fraud model (fraud_svc/train.py), to benchmark scoring, and by load
simulators. Everything is deterministic for a given seed.

    from fraud_svc.behaviour import TrafficMix, generate
    events = generate(TrafficMix(humans=500), seed=7)   # list[VoteEvent], sorted by time

The addresses come from a synthetic network plan (`NETWORKS`): Cambodian residential
networks, foreign residential networks and hosting/VPN networks. `plan_intel()` answers IP
lookups from the plan without a database; `write_plan_database()` (in fraud_svc.devgeo)
writes the plan as a MaxMind-format database, so the live service sees the same facts.

Kinds of voters (VoteEvent.label):
- "human": a few votes at irregular moments, bursts of quick taps, own or family device
  (at most 3 users on one), home IP, GPS near the IP's city when given; some travel abroad,
  some use a VPN.
- "fixed_interval": a script voting every T seconds with tiny jitter, for a long time.
- "device_farm": many accounts voting from a handful of devices, one network.
- "proxy_rotation": a script rotating through VPN/hosting and foreign IPs, claiming a
  Phnom Penh GPS position, with randomized timing to look human.
"""

from __future__ import annotations

import ipaddress
import math
import random
from dataclasses import dataclass

from fraud_svc.geoip import IpInfo, VpnLists

LABELS = ("human", "fixed_interval", "device_farm", "proxy_rotation")


@dataclass(frozen=True)
class Network:
    """One network of the synthetic plan."""

    cidr: str
    country: str
    city: str
    latitude: float
    longitude: float
    asn: int
    hosting: bool = False


#: The synthetic address plan (documentation-style shared address space, not real networks).
NETWORKS: tuple[Network, ...] = (
    Network("100.64.0.0/16", "KH", "Phnom Penh", 11.5564, 104.9282, 64_601),
    Network("100.65.0.0/16", "KH", "Siem Reap", 13.3633, 103.8564, 64_602),
    Network("100.66.0.0/16", "KH", "Battambang", 13.0957, 103.2022, 64_603),
    Network("100.80.0.0/16", "TH", "Bangkok", 13.7563, 100.5018, 64_700),
    Network("100.81.0.0/16", "VN", "Ho Chi Minh City", 10.8231, 106.6297, 64_701),
    Network("100.82.0.0/16", "US", "Long Beach", 33.7701, -118.1937, 64_702),
    Network("100.96.0.0/16", "SG", "Singapore", 1.3521, 103.8198, 64_500, hosting=True),
    Network("100.97.0.0/16", "US", "Ashburn", 39.0438, -77.4874, 64_501, hosting=True),
    Network("100.98.0.0/16", "NL", "Amsterdam", 52.3676, 4.9041, 64_502, hosting=True),
)

_HOME = [n for n in NETWORKS if n.country == "KH"]
_ABROAD = [n for n in NETWORKS if n.country != "KH" and not n.hosting]
_HOSTING = [n for n in NETWORKS if n.hosting]


@dataclass(frozen=True)
class VoteEvent:
    """One vote as fraud scoring sees it."""

    time: float  # seconds since the start of the traffic
    user_id: str
    device_id: str
    ip: str
    latitude: float | None
    longitude: float | None
    label: str

    @property
    def fraud(self) -> bool:
        return self.label != "human"


@dataclass(frozen=True)
class TrafficMix:
    """How many voters of each kind, over how long."""

    humans: int = 2_000
    fixed_interval_bots: int = 40
    device_farms: int = 6
    farm_accounts: int = 25
    proxy_rotators: int = 40
    duration_seconds: float = 1_800.0
    #: Prefix of generated ids, so several generated populations do not collide.
    prefix: str = "g"


def vpn_lists() -> VpnLists:
    """The plan's hosting networks as the service's VPN/proxy list."""
    return VpnLists([n.cidr for n in _HOSTING], [])


def plan_intel() -> PlanIntel:
    return PlanIntel()


class PlanIntel:
    """IP lookups answered from the plan, as a MaxMind database written from it would."""

    def __init__(self) -> None:
        self._networks = [(ipaddress.ip_network(n.cidr), n) for n in NETWORKS]

    def lookup(self, ip: str) -> IpInfo:
        address = ipaddress.ip_address(ip)
        for network, plan in self._networks:
            if address in network:
                return IpInfo(plan.country, plan.latitude, plan.longitude, plan.asn,
                              plan.cidr, plan.hosting)
        return IpInfo(anonymous=False)


def generate(mix: TrafficMix = TrafficMix(), seed: int = 1) -> list[VoteEvent]:
    """Labelled vote events of the mix, sorted by time."""
    rng = random.Random(seed)
    events: list[VoteEvent] = []
    p = mix.prefix
    family_devices: list[str] = []
    for index in range(mix.humans):
        events.extend(_human(rng, mix, f"{p}-h{index}", family_devices))
    for index in range(mix.fixed_interval_bots):
        events.extend(_fixed_interval(rng, mix, f"{p}-fi{index}"))
    for index in range(mix.device_farms):
        events.extend(_device_farm(rng, mix, f"{p}-df{index}"))
    for index in range(mix.proxy_rotators):
        events.extend(_proxy_rotation(rng, mix, f"{p}-pr{index}"))
    events.sort(key=lambda event: event.time)
    return events


def _ip(rng: random.Random, network: Network) -> str:
    base = ipaddress.ip_network(network.cidr)
    return str(base[rng.randrange(1, base.num_addresses - 1)])


def _near(rng: random.Random, network: Network, km: float) -> tuple[float, float]:
    """A point within about `km` of the network's city."""
    distance = abs(rng.gauss(0, km / 2))
    bearing = rng.uniform(0, 2 * math.pi)
    dlat = distance / 111.0 * math.cos(bearing)
    dlon = distance / (111.0 * max(0.2, math.cos(math.radians(network.latitude)))) \
        * math.sin(bearing)
    return network.latitude + dlat, network.longitude + dlon


def _human(rng: random.Random, mix: TrafficMix, user: str,
           family_devices: list[str]) -> list[VoteEvent]:
    # Families share a phone: up to 3 users on one device, never more.
    if family_devices and rng.random() < 0.15:
        device = family_devices.pop(rng.randrange(len(family_devices)))
    else:
        device = f"{user}-dev"
        if rng.random() < 0.3:
            family_devices.extend([device] * rng.randint(1, 2))
    traveller = rng.random() < 0.05
    network = rng.choice(_ABROAD if traveller else _HOME)
    vpn = rng.random() < 0.04
    ip_network = rng.choice(_HOSTING) if vpn else network
    ip = _ip(rng, ip_network)
    gps = rng.random() < 0.7
    votes = max(1, min(40, int(rng.lognormvariate(1.3, 0.9))))
    now = rng.uniform(0, mix.duration_seconds * 0.9)
    events = []
    for _ in range(votes):
        if now > mix.duration_seconds:
            break
        lat, lon = _near(rng, network, 15) if gps else (None, None)
        events.append(VoteEvent(now, user, device, ip, lat, lon, "human"))
        # Bursts of taps (a second or a few apart, uneven) between longer pauses.
        now += rng.uniform(0.4, 6.0) if rng.random() < 0.6 else rng.expovariate(1 / 90)
    return events


def _fixed_interval(rng: random.Random, mix: TrafficMix, user: str) -> list[VoteEvent]:
    period = rng.uniform(0.8, 12.0)
    jitter = rng.uniform(0.0, 0.25)
    network = rng.choice(_HOME + _HOSTING)
    ip = _ip(rng, network)
    gps = rng.random() < 0.3
    lat, lon = _near(rng, network, 5) if gps else (None, None)
    now = rng.uniform(0, mix.duration_seconds * 0.5)
    events = []
    while now < mix.duration_seconds:
        events.append(VoteEvent(now, user, f"{user}-dev", ip, lat, lon, "fixed_interval"))
        now += max(0.05, period + rng.gauss(0, jitter))
    return events


def _device_farm(rng: random.Random, mix: TrafficMix, farm: str) -> list[VoteEvent]:
    devices = [f"{farm}-dev{d}" for d in range(rng.randint(1, 4))]
    network = rng.choice(_HOME)
    subnet_ips = [_ip(rng, network) for _ in range(rng.randint(1, 3))]
    lat, lon = _near(rng, network, 1)
    events = []
    for account in range(mix.farm_accounts):
        user = f"{farm}-u{account}"
        now = rng.uniform(0, mix.duration_seconds * 0.8)
        for _ in range(rng.randint(3, 12)):
            events.append(VoteEvent(now, user, rng.choice(devices), rng.choice(subnet_ips),
                                    lat if rng.random() < 0.5 else None,
                                    lon, "device_farm"))
            now += rng.uniform(2.0, 20.0)
    return [e if e.latitude is not None else VoteEvent(e.time, e.user_id, e.device_id, e.ip,
                                                        None, None, e.label) for e in events]


def _proxy_rotation(rng: random.Random, mix: TrafficMix, user: str) -> list[VoteEvent]:
    claimed = _HOME[0]
    now = rng.uniform(0, mix.duration_seconds * 0.5)
    events = []
    for _ in range(rng.randint(15, 120)):
        if now > mix.duration_seconds:
            break
        network = rng.choice(_HOSTING + _ABROAD)
        lat, lon = _near(rng, claimed, 3) if rng.random() < 0.8 else (None, None)
        events.append(VoteEvent(now, user, f"{user}-dev{rng.randint(0, 2)}", _ip(rng, network),
                                lat, lon, "proxy_rotation"))
        now += rng.uniform(1.0, 40.0)
    return events
