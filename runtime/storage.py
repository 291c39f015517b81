"""The one way a service talks to PostgreSQL and Redis.

Both clients are built without connecting, handed to servicers through their constructors,
and connected by `Storage.connect()` before the service reports SERVING.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
import redis.exceptions
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.exceptions import NoScriptError

from runtime.config import ServiceConfig

log = logging.getLogger(__name__)

Params = Sequence[Any] | Mapping[str, Any]

RedisClient = Redis | RedisCluster
T = TypeVar("T")

#: PostgreSQL or Redis is away or overwhelmed (unreachable, the connection lost, no pooled
#: connection in time, a failover): a retry may succeed. Not a wrong statement or a refused
#: constraint, which a retry would repeat.
OUTAGES: tuple[type[BaseException], ...] = (
    psycopg.OperationalError, psycopg.InterfaceError, redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError, redis.exceptions.ClusterError, redis.exceptions.TryAgainError,
    ConnectionError, TimeoutError)


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


#: The query parameter by which a Redis URL says it names a seed node of a Redis Cluster
#: (`redis://user:password@host:port/0?cluster=yes`): what `televote up --redis-cluster N`
#: hands out, so that every client made from the URL (services, tests, tools) is a cluster
#: client. REDIS_CLUSTER=true says the same for a URL without it.
CLUSTER_PARAMETER = "cluster"


def cluster_url(url: str) -> str:
    """`url`, marked as naming a Redis Cluster."""
    parts = urlsplit(url)
    query = [(name, value) for name, value in parse_qsl(parts.query)
             if name != CLUSTER_PARAMETER] + [(CLUSTER_PARAMETER, "yes")]
    return urlunsplit(parts._replace(query=urlencode(query)))


def redis_target(url: str) -> tuple[str, bool]:
    """The URL redis-py understands and whether it names a cluster (`CLUSTER_PARAMETER`)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query)
    cluster = any(name == CLUSTER_PARAMETER and value.lower() in ("1", "yes", "true")
                  for name, value in query)
    rest = [(name, value) for name, value in query if name != CLUSTER_PARAMETER]
    return urlunsplit(parts._replace(query=urlencode(rest))), cluster


def create_redis(url: str, cluster: bool = False, max_connections: int = 200) -> RedisClient:
    """A Redis client for a single server or a cluster (`cluster`, or a URL that says so:
    `CLUSTER_PARAMETER`); hiredis parses replies when installed.

    The pool blocks when all its connections are busy: at the close-of-lines peak a burst of
    requests waits a moment for a connection instead of failing (redis-py's default pool
    raises MaxConnectionsError past 100).
    """
    url, marked = redis_target(url)
    if cluster or marked:
        return RedisCluster.from_url(url, decode_responses=False,
                                     max_connections=max_connections)
    pool = BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=5,
                                           health_check_interval=30)
    return Redis(connection_pool=pool)


#: One Lua script call: a redis-py Script (its `sha` and `script`), its keys and its args.
ScriptCall = tuple[Any, Sequence[str], Sequence[str | int]]


async def run_scripts(redis: RedisClient, calls: Sequence[ScriptCall]) -> list[Any]:
    """Run script calls as one pipeline of EVALSHAs (on a cluster, one per node it touches):
    each call's reply, or the error Redis answered it with.

    redis-py's pipelined Script loads scripts before a single Redis's pipeline but not a
    cluster's, and no node knows a script after a restart or a failover to a replica that
    never saw it loaded: calls answered NOSCRIPT are run again, alone, once their scripts
    are loaded (never the others: a script call is not always safe to repeat)."""
    async def pipeline(batch: Sequence[ScriptCall]) -> list[Any]:
        async with redis.pipeline(transaction=False) as pipe:
            for script, keys, args in batch:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            return list(await pipe.execute(raise_on_error=False))

    return await retry_unknown_scripts(redis, [call[0] for call in calls], calls, pipeline)


async def retry_unknown_scripts(redis: RedisClient, scripts: Sequence[Any], batch: Sequence[T],
                                run: Callable[[Sequence[T]], Awaitable[list[Any]]]
                                ) -> list[Any]:
    """`run(batch)`'s replies, where the calls answered NOSCRIPT (`scripts[i]` is the script
    of `batch[i]`) are run a second time, by themselves, after loading their scripts."""
    replies = list(await run(batch))
    unknown = [index for index, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
    if not unknown:
        return replies
    for script in {id(scripts[index]): scripts[index] for index in unknown}.values():
        script.sha = await redis.script_load(script.script)
    for index, reply in zip(unknown, await run([batch[index] for index in unknown]),
                            strict=True):
        replies[index] = reply
    return replies


def raise_first_error(replies: Sequence[Any]) -> list[Any]:
    """`replies`, unless one of them is an error: then that error is raised."""
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return list(replies)


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
            redis=create_redis(config.redis_url, config.on_redis_cluster,
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
