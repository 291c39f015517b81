"""The package catalogue is read once per TTL and shared by everyone who asks meanwhile."""

from __future__ import annotations

import asyncio

import psycopg

from ops.stack import Stack
from runtime.storage import Storage, create_pool, create_redis
from vote_svc.packages import PackageCatalogue


async def _rename(database_url: str, package_id: str, name: str) -> None:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as db:
        await db.execute("UPDATE vote_packages SET display_name = %s WHERE package_id = %s",
                         (name, package_id))


async def test_catalogue_is_cached_for_its_ttl_then_reread(stack: Stack) -> None:
    storage = Storage(pool=create_pool(stack.database_url), redis=create_redis(stack.redis_url))
    await storage.connect()
    now = [1000.0]
    catalogue = PackageCatalogue(storage, ttl_s=10, clock=lambda: now[0])
    try:
        first = await catalogue.packages()
        assert [p.total_votes for p in first] == [10, 60, 250, 1200]
        package = first[0]
        await _rename(stack.database_url, package.package_id, "Renamed")
        try:
            together = await asyncio.gather(*(catalogue.packages() for _ in range(20)))
            assert all(p[0].display_name == package.display_name for p in together)
            now[0] += 9.5
            assert (await catalogue.packages())[0].display_name == package.display_name
            now[0] += 0.5
            assert (await catalogue.packages())[0].display_name == "Renamed"
        finally:
            await _rename(stack.database_url, package.package_id, package.display_name)
    finally:
        await storage.close()
