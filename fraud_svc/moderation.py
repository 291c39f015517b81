"""What operators and the re-scorer change in fraud_svc: review verdicts, blocks, traveller
exemptions, per-show policies, and the rejection of blocked ledger votes. Each runs in the
caller's transaction with its audit entry (api.py makes it idempotent).

A verdict that changes what a round's final result counts (an operator's REJECT, a re-scored
ledger vote's BLOCK) takes the round's finalization lock (runtime.locks), so it either commits
before results_svc's recount starts, and is counted, or finds the result stored and changes
nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import grpc
from psycopg import errors as pg_errors

from fraud_svc import store
from fraud_svc.store import AuditRecord, Conn, Pool, write_audit
from runtime import ids, locks
from runtime.errors import ApiError
from runtime.storage import fetch_one
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


async def resolve_review(conn: Conn, *, review_id: str, decision: str, scope: str, note: str,
                         request_id: str, actor: str) -> tuple[dict[str, Any], int]:
    """Resolve a pending review (and with scope USER_ROUND the user's other pending reviews in
    the round); a REJECT is a rejection the final result leaves out. Returns the review as it
    is now and how many reviews the verdict resolved."""
    round_row = await fetch_one(conn, store.REVIEW_ROUND, [review_id])
    if round_row is None:
        raise ApiError(grpc.StatusCode.NOT_FOUND, "REVIEW_NOT_FOUND",
                       f"no review {review_id}")
    await refuse_if_finalized(conn, str(round_row["round_id"]))
    row = await fetch_one(conn, store.REVIEW_FOR_UPDATE, [review_id])
    assert row is not None  # reviews are never deleted
    if row["state"] != "PENDING":
        raise ApiError(grpc.StatusCode.FAILED_PRECONDITION, "REVIEW_ALREADY_RESOLVED",
                       f"review {review_id} is already {row['state'].lower()}")
    state = "APPROVED" if decision == "APPROVE" else "REJECTED"
    user_id, round_id = row["user_id"], row["round_id"]
    affected = 1
    if decision == "REJECT":
        await conn.execute(
            store.INSERT_REJECTION,
            [str(uuid.uuid4()), round_id, user_id,
             row["vote_ref"] if scope == "VOTE" else None,
             row["decision_id"] if scope == "VOTE" else None, review_id, actor])
    if scope == "USER_ROUND":
        # The user's other pending reviews in the round share the verdict.
        others = await conn.execute(
            store.RESOLVE_OTHER_REVIEWS,
            [state, actor, note, user_id, round_id, review_id])
        affected += max(0, others.rowcount)
    await conn.execute(
        store.RESOLVE_REVIEW,
        [state, actor, note, request_id, decision, scope, affected, review_id])
    await write_audit(conn, [AuditRecord(
        actor_role="operator", actor=actor, action="review.resolve",
        target_id=review_id, reason=note, user_id=user_id, round_id=round_id,
        request_id=request_id, attributes={
            "decision": decision, "scope": scope, "vote_id": row["vote_ref"],
            "score": row["score"], "signals": row["signals"],
            "affected_votes": affected})])
    return await store.fetch_review(conn, review_id), affected


async def create_block(conn: Conn, *, kind: str, value: str, reason: str,
                       expire_at: datetime | None, request_id: str, actor: str,
                       ) -> dict[str, Any]:
    """A new active block (BLOCK_ALREADY_EXISTS while one of the same kind and value is)."""
    # An expired block no longer applies: retire it so the new one can take its place.
    await conn.execute(
        store.RETIRE_EXPIRED_BLOCK, [kind, value])
    try:
        async with conn.transaction():
            row = await fetch_one(
                conn,
                store.INSERT_BLOCK,
                [str(uuid.uuid4()), kind, value, reason, actor, expire_at,
                 request_id])
    except pg_errors.UniqueViolation:
        raise ApiError(grpc.StatusCode.ALREADY_EXISTS, "BLOCK_ALREADY_EXISTS",
                       f"an active {kind.lower()} block of {value} exists") from None
    assert row is not None
    return await _operator_did(
        conn, row, actor=actor, action="block.create",
        target_id=str(row["block_id"]), reason=reason,
        user_id=value if kind == "USER" else "", request_id=request_id,
        attributes={"kind": kind, "value": value,
                    "expire_time": expire_at.isoformat() if expire_at else ""})


async def delete_block(conn: Conn, *, block_id: str, request_id: str, actor: str,
                       ) -> dict[str, Any]:
    """End an active block (BLOCK_NOT_FOUND if there is none); returns it as it was."""
    row = await fetch_one(
        conn, store.BLOCK_FOR_UPDATE, [block_id])
    if row is None or row["deleted_at"] is not None:
        raise ApiError(grpc.StatusCode.NOT_FOUND, "BLOCK_NOT_FOUND",
                       f"no active block {block_id}")
    await conn.execute(
        store.DELETE_BLOCK, [actor, request_id, block_id])
    return await _operator_did(
        conn, row, actor=actor, action="block.delete", target_id=block_id,
        reason=f"unblock {row['kind'].lower()} {row['value']}",
        user_id=row["value"] if row["kind"] == "USER" else "", request_id=request_id,
        attributes={"kind": row["kind"], "value": row["value"],
                    "block_reason": row["reason"], "created_by": row["created_by"]})


async def grant_traveller(conn: Conn, *, user_id: str, countries: list[str],
                          expire_at: datetime | None, note: str, request_id: str, actor: str,
                          ) -> dict[str, Any]:
    """Exempt a user from the country rules (`countries`, or anywhere when empty)."""
    row = await fetch_one(
        conn,
        store.UPSERT_TRAVELLER,
        [user_id, countries or None, expire_at, actor, note])
    assert row is not None
    return await _operator_did(
        conn, row, actor=actor, action="traveller.grant",
        target_id=user_id, reason=note, user_id=user_id,
        request_id=request_id, attributes={
            "countries": countries or "anywhere",
            "expire_time": expire_at.isoformat() if expire_at else ""})


async def revoke_traveller(conn: Conn, *, user_id: str, request_id: str, actor: str,
                           ) -> dict[str, Any]:
    """End a user's exemption (TRAVELLER_NOT_FOUND without one); returns it as it was."""
    row = await fetch_one(
        conn, store.DELETE_TRAVELLER, [user_id])
    if row is None:
        raise ApiError(grpc.StatusCode.NOT_FOUND, "TRAVELLER_NOT_FOUND",
                       f"{user_id} has no traveller exemption")
    return await _operator_did(
        conn, row, actor=actor, action="traveller.revoke",
        target_id=user_id, reason=f"revoke exemption of {user_id}",
        user_id=user_id, request_id=request_id, attributes={
            "countries": row["countries"] or "anywhere",
            "expire_time": row["expire_at"].isoformat() if row["expire_at"] else "",
            "granted_by": row["created_by"], "note": row["reason"]})


