"""A round's voting window: the one agreement between sync_svc (which writes it to Redis) and
vote_svc's admission script (which reads it on every vote).

The Redis layout (one hash per shard, `runtime.keys.window_key`) and its write rules
(`keys.write_window`) stay in keys.py; this is the typed content of the hash, built from the
PostgreSQL rows the same way by every writer (sync_svc on each change and repair, vote_svc when
Redis lost it, the tests).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from runtime import keys
from runtime.protoconv import datetime_to_ms
from runtime.storage import RedisClient


@dataclass(frozen=True)
class Window:
    """The fields of `keys.window_key`'s hash, typed (times: epoch ms, Redis clock)."""

    episode_id: str
    state: str  # OPEN or CLOSED
    opens_at_ms: int
    closes_at_ms: int  # the broadcast close
    close_ms: Mapping[str, int]  # per channel in keys.CHANNELS: when it stops taking votes
    contestants: tuple[str, ...]
    free_quota: int
    free_cap: int
    rate_limit_per_minute: int
    version: int  # the episode version it was read at (`keys.write_window` orders by it)
    #: How long after the edge received a vote it may still be admitted as received then
    #: (migrations/0018; `results_svc.rules.judged_ms`).
    receive_lag_ms: int = 0

    @classmethod
    def of_round(cls, round_row: Mapping[str, Any], episode: Mapping[str, Any]) -> Window:
        """The window of a round as PostgreSQL has it (`rounds` and `episodes` columns)."""
        closes_ms = _ms(round_row["closes_at"])
        close_ms = {}
        for channel in keys.CHANNELS:
            close = closes_ms + int(round_row[f"{channel}_close_offset_ms"])
            if round_row["state"] != "OPEN":
                # A closed round is closed on every channel from the moment it closed.
                close = min(close, _ms(round_row["closed_at"]))
            close_ms[channel] = close
        return cls(
            episode_id=str(round_row["episode_id"]), state=str(round_row["state"]),
            opens_at_ms=_ms(round_row["opens_at"]), closes_at_ms=closes_ms, close_ms=close_ms,
            contestants=tuple(str(c) for c in round_row["contestant_ids"]),
            free_quota=int(episode["free_vote_quota"]), free_cap=int(round_row["free_vote_cap"]),
            rate_limit_per_minute=int(episode["rate_limit_per_minute"]),
            version=int(episode["version"]),
            receive_lag_ms=int(round_row.get("receive_lag_ms", 0)))

    @classmethod
    def from_fields(cls, fields: Mapping[str, str]) -> Window:
        """A window read back from Redis (`keys.read_window`)."""
        return cls(
            episode_id=fields["episode_id"], state=fields["state"],
            opens_at_ms=int(fields["opens_at_ms"]), closes_at_ms=int(fields["closes_at_ms"]),
            close_ms={c: int(fields[f"close_{c}_ms"]) for c in keys.CHANNELS},
            contestants=tuple(filter(None, fields.get("contestants", "").split(","))),
            free_quota=int(fields.get("free_quota", 0)), free_cap=int(fields.get("free_cap", 0)),
            rate_limit_per_minute=int(fields.get("rate_limit_per_minute", 0)),
            version=int(fields.get("version", 0)),
            receive_lag_ms=int(fields.get("receive_lag_ms", 0)))

    def fields(self) -> dict[str, str | int]:
        """The hash fields as the admission script reads them."""
        fields: dict[str, str | int] = {
            "episode_id": self.episode_id, "state": self.state, "opens_at_ms": self.opens_at_ms,
            "closes_at_ms": self.closes_at_ms, "contestants": ",".join(self.contestants),
            "free_quota": self.free_quota, "free_cap": self.free_cap,
            "rate_limit_per_minute": self.rate_limit_per_minute, "version": self.version,
            "receive_lag_ms": self.receive_lag_ms}
        for channel in keys.CHANNELS:
            fields[f"close_{channel}_ms"] = self.close_ms[channel]
        return fields


def closed_fields(closed_ms: int) -> dict[str, str | int]:
    """The fields a close changes (what `keys.close_window` leaves, plus the broadcast close)."""
    fields: dict[str, str | int] = {"state": "CLOSED", "closes_at_ms": closed_ms}
    fields.update({f"close_{channel}_ms": closed_ms for channel in keys.CHANNELS})
    return fields


async def write(redis: RedisClient, round_id: str, window: Window) -> int:
    """Mirror `window` into every shard (`keys.write_window`'s ordering rules apply)."""
    return await keys.write_window(redis, round_id, window.fields())


async def read(redis: RedisClient, round_id: str, shard: int = 0) -> Window | None:
    """One shard's copy, or None when the round was never opened there."""
    fields = await keys.read_window(redis, round_id, shard)
    return Window.from_fields(fields) if "episode_id" in fields else None


def _ms(value: datetime | int) -> int:
    return value if isinstance(value, int) else datetime_to_ms(value)
