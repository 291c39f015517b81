"""Cambodia's provinces, one spelling for the whole mesh.

Voters declare a province in their profile (vote_svc) and the report places votes by GPS or
GeoIP (results_svc); both speak of a province by its English name as in ISO 3166-2:KH, so
the report can set the two side by side.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: ISO 3166-2:KH code -> English name.
PROVINCES: dict[str, str] = {
    "KH-1": "Banteay Meanchey", "KH-2": "Battambang", "KH-3": "Kampong Cham",
    "KH-4": "Kampong Chhnang", "KH-5": "Kampong Speu", "KH-6": "Kampong Thom",
    "KH-7": "Kampot", "KH-8": "Kandal", "KH-9": "Koh Kong", "KH-10": "Kratie",
    "KH-11": "Mondulkiri", "KH-12": "Phnom Penh", "KH-13": "Preah Vihear",
    "KH-14": "Prey Veng", "KH-15": "Pursat", "KH-16": "Ratanakiri", "KH-17": "Siem Reap",
    "KH-18": "Preah Sihanouk", "KH-19": "Stung Treng", "KH-20": "Svay Rieng",
    "KH-21": "Takeo", "KH-22": "Oddar Meanchey", "KH-23": "Kep", "KH-24": "Pailin",
    "KH-25": "Tboung Khmum",
}

NAMES = frozenset(PROVINCES.values())

#: Other spellings met in gazetteers (GeoNames' first-level divisions) -> the ISO name.
_ALIASES = {
    "kampong speu province": "Kampong Speu", "mondolkiri": "Mondulkiri",
    "ŏtâr méanchey": "Oddar Meanchey", "otdar meanchey": "Oddar Meanchey",
    "krong kep": "Kep", "krong pailin": "Pailin", "sihanoukville": "Preah Sihanouk",
    "ratanak kiri": "Ratanakiri", "mondul kiri": "Mondulkiri", "kracheh": "Kratie",
    "takêv": "Takeo", "pouthisat": "Pursat", "siemreab": "Siem Reap",
    "stoeng treng": "Stung Treng", "banteay mean chey": "Banteay Meanchey",
    "batdambang": "Battambang", "phnum penh": "Phnom Penh", "kaoh kong": "Koh Kong",
}
_BY_LOWER = {name.lower(): name for name in NAMES} | _ALIASES


def province_name(text: str) -> str | None:
    """The ISO name of a province however a gazetteer spells it, or None."""
    return _BY_LOWER.get(text.strip().lower())


def record_country(record: Mapping[str, Any]) -> str | None:
    """The ISO country code of a MaxMind-format (GeoIP2/GeoLite2) record: where the address
    is, else where its network is registered; one rule for fraud scoring and the report."""
    country = record.get("country") or record.get("registered_country") or {}
    code = country.get("iso_code") if isinstance(country, Mapping) else None
    return code.upper() if isinstance(code, str) and code else None
