"""Score the votes that were admitted UNSCORED once fraud scoring is back.

While fraud_svc is unreachable, vote_svc admits votes as UNSCORED (fail open, vote_svc/fraud.py)
so that voting does not stop. This task scores them afterwards through the same
FraudScoringService.ScoreVotes, as `internal/vote_svc`, with the facts the ledger kept (the
vote's request id as `ref`, its admission time as `server_time`), so fraud_svc records the
decision exactly as it does for a live vote: BLOCK and REVIEW audited (`fraud.score`), a
REVIEW queued for operators, a user over the block threshold flagged.

The ledger is append-only, so the outcome goes to `vote_fraud_decisions` (one row per vote,
migrations/0006_vote_fraud_decisions.sql). A live BLOCK refuses the vote; a vote already in
the ledger cannot be refused any more, so a BLOCK is carried out as a `fraud_rejections` row
for that vote (with an automatically REJECTED review as its reason and an audit entry
`fraud.rescore.reject`): the final result's FRAUD_REJECTED rule then leaves it out. A REVIEW
is resolved by operators like any other (a rejection lands in `fraud_rejections` too).

One replica at a time: each batch runs in a transaction holding an advisory lock, and the
decisions are keyed by vote id, so a batch re-scored after a crash changes nothing. A
rejection is written under the round's finalization lock (the one results_svc takes) and only
while the round has no final result: a published result never changes.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import grpc
from psycopg.types.json import Jsonb

from runtime.storage import Storage
from televote.fraud.v1 import (
    fraud_scoring_service_pb2,
    fraud_scoring_service_pb2_grpc,
    fraud_types_pb2,
)
from televote.vote.v1 import vote_types_pb2
from vote_svc.fraud import SCORING_METADATA

log = logging.getLogger(__name__)

_LOCK = "televote.vote.rescore"
_ACTIONS = {fraud_types_pb2.FRAUD_ACTION_ALLOW: "ALLOW",
            fraud_types_pb2.FRAUD_ACTION_REVIEW: "REVIEW",
            fraud_types_pb2.FRAUD_ACTION_BLOCK: "BLOCK"}
_CHANNELS = {"APP": vote_types_pb2.CHANNEL_APP, "WEB": vote_types_pb2.CHANNEL_WEB,
             "SMS": vote_types_pb2.CHANNEL_SMS}

_UNSCORED_SQL = """
SELECT v.vote_id::text AS vote_id, v.user_id, v.request_id, v.round_id::text AS round_id,
       v.contestant_id::text AS contestant_id, v.count, v.channel, v.admitted_ms, v.ip_hash,
       v.device_id, v.app_version, v.latitude, v.longitude
  FROM votes v
 WHERE v.fraud_action = 'UNSCORED'
   AND NOT EXISTS (SELECT 1 FROM vote_fraud_decisions d WHERE d.vote_id = v.vote_id)
 ORDER BY v.admitted_ms, v.vote_id
 LIMIT %s
"""

_DECISIONS_SQL = """
INSERT INTO vote_fraud_decisions (vote_id, user_id, request_id, round_id, action, score,
                                  decision_id, round_finalized, scored_by)
SELECT * FROM unnest(%s::uuid[], %s::text[], %s::text[], %s::uuid[], %s::text[], %s::real[],
                     %s::text[], %s::boolean[], %s::text[])
ON CONFLICT (vote_id) DO NOTHING
RETURNING vote_id::text
"""

# The automatic verdict on a BLOCKed ledger vote: a review born REJECTED (or the vote's
# existing review), the rejection the final result reads, and its audit entry.
_REJECT_SQL = """
WITH review AS (
    INSERT INTO fraud_reviews (review_id, vote_ref, decision_id, user_id, round_id, score,
                               signals, state, resolved_by, resolved_at, note)
    VALUES (%(review_id)s, %(ref)s, %(decision_id)s, %(user_id)s, %(round_id)s, %(score)s,
            %(signals)s, 'REJECTED', %(actor)s, now(), %(note)s)
    ON CONFLICT (round_id, user_id, vote_ref) DO NOTHING
    RETURNING review_id
), rejection AS (
    INSERT INTO fraud_rejections (rejection_id, round_id, user_id, vote_ref, decision_id,
                                  review_id, rejected_by)
    SELECT %(rejection_id)s, %(round_id)s, %(user_id)s, %(ref)s, %(decision_id)s,
           coalesce((SELECT review_id FROM review),
                    (SELECT r.review_id FROM fraud_reviews r WHERE r.round_id = %(round_id)s
                       AND r.user_id = %(user_id)s AND r.vote_ref = %(ref)s)),
           %(actor)s
    ON CONFLICT DO NOTHING
    RETURNING rejection_id
)
INSERT INTO audit_log (actor_role, actor_subject, action, target, reason, details)
SELECT 'internal', 'vote_svc', 'fraud.rescore.reject', %(ref)s, %(note)s, %(details)s
  FROM rejection
