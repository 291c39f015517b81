"""The control room of a simulated show, through the edge like a real operator.

A show with one episode, its contestants and one round whose window is the compressed
window; paid voters funded with WalletAdminService.GrantVotes (PurchaseVotePackage answers
UNIMPLEMENTED until store receipts are verified, so an operator grant stands in for a
purchase); voting opened with a VOTING_OPEN cue so sync_svc runs the countdown and closes the
round by itself; performance cues during a shownight; then the final result that results_svc
publishes after the close.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import psycopg
from google.protobuf.duration_pb2 import Duration

from ops import tokens
from runtime.access import Role
from televote.sms.v1 import carrier_service_pb2 as carrier_pb2
from televote.sms.v1 import short_code_service_pb2 as short_code_pb2
from televote.sms.v1 import short_code_service_pb2_grpc as short_code_grpc
from televote.sync.v1 import show_control_service_pb2 as control
from televote.sync.v1 import show_control_service_pb2_grpc as control_grpc
from televote.sync.v1 import sync_types_pb2 as sync_types
from televote.vote.v1 import wallet_admin_service_pb2 as wallet
from televote.vote.v1 import wallet_admin_service_pb2_grpc as wallet_grpc

OPERATOR = "loadtest-producer"


def _duration(seconds: float) -> Duration:
    duration = Duration()
    duration.FromMilliseconds(round(seconds * 1000))
    return duration


@dataclass
class Round:
    episode_id: str
    round_id: str
    contestant_ids: list[str]
    #: Wall-clock epoch seconds of the round's open and close, by the server's clock.
    opens_at: float = 0.0
    closes_at: float = 0.0


class ControlRoom:
    """ShowControlService and WalletAdminService calls with an operator token."""

    def __init__(self, edge_target: str, state_dir: Path) -> None:
        self._channel = grpc.aio.insecure_channel(edge_target)
        self._control = control_grpc.ShowControlServiceStub(self._channel)
        self._wallet = wallet_grpc.WalletAdminServiceStub(self._channel)
        self._short_codes = short_code_grpc.ShortCodeServiceStub(self._channel)
        self._metadata = (("authorization",
                           f"Bearer {tokens.mint(state_dir, Role.OPERATOR, OPERATOR)}"),)

    async def close(self) -> None:
        await self._channel.close(None)

    async def _call(self, method: str, **fields: Any) -> Any:
        request = getattr(control, f"{method}Request")(request_id=str(uuid.uuid4()), **fields)
        return await getattr(self._control, method)(request, metadata=self._metadata,
                                                    timeout=30)

    async def prepare(self, run_id: str, contestants: int, free_quota: int,
                      window_s: float) -> Round:
        """A LIVE episode with a PENDING round of `contestants` contestants."""
        show = (await self._call("CreateShow", name=f"Load test {run_id}")).show
        episode = (await self._call("CreateEpisode", show_id=show.show_id,
                                    title=f"Show night {run_id}",
                                    free_vote_quota=free_quota)).episode
        contestant_ids = [
            (await self._call("AddContestant", episode_id=episode.episode_id,
                              name=f"Singer {number}", sms_number=number)).contestant.contestant_id
            for number in range(1, contestants + 1)]
        voting_round = (await self._call(
            "CreateRound", episode_id=episode.episode_id, name="Final vote",
            contestant_ids=contestant_ids, window_duration=_duration(window_s),
            visibility=sync_types.RESULTS_VISIBILITY_PUBLIC_COUNTS)).round
        await self.cue(episode.episode_id, control.CUE_TYPE_SHOW_START)
        for carrier in (carrier_pb2.CARRIER_SMART, carrier_pb2.CARRIER_CELLCARD,
                        carrier_pb2.CARRIER_METFONE):  # premium SMS votes for this show
            await self._short_codes.BindShortCode(short_code_pb2.BindShortCodeRequest(
                request_id=str(uuid.uuid4()), carrier=carrier, short_code="1255",
                show_id=show.show_id), metadata=self._metadata, timeout=30)
        return Round(episode.episode_id, voting_round.round_id, contestant_ids)

    async def cue(self, episode_id: str, cue: int, **fields: Any) -> control.ApplyCueResponse:
        reply: control.ApplyCueResponse = await self._call(
            "ApplyCue", episode_id=episode_id, type=cue, **fields)
        return reply

    async def grant(self, grants: dict[str, int], run_id: str, concurrency: int = 64) -> None:
        """Fund every paid voter with exactly the paid votes they will cast."""
        gate = asyncio.Semaphore(concurrency)

        async def one(user: str, count: int) -> None:
            async with gate:
                await self._wallet.GrantVotes(wallet.GrantVotesRequest(
                    request_id=str(uuid.uuid4()), user_id=user, count=count,
                    reason=f"loadtest {run_id}: paid votes (stands in for PurchaseVotePackage)"),
                    metadata=self._metadata, timeout=30)

        await asyncio.gather(*(one(user, count) for user, count in grants.items()))

    async def open_voting(self, voting_round: Round, window_s: float) -> None:
        snapshot = (await self.cue(voting_round.episode_id, control.CUE_TYPE_VOTING_OPEN,
                                   round_id=voting_round.round_id,
                                   voting_duration=_duration(window_s))).snapshot
        current = snapshot.current_round
        voting_round.opens_at = current.opens_at.ToMilliseconds() / 1000
        voting_round.closes_at = current.closes_at.ToMilliseconds() / 1000

    async def performances(self, voting_round: Round, start_at: float,
                           schedule: list[tuple[int, float, float]]) -> None:
        """Performance start/end cues at their moments (what the bursts follow)."""
        for number, starts, ends in schedule:
            contestant = voting_round.contestant_ids[(number - 1) %
                                                     len(voting_round.contestant_ids)]
            await asyncio.sleep(max(0.0, start_at + starts - time.time()))
            await self.cue(voting_round.episode_id, control.CUE_TYPE_PERFORMANCE_START,
                           contestant_id=contestant, song_title=f"Song {number}")
            await asyncio.sleep(max(0.0, start_at + ends - time.time()))
            await self.cue(voting_round.episode_id, control.CUE_TYPE_PERFORMANCE_END)

    async def end_show(self, episode_id: str) -> None:
        await self.cue(episode_id, control.CUE_TYPE_SHOW_END)


async def wait_final(database_url: str, round_id: str, timeout: float = 120.0) -> datetime:
    """Wait until results_svc has stored the round's final result; returns when it did."""
    deadline = time.monotonic() + timeout
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as db:
        while time.monotonic() < deadline:
            cursor = await db.execute(
                "SELECT finalized_at FROM round_results WHERE round_id = %s", (round_id,))
            row = await cursor.fetchone()
            if row is not None:
                finalized: datetime = row[0]
                return finalized
            await asyncio.sleep(0.5)
    raise TimeoutError(f"no final result for round {round_id} after {timeout:.0f}s")
