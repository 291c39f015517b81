"""Redis keys shared across services, laid out so the same scripts run on Redis Cluster.

Every key that one vote touches carries the hash tag of the voter's shard, `{s<N>}`, so the
vote admission script's keys always share one cluster slot. What every vote needs to read (the
open round's window) is therefore mirrored into every shard: sync_svc writes SHARDS copies of
a round's window, vote_svc's admission script reads the copy in its voter's shard.

Times are milliseconds since the epoch by the Redis server's clock (`TIME`): the admission
script checks the window against that clock, so sync_svc stamps windows with it too.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

from runtime.storage import RedisClient

#: Shards of per-user state. Changing it moves users between slots: rebuild Redis after.
SHARDS = 64

#: Channel names as they appear in window fields (`close_<channel>_ms`).
CHANNELS = ("app", "web", "sms")


def shard_of(user_id: str) -> int:
    """The shard a user's admission state lives in."""
    return zlib.crc32(user_id.encode()) % SHARDS


def tag(shard: int) -> str:
    """The Redis Cluster hash tag of a shard."""
    return f"{{s{shard}}}"


def window_key(shard: int, round_id: str) -> str:
    """A round's window as seen by the voters of one shard (a Redis hash).

    Fields, all strings: episode_id; state (OPEN or CLOSED); opens_at_ms; closes_at_ms (the
    broadcast close); close_app_ms, close_web_ms, close_sms_ms (when each channel stops taking
    votes); contestants (comma-separated contestant ids); free_quota (free votes per user per
    episode); version (the episode version that wrote it).
    """
    return f"tv:{tag(shard)}:window:{round_id}"


def show_channel(episode_id: str) -> str:
    """Pub/sub channel of an episode's show events (sync_svc replicas fan out through it)."""
    return f"tv:show:{episode_id}"


async def server_time_ms(redis: RedisClient) -> int:
    """Now, by the Redis server's clock: the clock every window is judged by."""
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def write_window(redis: RedisClient, round_id: str, fields: Mapping[str, str | int]) -> None:
    """Mirror a round's window into every shard (the only writer is sync_svc)."""
    async with redis.pipeline(transaction=False) as pipe:
        for shard in range(SHARDS):
            pipe.hset(window_key(shard, round_id), mapping={k: v for k, v in fields.items()})
        await pipe.execute()


async def read_window(redis: RedisClient, round_id: str, shard: int = 0) -> dict[str, str]:
    """One shard's copy of a round's window (empty when the round was never opened)."""
    raw = await redis.hgetall(window_key(shard, round_id))
    return {_text(key): _text(value) for key, value in raw.items()}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
