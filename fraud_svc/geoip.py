"""IP intelligence: country, location and network of an IP, and whether it is a VPN/proxy.

Reads a MaxMind-format database with `maxminddb` (GeoIP2/GeoLite2 City or Country layout,
optionally a GeoLite2-ASN database beside it). Without a database every answer is "unknown"
and the IP signals contribute nothing, so the service runs on a fresh machine too.
Lookups are cached per IP: a show's voters come from a limited set of addresses and the
hot path must stay in microseconds.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

import maxminddb

from runtime.places import record_country

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


#: An address as (IP version, integer value).
Address = tuple[int, int]


@lru_cache(maxsize=65_536)
def parse_ip(ip: str) -> Address | None:
    """The address, or None when `ip` is not one.

    socket.inet_pton is strict (no "1.2.3" shorthand) and far cheaper than the ipaddress
    module, whose parsing showed in profiles of the hot path.
    """
    try:
        if ":" in ip:
            return 6, int.from_bytes(socket.inet_pton(socket.AF_INET6, ip), "big")
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, ip), "big")
    except (OSError, ValueError):
        return None


def network_text(address: Address, prefix: int) -> str:
    """The network of `prefix` bits around `address`, e.g. "203.0.113.0/24"."""
    version, value = address
    bits = 32 if version == 4 else 128
    masked = (value >> (bits - prefix) << (bits - prefix)) if prefix else 0
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    return f"{socket.inet_ntop(family, masked.to_bytes(bits // 8, 'big'))}/{prefix}"


@dataclass(frozen=True)
class IpInfo:
    """What is known about one IP; None fields are unknown."""

    country: str | None = None
    latitude: float | None = None
    longitude: float | None = None
    asn: int | None = None
    #: The network the database (or a VPN list) matched, e.g. "203.0.113.0/24".
    network: str | None = None
    #: Whether the IP is in a VPN/proxy/hosting network; None when nothing could be looked up.
    anonymous: bool | None = None


UNKNOWN = IpInfo()


class IpIntel(Protocol):
    """Looks up IPs; implemented over a MaxMind database, and over a plan in training."""

    def lookup(self, ip: str) -> IpInfo: ...


class VpnLists:
    """Configured VPN/proxy/hosting networks and autonomous systems."""

    def __init__(self, cidrs: Iterable[str], asns: Iterable[str]) -> None:
        self.networks: list[IPNetwork] = [ipaddress.ip_network(c, strict=False) for c in cidrs]
        self.asns = frozenset(int(a.upper().removeprefix("AS")) for a in asns)
        # (version, shift, network value >> shift, text) for integer comparisons.
        self._ranges = [(n.version, n.max_prefixlen - n.prefixlen,
                         int(n.network_address) >> (n.max_prefixlen - n.prefixlen), str(n))
                        for n in self.networks]

    def match(self, address: Address, asn: int | None) -> str | None:
        """The matching list entry, if any."""
        version, value = address
        for network_version, shift, prefix, text in self._ranges:
            if version == network_version and value >> shift == prefix:
                return text
        if asn is not None and asn in self.asns:
            return f"AS{asn}"
        return None


class MaxMindIntel:
    """IP intelligence from MaxMind-format databases plus the configured VPN lists."""

    def __init__(self, city_path: str, asn_path: str, vpn: VpnLists,
                 cache_size: int = 65_536) -> None:
        self._city = maxminddb.open_database(city_path, maxminddb.MODE_AUTO) \
            if city_path else None
        self._asn = maxminddb.open_database(asn_path, maxminddb.MODE_AUTO) \
            if asn_path else None
        self._vpn = vpn
        self._cache: dict[str, IpInfo] = {}
        self._cache_size = cache_size

    @property
    def has_database(self) -> bool:
        return self._city is not None

    def lookup(self, ip: str) -> IpInfo:
        info = self._cache.get(ip)
        if info is None:
            if len(self._cache) >= self._cache_size:
                self._cache.clear()  # crude but O(1) per lookup; a show's IPs refill it fast
            info = self._cache[ip] = self._lookup(ip)
        return info

    def _lookup(self, ip: str) -> IpInfo:
        address = parse_ip(ip)
        if address is None:
            return UNKNOWN
        record: Mapping[str, Any] = {}
        network: str | None = None
        if self._city is not None:
            found, prefix = self._city.get_with_prefix_len(ip)
            if isinstance(found, Mapping):
                record = found
                network = network_text(address, prefix)
        asn = _int(record.get("autonomous_system_number"))
        if self._asn is not None and asn is None:
            asn_record = self._asn.get(ip)
            if isinstance(asn_record, Mapping):
                asn = _int(asn_record.get("autonomous_system_number"))
        location = record.get("location") or {}
        traits = record.get("traits") or {}
        listed = self._vpn.match(address, asn)
        flagged = any(bool(traits.get(flag)) for flag in (
            "is_anonymous", "is_anonymous_vpn", "is_anonymous_proxy", "is_hosting_provider",
            "is_public_proxy", "is_tor_exit_node"))
        known = self._city is not None or self._asn is not None or bool(self._vpn.networks)
        return IpInfo(
            country=record_country(record),
            latitude=_float(location.get("latitude")) if isinstance(location, Mapping) else None,
            longitude=_float(location.get("longitude"))
            if isinstance(location, Mapping) else None,
            asn=asn,
            network=listed or network,
            anonymous=(listed is not None or flagged) if known else None,
        )


def _int(value: object) -> int | None:
    return value if isinstance(value, int) else None


def _float(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) else None
