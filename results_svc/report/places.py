"""Where a voter voted from: a Cambodian province, a country abroad, or unknown.

GPS first (the app's location, to a province by the nearest populated place of the offline
GeoNames gazetteer in `reverse_geocode`), else the IP's location in the GeoIP database
(fraud_svc's reader of a MaxMind-format database; without one, only GPS places anyone).
"""

from __future__ import annotations

import reverse_geocode

from fraud_svc.geoip import MaxMindIntel, VpnLists
from runtime.places import province_name

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


class Locator:
    def __init__(self, geoip_db: str = "") -> None:
        self._intel = MaxMindIntel(geoip_db, "", VpnLists((), ())) if geoip_db else None

    def places(self, located: list[tuple[float | None, float | None, str | None]]
               ) -> list[Place]:
        """The place of each (latitude, longitude, ip); the points are looked up together
        (one k-d tree query for all: ~30 us a point, against ~200 us one at a time)."""
        places: list[Place] = []
        pending: dict[tuple[float, float], list[int]] = {}
        for index, (latitude, longitude, ip) in enumerate(located):
            if latitude is None or longitude is None:
                latitude, longitude, known = self._by_ip(ip)
                if known is not None:
                    places.append(known)
                    continue
            assert latitude is not None and longitude is not None
            places.append((UNKNOWN, ""))
            pending.setdefault((float(latitude), float(longitude)), []).append(index)
        if pending:
            points = list(pending)
            for point, found in zip(points, reverse_geocode.search(points), strict=True):
                for index in pending[point]:
                    places[index] = _from_gazetteer(found)
        return places

    def _by_ip(self, ip: str | None) -> tuple[float | None, float | None, Place | None]:
        """A point to look up, or the place when the IP alone tells it."""
        if not ip or self._intel is None:
            return None, None, (UNKNOWN, "")
        info = self._intel.lookup(ip)
        if info.latitude is not None and info.longitude is not None and \
                info.country in (None, "KH"):
            return info.latitude, info.longitude, None
        if info.country == "KH":
            return None, None, ("KH", UNKNOWN)
        if info.country:
            return None, None, (info.country, "")
        return None, None, (UNKNOWN, "")
