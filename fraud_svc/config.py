"""fraud_svc's configuration: every weight and threshold of scoring comes from the environment.

Lists (CIDRs, ASNs, countries) are comma-separated, e.g. FRAUD_VPN_CIDRS="203.0.113.0/24,...".
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, ClassVar, Literal, Self

from pydantic import field_validator, model_validator
from pydantic_settings import NoDecode

from runtime.config import ServiceConfig

CommaList = Annotated[tuple[str, ...], NoDecode]


def _split(value: object) -> object:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


class FraudConfig(ServiceConfig):
    """Scoring thresholds, signal weights, IP intelligence and feature-state settings."""

    service_name: ClassVar[str] = "fraud_svc"

    #: A MaxMind-format (GeoIP2/GeoLite2 City or Country) database. Empty: IP signals say
    #: "unknown" and contribute nothing; the service still runs.
    fraud_geoip_db: str = ""
    #: An optional separate ASN database (GeoLite2-ASN layout); ASNs are also read from the
    #: main database's `autonomous_system_number` when it has one.
    fraud_asn_db: str = ""
    #: Networks of VPNs, proxies and hosting providers.
    fraud_vpn_cidrs: CommaList = ()
    #: Autonomous systems of VPNs, proxies and hosting providers.
    fraud_vpn_asns: CommaList = ()
    #: ISO country codes voters may vote from (the geo-fence).
    fraud_allowed_countries: CommaList = ("KH",)

    fraud_block_threshold: float = 0.8
    fraud_review_threshold: float = 0.5

    #: How votes of shows without a policy of their own are scored: "seed" (the
    #: specification's rule sum averaged with the model) or "tuned" (FRAUD_WEIGHT_* as a
    #: noisy-OR). A show chooses with SetFraudPolicy.
    fraud_scoring: Literal["seed", "tuned"] = "seed"
    #: What the geographic rules do by default: "refuse" the vote (GEO_RESTRICTED,
    #: LOCATION_MISMATCH; the specification) or "score" it as a signal.
    fraud_geo_foreign_country: Literal["refuse", "score"] = "refuse"
    fraud_geo_location_mismatch: Literal["refuse", "score"] = "refuse"

    fraud_velocity_window_seconds: float = 60.0
    fraud_velocity_max_votes: int = 50
    fraud_device_max_users: int = 3
    fraud_bot_timing_window_seconds: float = 3600.0
    fraud_bot_timing_min_std_seconds: float = 1.0
    #: Intervals needed before timing is judged (fewer say nothing about a rhythm).
    fraud_bot_timing_min_intervals: int = 5
    fraud_gps_mismatch_km: float = 100.0

    #: The seed policy's rule weights (the specification's numbers), summed into a rule score;
    #: score = min(1, (rule score + model probability) / 2).
    fraud_seed_weight_velocity: float = 0.3
    fraud_seed_weight_shared_device: float = 0.2
    fraud_seed_weight_vpn_proxy: float = 0.4
    fraud_seed_weight_foreign_country: float = 0.3
    fraud_seed_weight_bot_timing: float = 0.5
    #: Not in the specification (which refuses such votes): the weight of `gps_mismatch`
    #: when a show scores it instead, the same as a foreign country's.
    fraud_seed_weight_gps_mismatch: float = 0.3

    #: The tuned policy's weights, combined as a noisy-OR.
    fraud_weight_velocity: float = 0.6
    fraud_weight_shared_device: float = 0.4
    fraud_weight_vpn_proxy: float = 0.35
    fraud_weight_foreign_country: float = 0.3
    fraud_weight_bot_timing: float = 0.55
    fraud_weight_gps_mismatch: float = 0.25
    #: The model's probability times this weight is its contribution.
    fraud_weight_model: float = 0.6
    #: The model file; empty for the one shipped in fraud_svc/model/.
    fraud_model_path: str = ""

    #: Votes kept per user for timing (the newest within the timing window).
    fraud_user_history: int = 200
    #: Seconds a device's set of users is remembered after its last vote.
    fraud_device_ttl_seconds: int = 7 * 24 * 3600
    #: How often operator blocks and traveller exemptions are reloaded from PostgreSQL, so
    #: a block made through another replica applies within this time.
    fraud_refresh_seconds: float = 1.0

    @field_validator("fraud_vpn_cidrs", "fraud_vpn_asns", "fraud_allowed_countries",
                     mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        return _split(value)

    @field_validator("fraud_vpn_cidrs")
    @classmethod
    def _valid_cidrs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for cidr in value:
            ipaddress.ip_network(cidr, strict=False)  # ValueError names the bad entry
        return value

    @field_validator("fraud_vpn_asns")
    @classmethod
    def _valid_asns(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for asn in value:
            int(asn.upper().removeprefix("AS"))
        return value

    @field_validator("fraud_allowed_countries")
    @classmethod
    def _upper(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(code.upper() for code in value)

    @model_validator(mode="after")
    def _history_covers_velocity(self) -> Self:
        # Velocity counts the kept history: keeping fewer votes than the limit would hide it.
        if self.fraud_user_history <= self.fraud_velocity_max_votes:
            raise ValueError("FRAUD_USER_HISTORY must exceed FRAUD_VELOCITY_MAX_VOTES")
        if not 0 < self.fraud_review_threshold <= self.fraud_block_threshold:
            raise ValueError("need 0 < FRAUD_REVIEW_THRESHOLD <= FRAUD_BLOCK_THRESHOLD")
        return self
