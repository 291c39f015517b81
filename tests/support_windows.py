"""Voting windows for vote tests, made the way show sync makes them, without sync_svc.

Vote tests that need a round open at a chosen moment, with chosen offsets, create the
PostgreSQL rows (show, episode, contestants, an OPEN round) and mirror the window into Redis
as sync_svc does (`runtime.window`), stamped by the Redis server clock.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import psycopg

from runtime import keys, window
from runtime.storage import create_redis


@dataclass
class TestRound:
    """What a test needs to vote in a round."""

    __test__ = False  # not a pytest test class

    show_id: str
    episode_id: str
    round_id: str
    contestants: list[str]
    opens_at_ms: int
    closes_at_ms: int
    offsets: dict[str, int] = field(default_factory=dict)


async def open_test_round(database_url: str, redis_url: str, *, opens_in_ms: int = -1000,
                          duration_ms: int = 600_000, free_quota: int = 5,
                          contestants: int = 3, offsets: dict[str, int] | None = None,
                          rate_limit: int = 100, free_cap: int = 0,
                          receive_lag_ms: int = 1000) -> TestRound:
    """An episode with `contestants` contestants and one OPEN round, mirrored into Redis."""
    offsets = {channel: (offsets or {}).get(channel, 0) for channel in keys.CHANNELS}
    redis = create_redis(redis_url)
    try:
        now = await keys.server_time_ms(redis)
        show_id, episode_id, round_id = (str(uuid.uuid4()) for _ in range(3))
        contestant_ids = [str(uuid.uuid4()) for _ in range(contestants)]
        opens, closes = now + opens_in_ms, now + opens_in_ms + duration_ms
        async with await psycopg.AsyncConnection.connect(database_url) as connection:
            await connection.execute("INSERT INTO shows (show_id, name) VALUES (%s, 'Test')",
                                     (show_id,))
            await connection.execute(
                "INSERT INTO episodes (episode_id, show_id, title, state, free_vote_quota,"
                " rate_limit_per_minute) VALUES (%s, %s, 'Test episode', 'LIVE', %s, %s)",
                (episode_id, show_id, free_quota, rate_limit))
            for number, contestant in enumerate(contestant_ids, start=1):
                await connection.execute(
                    "INSERT INTO contestants (contestant_id, episode_id, name, sms_number)"
                    " VALUES (%s, %s, %s, %s)", (contestant, episode_id, f"C{number}", number))
            await connection.execute(
                "INSERT INTO rounds (round_id, episode_id, name, contestant_ids, window_ms,"
                "  free_vote_cap, visibility, app_close_offset_ms, web_close_offset_ms,"
                "  sms_close_offset_ms, state, opens_at, closes_at, lines_close_at,"
                "  receive_lag_ms)"
                " VALUES (%s, %s, 'Round', %s::uuid[], %s, %s, 'RESULTS_VISIBILITY_PUBLIC_COUNTS',"
                "  %s, %s, %s, 'OPEN', to_timestamp(%s / 1000.0), to_timestamp(%s / 1000.0),"
                "  to_timestamp(%s / 1000.0), %s)",
                (round_id, episode_id, contestant_ids, duration_ms, free_cap, offsets["app"],
                 offsets["web"], offsets["sms"], opens, closes,
                 closes + max(offsets.values()), receive_lag_ms))
        await window.write(redis, round_id, window.Window(
            episode_id=episode_id, state="OPEN", opens_at_ms=opens, closes_at_ms=closes,
            close_ms={channel: closes + offsets[channel] for channel in keys.CHANNELS},
            contestants=tuple(contestant_ids), free_quota=free_quota, free_cap=free_cap,
            rate_limit_per_minute=rate_limit, version=1, receive_lag_ms=receive_lag_ms))
        return TestRound(show_id, episode_id, round_id, contestant_ids, opens, closes, offsets)
    finally:
        await redis.aclose()


async def close_test_round(database_url: str, redis_url: str, test_round: TestRound) -> int:
    """Close the round now (what CloseVoting does); returns the close time (Redis clock)."""
    redis = create_redis(redis_url)
    try:
        # Redis first, as sync_svc does: the recorded close follows every admitted vote.
        now = await keys.close_window(redis, test_round.round_id)
        async with await psycopg.AsyncConnection.connect(database_url) as connection:
            await connection.execute(
                "UPDATE rounds SET state = 'CLOSED', closed_at = to_timestamp(%s / 1000.0),"
                " closes_at = to_timestamp(%s / 1000.0), close_cause = 'test'"
                " WHERE round_id = %s", (now, now, test_round.round_id))
        await keys.write_window(redis, test_round.round_id, window.closed_fields(now))
        return now
    finally:
        await redis.aclose()
