"""Verdicts on votes that change what a round's final result counts: an operator's, or a
re-scored ledger vote's BLOCK. Both take the round's finalization lock (runtime.locks), so a
verdict either commits before results_svc's recount starts, and is counted, or finds the
result stored and changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from fraud_svc import store
from fraud_svc.store import AuditRecord, Conn, Pool, write_audit
from runtime import ids, locks
from runtime.errors import ApiError
from televote.fraud.v1 import fraud_scoring_service_pb2 as scoring_pb


async def refuse_if_finalized(conn: Conn, round_id: str) -> None:
    """ROUND_FINALIZED once the round's final result is stored: it can no longer change.

    Holds the round's finalization lock for the rest of the caller's transaction.
    """
    canonical = ids.canonical(round_id)
    if canonical is None:
        return  # not a round of the ledger (rounds are UUIDs): nothing to finalize
    await locks.round_results(conn, canonical)
    if await store.finalized_rounds(conn, [canonical]):
        raise ApiError(grpc.StatusCode.FAILED_PRECONDITION, "ROUND_FINALIZED",
                       f"the final result of round {canonical} is published; its votes can no"
                       " longer change", metadata={"round_id": canonical})


async def reject_ledger_votes(pool: Pool, blocks: Sequence[scoring_pb.LedgerVoteBlock], *,
                              caller: str, rescored_by: str) -> tuple[set[str], int]:
    """Carry out BLOCK verdicts on votes already in the ledger (they can no longer be refused):
    reject each whose round has no final result, audited as `fraud.rescore.reject`.

    Returns the rounds that were final (their votes left alone) and how many votes this call
    rejected (a vote already rejected is left as it is)."""
    rejected = 0
    async with pool.connection() as conn, conn.transaction():
        rounds = sorted({block.round_id for block in blocks})
        for round_id in rounds:  # in order: no deadlock with another locker
            await locks.round_results(conn, round_id)
        finalized = await store.finalized_rounds(conn, rounds)
        for block in blocks:
            if block.round_id in finalized:
                continue
            score = block.score
            signals: list[dict[str, object]] = [
                {"name": r.name, "contribution": round(r.contribution, 4), "detail": r.detail}
                for r in score.reasons]
            note = ("blocked when re-scored after fraud scoring was unavailable: "
                    + ", ".join(r.name for r in score.reasons))
            if not await store.reject_vote(
                    conn, ref=block.ref, decision_id=score.decision_id, user_id=block.user_id,
                    round_id=block.round_id, score=score.score, signals=signals,
                    actor=rescored_by, note=note):
                continue
            rejected += 1
            await write_audit(conn, [AuditRecord(
                actor_role="internal", actor=caller, action="rescore.reject",
                target_id=block.ref, reason=note, user_id=block.user_id,
                round_id=block.round_id, request_id=block.ref, attributes={
                    "vote_id": block.vote_id, "decision_id": score.decision_id,
                    "score": round(score.score, 4), "signals": signals,
                    "rescored_by": rescored_by})])
    return finalized, rejected
