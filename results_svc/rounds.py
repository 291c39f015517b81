"""Reading rounds, their contestants and their rules from PostgreSQL."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import grpc

from results_svc.rules import RoundRules
from runtime.errors import ApiError
from televote.sync.v1 import sync_types_pb2 as stypes

_MS = "floor(extract(epoch FROM {}) * 1000)::bigint"

ROUND_SQL = f"""
SELECT r.round_id::text, r.episode_id::text, r.name, r.contestant_ids::text[] AS contestant_ids,
       r.free_vote_cap, r.visibility, r.state, r.closes_at, e.free_vote_quota,
       e.state AS episode_state,
       {_MS.format("r.opens_at")} AS opens_ms, {_MS.format("r.closes_at")} AS closes_ms,
       {_MS.format("r.closed_at")} AS closed_ms, {_MS.format("r.lines_close_at")} AS lines_ms,
       r.app_close_offset_ms, r.web_close_offset_ms, r.sms_close_offset_ms
  FROM rounds r JOIN episodes e USING (episode_id)
 WHERE r.round_id = %s
"""

CONTESTANTS_SQL = """
SELECT contestant_id::text, name, photo_url, sms_number FROM contestants
 WHERE contestant_id = ANY(%s::uuid[])
"""


@dataclass(frozen=True)
class Contestant:
    contestant_id: str
    name: str
    photo_url: str
    sms_number: int


@dataclass(frozen=True)
class RoundInfo:
    round_id: str
    episode_id: str
    name: str
    state: str
    visibility: int
    episode_ended: bool
    contestants: tuple[Contestant, ...]
    free_quota: int
    free_cap: int
    opens_ms: int | None
    closes_ms: int | None
    closed_ms: int | None
    offsets_ms: dict[str, int]
    closes_at: datetime | None

    @property
    def contestant_ids(self) -> tuple[str, ...]:
        return tuple(c.contestant_id for c in self.contestants)

    @property
    def state_enum(self) -> int:
        return stypes.RoundState.Value(f"ROUND_STATE_{self.state}")

    def channel_close_ms(self, channel: str) -> int:
        """The first ms at which `channel` ("APP", "WEB", "SMS") took no more votes."""
        assert self.closes_ms is not None
        close = self.closes_ms + self.offsets_ms[channel]
        if self.closed_ms is not None:
            close = min(close, self.closed_ms)
        return close

    def rules(self) -> RoundRules:
        assert self.opens_ms is not None
        return RoundRules(self.round_id, self.contestant_ids, self.opens_ms,
                          {c: self.channel_close_ms(c) for c in ("APP", "WEB", "SMS")},
                          self.free_quota, self.free_cap)


def round_not_found(round_id: str) -> ApiError:
    return ApiError(grpc.StatusCode.NOT_FOUND, "ROUND_NOT_FOUND", f"no round {round_id}")


def _visibility(text: str) -> int:
    try:
        return stypes.ResultsVisibility.Value(text)
    except ValueError:
        # Unknown or unset: the safe reading (CreateRound treats unset as HIDDEN too).
        return stypes.RESULTS_VISIBILITY_HIDDEN


async def load_round(connection: Any, round_id: str) -> RoundInfo | None:
    cursor = await connection.execute(ROUND_SQL, (round_id,))
    row = await cursor.fetchone()
    if row is None:
        return None
    cursor = await connection.execute(CONTESTANTS_SQL, (row["contestant_ids"],))
    by_id = {r["contestant_id"]: r for r in await cursor.fetchall()}
    contestants = tuple(
        Contestant(c, by_id[c]["name"], by_id[c]["photo_url"], by_id[c]["sms_number"])
        if c in by_id else Contestant(c, "", "", 0) for c in row["contestant_ids"])
    return RoundInfo(
        round_id=row["round_id"], episode_id=row["episode_id"], name=row["name"],
        state=row["state"], visibility=_visibility(row["visibility"]),
        episode_ended=row["episode_state"] == "ENDED", contestants=contestants,
        free_quota=row["free_vote_quota"], free_cap=row["free_vote_cap"],
        opens_ms=row["opens_ms"], closes_ms=row["closes_ms"], closed_ms=row["closed_ms"],
        offsets_ms={"APP": row["app_close_offset_ms"], "WEB": row["web_close_offset_ms"],
                    "SMS": row["sms_close_offset_ms"]},
        closes_at=row["closes_at"])
