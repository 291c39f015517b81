"""Where a voter's IP is, for the report's geography: looked up at admission because the
ledger keeps only the IP's keyed hash (migrations/0013), so nothing can be looked up later.

Reads a MaxMind-format database (GeoIP2/GeoLite2 City or Country layout, VOTE_GEOIP_DB) with
`maxminddb`. The place is an ISO code: "KH-12" (the record's first subdivision, a province
of Cambodia), "KH" (Cambodia, no subdivision), "FR" (a country abroad); None when there is no
IP, no database or no record: the report says "unknown", never a guess.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import maxminddb

from runtime.places import PROVINCES, record_country


class IpPlaces:
    """IP -> place code, cached per IP: a show's voters come from a limited set of addresses
    and the vote path must stay in microseconds."""

    def __init__(self, path: str, cache_size: int = 65_536) -> None:
        self._reader = maxminddb.open_database(path, maxminddb.MODE_AUTO) if path else None
        self._cache: dict[str, str | None] = {}
        self._cache_size = cache_size

    def place(self, ip: str) -> str | None:
        if self._reader is None or not ip:
            return None
        try:
            return self._cache[ip]
        except KeyError:
            pass
        if len(self._cache) >= self._cache_size:
            self._cache.clear()  # O(1) per lookup; a show's addresses refill it quickly
        place = self._cache[ip] = self._lookup(ip)
        return place

    def _lookup(self, ip: str) -> str | None:
        assert self._reader is not None
        try:
            record: Any = self._reader.get(ip)
        except ValueError:  # not an address
            return None
        if not isinstance(record, Mapping):
            return None
        code = record_country(record)
        if code is None:
            return None
        subdivisions = record.get("subdivisions") or []
        if code == "KH" and subdivisions and isinstance(subdivisions[0], Mapping):
            province = f"KH-{subdivisions[0].get('iso_code', '')}"
            if province in PROVINCES:
                return province
        return code
