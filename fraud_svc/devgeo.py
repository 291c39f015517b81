"""Writes small MaxMind-format databases for tests, benchmarks and development.

Uses the `mmdb-writer` package (a dev dependency); production reads a real GeoIP2/GeoLite2
database with `maxminddb` (fraud_svc/geoip.py). The records follow the GeoIP2 City layout,
with the GeoLite2-ASN field `autonomous_system_number` merged in.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from fraud_svc.behaviour import NETWORKS, Network
from runtime.places import PROVINCES


def write_database(path: str | Path, networks: Iterable[Network] = NETWORKS) -> Path:
    """A GeoIP2-City-like database with one record per network."""
    import netaddr
    from mmdb_writer import MMDBWriter

    writer = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoIP2-City",
                        languages=["en"], description={"en": "televote development GeoIP"})
    for network in networks:
        record: dict[str, object] = {
            "country": {"iso_code": network.country},
            "city": {"names": {"en": network.city}},
            "location": {"latitude": network.latitude, "longitude": network.longitude},
            "autonomous_system_number": network.asn,
        }
        if network.country == "KH":  # the province, as GeoIP2 City names it (ISO 3166-2)
            record["subdivisions"] = [{"iso_code": code.removeprefix("KH-"),
                                       "names": {"en": network.city}}
                                      for code, name in PROVINCES.items()
                                      if name == network.city]
        if network.hosting:
            record["traits"] = {"is_hosting_provider": True}
        writer.insert_network(netaddr.IPSet([network.cidr]), record)
    target = Path(path)
    writer.to_db_file(str(target))
    return target