"""


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
            cursor = await connection.execute(
                "SELECT pg_try_advisory_xact_lock(hashtext(%s)) AS mine", (_LOCK,))
            lock = await cursor.fetchone()
            if not lock or not lock["mine"]:
                return 0
            cursor = await connection.execute(_UNSCORED_SQL, (self._batch,))
            votes: list[dict[str, Any]] = await cursor.fetchall()
            if not votes:
                return 0
            reply = await self._stub.ScoreVotes(
                fraud_scoring_service_pb2.ScoreVotesRequest(votes=[_facts(v) for v in votes]),
                metadata=SCORING_METADATA, timeout=self._timeout)
            if len(reply.scores) != len(votes):
                raise ValueError(f"{len(reply.scores)} scores for {len(votes)} votes")
            scores = list(reply.scores)
            actions = [_ACTIONS.get(score.action, "ALLOW") for score in scores]
            blocked_rounds = sorted({vote["round_id"] for vote, action
                                     in zip(votes, actions, strict=True) if action == "BLOCK"})
            for round_id in blocked_rounds:  # in order: no deadlock with another locker
                await connection.execute(
                    "SELECT pg_advisory_xact_lock(hashtext('televote.results:' || %s))",
                    (round_id,))
            cursor = await connection.execute(
                "SELECT round_id::text AS round_id FROM round_results"
                " WHERE round_id = ANY(%s::uuid[])",
                (sorted({vote["round_id"] for vote in votes}),))
            finalized_rows: list[dict[str, Any]] = await cursor.fetchall()
            finalized = {str(row["round_id"]) for row in finalized_rows}
            cursor = await connection.execute(_DECISIONS_SQL, (
                [v["vote_id"] for v in votes], [v["user_id"] for v in votes],
                [v["request_id"] for v in votes], [v["round_id"] for v in votes], actions,
                [s.score for s in scores], [s.decision_id for s in scores],
                [v["round_id"] in finalized for v in votes], [self._actor] * len(votes)))
            recorded_rows: list[dict[str, Any]] = await cursor.fetchall()
            recorded = {str(row["vote_id"]) for row in recorded_rows}
            rejected = 0
            for vote, score, action in zip(votes, scores, actions, strict=True):
                if (action != "BLOCK" or vote["vote_id"] not in recorded
                        or vote["round_id"] in finalized):
                    continue
                await connection.execute(_REJECT_SQL, _rejection(vote, score, self._actor))
                rejected += 1
        log.info("re-scored unscored votes", extra={"fields": {
            "votes": len(votes), "recorded": len(recorded), "rejected": rejected,
            "finalized_rounds": sorted(finalized)}})
        return len(votes)


def _facts(vote: dict[str, Any]) -> fraud_scoring_service_pb2.VoteFacts:
    facts = fraud_scoring_service_pb2.VoteFacts(
        ref=vote["request_id"], user_id=vote["user_id"], device_id=vote["device_id"],
        ip_hash=vote["ip_hash"],
        channel=_CHANNELS.get(vote["channel"], vote_types_pb2.CHANNEL_UNSPECIFIED),
        round_id=vote["round_id"], contestant_id=vote["contestant_id"], count=vote["count"],
        app_version=vote["app_version"])
    if vote["latitude"] is not None and vote["longitude"] is not None:
        facts.location.latitude = vote["latitude"]
        facts.location.longitude = vote["longitude"]
    facts.server_time.FromMilliseconds(vote["admitted_ms"])
    return facts


def _rejection(vote: dict[str, Any], score: fraud_scoring_service_pb2.VoteScore,
               actor: str) -> dict[str, Any]:
    signals = [{"name": r.name, "contribution": round(r.contribution, 4), "detail": r.detail}
               for r in score.reasons]
    note = ("blocked when re-scored after fraud scoring was unavailable: "
            + ", ".join(r.name for r in score.reasons))
    return {
        "review_id": str(uuid.uuid4()), "rejection_id": str(uuid.uuid4()),
        "ref": vote["request_id"], "decision_id": score.decision_id,
        "user_id": vote["user_id"], "round_id": vote["round_id"], "score": score.score,
        "signals": Jsonb(signals), "actor": actor, "note": note,
        "details": Jsonb({"user_id": vote["user_id"], "round_id": vote["round_id"],
                          "target_id": vote["request_id"], "request_id": vote["request_id"],
                          "attributes": {"vote_id": vote["vote_id"],
                                         "decision_id": score.decision_id,
                                         "score": round(score.score, 4), "signals": signals,
                                         "rescored_by": actor}})}


async def unscored_votes(storage: Storage, round_id: str) -> int:
    """Votes of a round still waiting to be re-scored (for a finalizer that would rather
    wait for them than publish a result fraud rules have not seen)."""
    async with storage.pool.connection() as connection:
        cursor = await connection.execute(
            "SELECT count(*) AS n FROM votes v WHERE v.round_id = %s"
            " AND v.fraud_action = 'UNSCORED' AND NOT EXISTS"
            " (SELECT 1 FROM vote_fraud_decisions d WHERE d.vote_id = v.vote_id)", (round_id,))
        row: dict[str, Any] | None = await cursor.fetchone()
    return int(row["n"]) if row else 0
