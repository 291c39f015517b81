"""Reading rounds, their contestants and their rules from PostgreSQL."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import grpc

from results_svc import store
from results_svc.rules import RoundRules
from runtime.errors import ApiError
from runtime.storage import fetch_one
from televote.sync.v1 import sync_types_pb2 as stypes


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
    receive_lag_ms: int = 0

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
                          self.free_quota, self.free_cap, self.receive_lag_ms)


def round_not_found(round_id: str) -> ApiError:
    return ApiError(grpc.StatusCode.NOT_FOUND, "ROUND_NOT_FOUND", f"no round {round_id}")


def _visibility(text: str) -> int:
    try:
        return stypes.ResultsVisibility.Value(text)
    except ValueError:
        # Unknown or unset: the safe reading (CreateRound treats unset as HIDDEN too).
        return stypes.RESULTS_VISIBILITY_HIDDEN


async def load_round(connection: Any, round_id: str) -> RoundInfo | None:
    row = await fetch_one(connection, store.ROUND_SQL, (round_id,))
    if row is None:
        return None
    cursor = await connection.execute(store.CONTESTANTS_SQL, (row["contestant_ids"],))
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
        closes_at=row["closes_at"], receive_lag_ms=row["receive_lag_ms"])
