"""The vote package catalogue, read from PostgreSQL (migrations seed the defaults).

Every app opens its store screen with ListVotePackages, most of them in the minutes a round is
open, and the catalogue changes between shows, not between seconds: it is read at most once per
CATALOGUE_TTL_S per process, and concurrent callers share that one read.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from runtime.storage import Storage
from televote.vote.v1 import vote_service_pb2, vote_types_pb2
from vote_svc import store

CATALOGUE_TTL_S = 10.0


class PackageCatalogue:
    """The packages on sale, cheapest first, cached for CATALOGUE_TTL_S."""

    def __init__(self, storage: Storage, ttl_s: float = CATALOGUE_TTL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._storage = storage
        self._ttl_s = ttl_s
        self._clock = clock
        self._packages: list[vote_service_pb2.VotePackage] = []
        self._read_at = -float("inf")
        self._lock = asyncio.Lock()

    async def packages(self) -> list[vote_service_pb2.VotePackage]:
        if self._clock() - self._read_at < self._ttl_s:
            return self._packages
        async with self._lock:  # one read for everyone who arrived while it was stale
            if self._clock() - self._read_at >= self._ttl_s:
                self._packages = await _read_packages(self._storage)
                self._read_at = self._clock()
        return self._packages


async def _read_packages(storage: Storage) -> list[vote_service_pb2.VotePackage]:
    async with storage.pool.connection() as connection:
        cursor = await connection.execute(
            store.ACTIVE_PACKAGES)
        rows: list[dict[str, Any]] = await cursor.fetchall()
    return [
        vote_service_pb2.VotePackage(
            package_id=row["package_id"], display_name=row["display_name"],
            votes=row["votes"], bonus_votes=row["bonus_votes"],
            total_votes=row["votes"] + row["bonus_votes"],
            price=vote_types_pb2.Money(currency_code=row["currency_code"].strip(),
                                       amount_micros=row["price_micros"]),
            apple_product_id=row["apple_product_id"],
            google_product_id=row["google_product_id"])
        for row in rows
    ]