async def set_policy(conn: Conn, *, show_id: str, block: float, review: float,
                     countries: list[str], note: str, request_id: str, actor: str,
                     scoring: str | None, foreign_country: str | None,
                     location_mismatch: str | None) -> dict[str, Any]:
    """A show's fraud policy (SHOW_NOT_FOUND for no such show). A None scoring or geographic
    rule is stored as NULL: the deployment's default applies."""
    show = await fetch_one(conn, store.SHOW_EXISTS, [show_id])
    if show is None:
        raise ApiError(grpc.StatusCode.NOT_FOUND, "SHOW_NOT_FOUND", f"no show {show_id}")
    row = await fetch_one(
        conn,
        store.UPSERT_POLICY,
        [show_id, block, review, countries, note, actor, scoring, foreign_country,
         location_mismatch])
    assert row is not None
    return await _operator_did(
        conn, row, actor=actor, action="policy.set", target_id=show_id,
        reason=note, request_id=request_id, attributes={
            "show_id": show_id, "block_threshold": block, "review_threshold": review,
            "allowed_countries": countries, "scoring": scoring or "default",
            "foreign_country": foreign_country or "default",
            "location_mismatch": location_mismatch or "default"})


async def _operator_did(conn: Conn, row: dict[str, Any], **record: Any) -> dict[str, Any]:
    """`row`, once the audit entry of the operator's change that gave it is written."""
    await write_audit(conn, [AuditRecord(actor_role="operator", **record)])
    return row
