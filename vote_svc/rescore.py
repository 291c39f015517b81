"""Score the votes that were admitted UNSCORED once fraud scoring is back.

While fraud_svc is unreachable, vote_svc admits votes as UNSCORED (fail open, vote_svc/fraud.py)
so that voting does not stop. This task scores them afterwards through the same
FraudScoringService.ScoreVotes, as `internal/vote_svc`, with the facts the ledger kept (the
vote's request id as `ref`, its admission time as `server_time`), so fraud_svc records the
decision exactly as it does for a live vote: BLOCK and REVIEW audited (`fraud.score`), a
REVIEW queued for operators, a user over the block threshold flagged.

The ledger is append-only, so the outcome goes to `vote_fraud_decisions` (one row per vote,
migrations/0006_vote_fraud_decisions.sql). A live BLOCK refuses the vote; a vote already in
the ledger cannot be refused any more, so a BLOCK is carried out by fraud_svc
(FraudScoringService.RejectLedgerVotes: a rejection of that vote, audited), under the round's
finalization lock and only while the round has no final result: the final result's
FRAUD_REJECTED rule then leaves it out, and a published result never changes. A REVIEW is
resolved by operators like any other.

One replica at a time: each batch runs in a transaction holding an advisory lock, and the
decisions are keyed by vote id, so a batch re-scored after a crash changes nothing. The
rejections are asked for before the decisions are recorded: a crash in between leaves a
rejection whose vote is scored again on the next pass (a rejection is idempotent and stays).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc

from runtime import locks
from runtime.protoconv import channel_enum
from runtime.storage import Storage
from televote.fraud.v1 import fraud_scoring_service_pb2 as scoring_pb
from televote.fraud.v1 import fraud_scoring_service_pb2_grpc, fraud_types_pb2
from vote_svc import store
from vote_svc.fraud import SCORING_METADATA

log = logging.getLogger(__name__)

_LOCK = "televote.vote.rescore"
_ACTIONS = {fraud_types_pb2.FRAUD_ACTION_ALLOW: "ALLOW",
            fraud_types_pb2.FRAUD_ACTION_REVIEW: "REVIEW",
            fraud_types_pb2.FRAUD_ACTION_BLOCK: "BLOCK"}


class Rescorer:
    """Scores UNSCORED ledger votes in batches while fraud_svc answers."""

    def __init__(self, storage: Storage, channel: grpc.aio.Channel, *, interval_ms: float,
                 batch: int, timeout_ms: float, replica: str) -> None:
        self._storage = storage
        self._stub = fraud_scoring_service_pb2_grpc.FraudScoringServiceStub(channel)
        self._interval = interval_ms / 1000
        self._batch = batch
        self._timeout = timeout_ms / 1000
        self._actor = f"vote_svc/{replica}"

    async def run(self) -> None:
        """Re-score for the life of the process; a full batch is followed at once."""
        while True:
            try:
                while await self.pass_once() >= self._batch:
                    pass
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as error:
                log.info("re-scoring waits for fraud scoring (%s)", error.code().name)
            except Exception as error:  # PostgreSQL away: the next pass retries
                log.warning("re-scoring pass failed: %r", error)
            await asyncio.sleep(self._interval)

    async def pass_once(self) -> int:
        """Score one batch; returns the votes decided (0: none left, or another replica's
        turn). Raises what scoring raised (nothing is recorded then)."""
        async with self._storage.pool.connection() as connection, connection.transaction():
            if not await locks.try_singleton(connection, _LOCK):
                return 0
            cursor = await connection.execute(store.UNSCORED_VOTES, (self._batch,))
            votes: list[dict[str, Any]] = await cursor.fetchall()
            if not votes:
                return 0
            reply = await self._stub.ScoreVotes(
                scoring_pb.ScoreVotesRequest(votes=[_facts(v) for v in votes]),
                metadata=SCORING_METADATA, timeout=self._timeout)
            if len(reply.scores) != len(votes):
                raise ValueError(f"{len(reply.scores)} scores for {len(votes)} votes")
            scores = list(reply.scores)
            actions = [_ACTIONS.get(score.action, "ALLOW") for score in scores]
            blocked = [scoring_pb.LedgerVoteBlock(
                vote_id=vote["vote_id"], ref=vote["request_id"], user_id=vote["user_id"],
                round_id=vote["round_id"], score=score)
                for vote, score, action in zip(votes, scores, actions, strict=True)
                if action == "BLOCK"]
            finalized: set[str] = set()
            rejected = 0
            if blocked:
                # fraud_svc decides under each round's finalization lock which were final.
                rejection = await self._stub.RejectLedgerVotes(
                    scoring_pb.RejectLedgerVotesRequest(votes=blocked, rescored_by=self._actor),
                    metadata=SCORING_METADATA, timeout=self._timeout)
                finalized.update(rejection.finalized_round_ids)
                rejected = rejection.rejected
            blocked_rounds = {block.round_id for block in blocked}
            cursor = await connection.execute(
                store.FINALIZED_ROUNDS,
                (sorted({v["round_id"] for v in votes} - blocked_rounds),))
            finalized_rows: list[dict[str, Any]] = await cursor.fetchall()
            finalized.update(str(row["round_id"]) for row in finalized_rows)
            cursor = await connection.execute(store.INSERT_DECISIONS, (
                [v["vote_id"] for v in votes], [v["user_id"] for v in votes],
                [v["request_id"] for v in votes], [v["round_id"] for v in votes], actions,
                [s.score for s in scores], [s.decision_id for s in scores],
                [v["round_id"] in finalized for v in votes], [self._actor] * len(votes)))
            recorded_rows: list[dict[str, Any]] = await cursor.fetchall()
            recorded = {str(row["vote_id"]) for row in recorded_rows}
        log.info("re-scored unscored votes", extra={"fields": {
            "votes": len(votes), "recorded": len(recorded), "rejected": rejected,
            "finalized_rounds": sorted(finalized)}})
        return len(votes)


def _facts(vote: dict[str, Any]) -> scoring_pb.VoteFacts:
    facts = scoring_pb.VoteFacts(
        ref=vote["request_id"], user_id=vote["user_id"], device_id=vote["device_id"],
        ip_hash=vote["ip_hash"], channel=channel_enum(vote["channel"]),
        round_id=vote["round_id"], contestant_id=vote["contestant_id"], count=vote["count"],
        app_version=vote["app_version"])
    if vote["latitude"] is not None and vote["longitude"] is not None:
        facts.location.latitude = vote["latitude"]
        facts.location.longitude = vote["longitude"]
    facts.server_time.FromMilliseconds(vote["admitted_ms"])
    return facts
