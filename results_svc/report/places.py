"""Where a voter voted from: a Cambodian province, a country abroad, or unknown.

From the app's GPS point, to a province by the nearest populated place of the offline GeoNames
gazetteer in `reverse_geocode`; without GPS, from the IP's place that vote_svc looked up in its
GeoIP database at admission (`votes.ip_geo`, vote_svc/geo.py: the ledger keeps only the IP's
keyed hash, so it cannot be looked up later). Neither: "unknown", never guessed.
"""

from __future__ import annotations

import reverse_geocode

from runtime.places import PROVINCES, province_name

UNKNOWN = "unknown"
#: (country code or "unknown", province for Cambodia or "" abroad)
Place = tuple[str, str]


def _from_gazetteer(found: dict[str, object]) -> Place:
    country = str(found.get("country_code") or "").upper()
    if not country:
        return (UNKNOWN, "")
    if country != "KH":
        return (country, "")
    return ("KH", province_name(str(found.get("state") or "")) or UNKNOWN)


def warm() -> None:
    """Load the gazetteer (seconds, once per process): at start, not in the first report."""
    reverse_geocode.search([(0.0, 0.0)])


def locate(points: list[tuple[float | None, float | None]]) -> list[Place]:
    """The place of each (latitude, longitude); the points are looked up together (one k-d
    tree query for all: ~30 us a point, against ~200 us one at a time)."""
    places: list[Place] = [(UNKNOWN, "")] * len(points)
    pending: dict[tuple[float, float], list[int]] = {}
    for index, (latitude, longitude) in enumerate(points):
        if latitude is not None and longitude is not None:
            pending.setdefault((float(latitude), float(longitude)), []).append(index)
    if pending:
        keys = list(pending)
        for key, found in zip(keys, reverse_geocode.search(keys), strict=True):
            for index in pending[key]:
                places[index] = _from_gazetteer(found)
    return places


def place_of_ip(code: str | None) -> Place:
    """The place of an IP place code as vote_svc records it: "KH-12" (a province), "KH"
    (Cambodia, province unknown), "FR" (abroad), None (unknown)."""
    if not code:
        return (UNKNOWN, "")
    country, _, _ = code.partition("-")
    if country != "KH":
        return (country, "")
    return ("KH", PROVINCES.get(code, UNKNOWN))
