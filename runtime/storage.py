"""The one way a service talks to PostgreSQL and Redis.

Both clients are built without connecting, handed to servicers through their constructors,
and connected by `Storage.connect()` before the service reports SERVING.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster

from runtime.config import ServiceConfig

log = logging.getLogger(__name__)

Params = Sequence[Any] | Mapping[str, Any]

RedisClient = Redis | RedisCluster


def create_pool(url: str, min_size: int = 1, max_size: int = 10, *,
                generic_plans: bool = False, autocommit: bool = False) -> AsyncConnectionPool[
        AsyncConnection[dict[str, object]]]:
    """An unopened async pool whose connections return rows as dicts (see
    ServiceConfig.database_generic_plans for `generic_plans`, database_autocommit for
    `autocommit`)."""
    kwargs: dict[str, Any] = {"row_factory": dict_row, "autocommit": autocommit}
    if generic_plans:
        kwargs["options"] = "-c plan_cache_mode=force_generic_plan"
    return AsyncConnectionPool(
        url, min_size=min_size, max_size=max_size, open=False, kwargs=kwargs, name="televote")


def create_redis(url: str, cluster: bool = False, max_connections: int = 200) -> RedisClient:
    """A Redis client for a single server or a cluster; hiredis parses replies when installed.

    The pool blocks when all its connections are busy: at the close-of-lines peak a burst of
    requests waits a moment for a connection instead of failing (redis-py's default pool
    raises MaxConnectionsError past 100).
    """
    if cluster:
        return RedisCluster.from_url(url, decode_responses=False,
                                     max_connections=max_connections)
    pool = BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=5,
                                           health_check_interval=30)
    return Redis(connection_pool=pool)


async def fetch_one(connection: AsyncConnection[Any], query: str, params: Params | None = None,
                    *, prepare: bool | None = None) -> dict[str, Any] | None:
    """The first row `query` returns (a dict, as the pool's connections give rows), None if it
    returns none."""
    cursor = await connection.execute(query, params, prepare=prepare)
    row: dict[str, Any] | None = await cursor.fetchone()
    return row


@dataclass
class Storage:
    """PostgreSQL pool and Redis client of one service process."""

    pool: AsyncConnectionPool[AsyncConnection[dict[str, object]]]
    redis: RedisClient

    @classmethod
    def from_config(cls, config: ServiceConfig) -> Storage:
        return cls(
            pool=create_pool(config.database_url, config.database_pool_min,
                             config.database_pool_max,
                             generic_plans=config.database_generic_plans,
                             autocommit=config.database_autocommit),
            redis=create_redis(config.redis_url, config.redis_cluster,
                               config.redis_max_connections),
        )

    async def connect(self, timeout: float = 30.0) -> None:
        """Open the pool and reach Redis; raises if either is unreachable within `timeout`."""
        await self.pool.open(wait=True, timeout=timeout)
        await self.redis.ping()
        log.info("storage connected")

    async def close(self) -> None:
        await self.pool.close()
        await self.redis.aclose()
