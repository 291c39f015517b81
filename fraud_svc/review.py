"""FraudReviewService: the operators' review queue, blocks and the fraud audit trail."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import math
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import grpc
from google.protobuf import timestamp_pb2
from google.protobuf.message import Message
from psycopg import errors as pg_errors

from fraud_svc.features import REFUSE, SCORE, SEED, TUNED
from fraud_svc.state import FeatureState
from fraud_svc.store import (
    ACTION_PREFIX,
    AuditRecord,
    BlocklistCache,
    Conn,
    Pool,
    attribute_text,
    write_audit,
)
from runtime.errors import ApiError, FieldViolation, invalid_argument
from runtime.idempotency import once, require_request_id
from runtime.interceptors import current_principal
from televote.fraud.v1 import (
    fraud_review_service_pb2 as pb,
)
from televote.fraud.v1 import (
    fraud_review_service_pb2_grpc,
    fraud_types_pb2,
)

DEFAULT_PAGE = 50
MAX_COUNTRIES = 50
MAX_PAGE = 1_000
MAX_VALUE = 128

ResponseT = TypeVar("ResponseT", bound=Message)

_STATES = {"PENDING": fraud_types_pb2.REVIEW_STATE_PENDING,
           "APPROVED": fraud_types_pb2.REVIEW_STATE_APPROVED,
           "REJECTED": fraud_types_pb2.REVIEW_STATE_REJECTED}
_KINDS = {fraud_types_pb2.BLOCK_KIND_USER: "USER", fraud_types_pb2.BLOCK_KIND_DEVICE: "DEVICE",
          fraud_types_pb2.BLOCK_KIND_IP: "IP", fraud_types_pb2.BLOCK_KIND_CIDR: "CIDR"}
_KIND_NUMBERS = {name: number for number, name in _KINDS.items()}


def _page_size(value: int, field: str = "page_size") -> int:
    if value < 0 or value > MAX_PAGE:
        raise invalid_argument(FieldViolation(field, f"must be 0..{MAX_PAGE}"))
    return value or DEFAULT_PAGE


def _encode_token(position: list[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(position).encode()).decode()


def _decode_token(token: str, length: int) -> list[Any] | None:
    if not token:
        return None
    try:
        position = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        position = None
    if not isinstance(position, list) or len(position) != length:
        raise invalid_argument(FieldViolation("page_token", "not a token this RPC issued"))
    return position


def _uuid(value: str, field: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise invalid_argument(FieldViolation(field, "must be a UUID")) from None


def _ts(value: Any) -> timestamp_pb2.Timestamp | None:
    if not isinstance(value, datetime):
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _signals(raw: Any) -> list[fraud_types_pb2.FraudSignal]:
    return [fraud_types_pb2.FraudSignal(name=str(s.get("name", "")),
                                        contribution=float(s.get("contribution", 0.0)),
                                        detail=str(s.get("detail", "")))
            for s in raw or []]


def _review(row: dict[str, Any]) -> fraud_types_pb2.Review:
    return fraud_types_pb2.Review(
        review_id=str(row["review_id"]), vote_id=row["vote_ref"], user_id=row["user_id"],
        round_id=row["round_id"], score=row["score"], signals=_signals(row["signals"]),
        state=_STATES[row["state"]], user_round_votes=int(row.get("user_round_votes") or 0),
        create_time=_ts(row["created_at"]), resolved_by=row["resolved_by"] or "",
        resolve_time=_ts(row["resolved_at"]), note=row["note"])


def _block(row: dict[str, Any]) -> fraud_types_pb2.Block:
    return fraud_types_pb2.Block(
        block_id=str(row["block_id"]), kind=_KIND_NUMBERS[row["kind"]], value=row["value"],
        reason=row["reason"], created_by=row["created_by"],
        create_time=_ts(row["created_at"]), expire_time=_ts(row["expire_at"]))


def normalize_block_value(kind: str, value: str) -> str:
    """The canonical form of a block's value, or INVALID_REQUEST naming the problem."""
    value = value.strip()
    if not value:
        raise invalid_argument(FieldViolation("value", "required"))
    if kind == "IP":
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            raise invalid_argument(FieldViolation("value", "not an IP address")) from None
    if kind == "CIDR":
        try:
            return str(ipaddress.ip_network(value, strict=False))
        except ValueError:
            raise invalid_argument(FieldViolation(
                "value", "not a network in CIDR notation")) from None
    if len(value) > MAX_VALUE:
        raise invalid_argument(FieldViolation("value", f"longer than {MAX_VALUE} chars"))
    return value


async def refuse_if_finalized(conn: Conn, round_id: str) -> None:
    """ROUND_FINALIZED once the round's final result is stored: it can no longer change.

    Takes the round's finalization lock (results_svc/final.py holds it while it recounts) for
    the rest of the caller's transaction, so a verdict either commits before a recount
    starts, and is counted, or finds the result stored and changes nothing.
    """
    try:
        round_id = str(uuid.UUID(round_id))  # the key results_svc locks: the canonical text
    except ValueError:
        return  # not a round of the ledger (rounds are UUIDs): nothing to finalize
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext('televote.results:' || %s))",
                       [round_id])
    final = await (await conn.execute(
        "SELECT EXISTS (SELECT 1 FROM round_results WHERE round_id = %s::uuid)"
        " OR EXISTS (SELECT 1 FROM rounds WHERE round_id = %s::uuid AND state = 'FINALIZED')"
        " AS final", [round_id, round_id])).fetchone()
    if final is not None and final["final"]:
        raise ApiError(grpc.StatusCode.FAILED_PRECONDITION, "ROUND_FINALIZED",
                       f"the final result of round {round_id} is published; its votes can no"
                       " longer change", metadata={"round_id": round_id})


_REVIEW_COLUMNS = """
    r.review_id, r.seq, r.vote_ref, r.user_id, r.round_id, r.score, r.signals, r.state,
    r.created_at, r.resolved_by, r.resolved_at, r.note, r.resolve_request_id, r.resolve_decision,
    r.resolve_scope, r.affected_votes,
    (SELECT count(*) FROM fraud_reviews o
     WHERE o.user_id = r.user_id AND o.round_id = r.round_id) AS user_round_votes
"""


class FraudReviewServicer(fraud_review_service_pb2_grpc.FraudReviewServiceServicer):
    """Operator RPCs; every change is audited in the same transaction as the change."""

    def __init__(self, pool: Pool, state: FeatureState, blocklist: BlocklistCache) -> None:
        self._pool = pool
        self._state = state
        self._blocklist = blocklist

    async def _page(self, sql: str, params: list[Any], size: int,
                    position: Callable[[dict[str, Any]], list[Any]],
                    ) -> tuple[list[dict[str, Any]], str]:
        """One page of a keyset-paginated listing (`sql` ends in ORDER BY ... LIMIT %s), and
        the token of the next page ("" on the last): `position` names the last row's place."""
        async with self._pool.connection() as conn:
            rows: list[dict[str, Any]] = await (
                await conn.execute(sql, [*params, size + 1])).fetchall()
        if len(rows) <= size:
            return rows, ""
        return rows[:size], _encode_token(position(rows[size - 1]))

    async def ListReviews(self, request: pb.ListReviewsRequest,
                          context: grpc.aio.ServicerContext[Any, Any]) -> pb.ListReviewsResponse:
        size = _page_size(request.page_size)
        after = _decode_token(request.page_token, 1)
        where: list[str] = ["true"]
        params: list[Any] = []
        if request.round_id:
            where.append("r.round_id = %s")
            params.append(request.round_id)
        if request.user_id:
            where.append("r.user_id = %s")
            params.append(request.user_id)
        if request.state:
            names = {number: name for name, number in _STATES.items()}
            if request.state not in names:
                raise invalid_argument(FieldViolation("state", "unknown state"))
            where.append("r.state = %s")
            params.append(names[request.state])
        if after is not None:
            if not isinstance(after[0], int):
                raise invalid_argument(FieldViolation("page_token", "not a token this RPC issued"))
            where.append("r.seq > %s")
            params.append(after[0])
        rows, token = await self._page(
            f"SELECT {_REVIEW_COLUMNS} FROM fraud_reviews r WHERE {' AND '.join(where)}"
            " ORDER BY r.seq LIMIT %s", params, size, lambda last: [int(last["seq"])])
        return pb.ListReviewsResponse(reviews=[_review(r) for r in rows], next_page_token=token)

    async def ResolveReview(self, request: pb.ResolveReviewRequest,
                            context: grpc.aio.ServicerContext[Any, Any],
                            ) -> pb.ResolveReviewResponse:
        problems = []
        if not request.request_id:
            problems.append(FieldViolation("request_id", "required"))
        if not request.review_id:
            problems.append(FieldViolation("review_id", "required"))
        if request.decision not in (pb.REVIEW_DECISION_APPROVE, pb.REVIEW_DECISION_REJECT):
            problems.append(FieldViolation("decision", "APPROVE or REJECT required"))
        if request.scope not in (pb.REVIEW_SCOPE_VOTE, pb.REVIEW_SCOPE_USER_ROUND):
            problems.append(FieldViolation("scope", "VOTE or USER_ROUND required"))
        if len(request.note) > 2_000:
            problems.append(FieldViolation("note", "longer than 2,000 chars"))
        if problems:
            raise invalid_argument(*problems)
        request_id = _uuid(request.request_id, "request_id")
        review_id = _uuid(request.review_id, "review_id")
        decision = "APPROVE" if request.decision == pb.REVIEW_DECISION_APPROVE else "REJECT"
        scope = "VOTE" if request.scope == pb.REVIEW_SCOPE_VOTE else "USER_ROUND"
        actor = current_principal().subject
        async with self._pool.connection() as conn, conn.transaction():
            previous = await (await conn.execute(
                "SELECT review_id, resolve_decision, resolve_scope FROM fraud_reviews"
                " WHERE resolve_request_id = %s", [request_id])).fetchone()
            if previous is not None:
                if (str(previous["review_id"]), previous["resolve_decision"],
                        previous["resolve_scope"]) != (review_id, decision, scope):
                    raise ApiError(grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_MISMATCH",
                                   "request_id was used for another resolution")
                original = await self._fetch_review(conn, review_id)
                return pb.ResolveReviewResponse(
                    review=_review(original), affected_votes=original["affected_votes"] or 0)
            round_row = await (await conn.execute(
                "SELECT round_id FROM fraud_reviews WHERE review_id = %s",
                [review_id])).fetchone()
            if round_row is None:
                raise ApiError(grpc.StatusCode.NOT_FOUND, "REVIEW_NOT_FOUND",
                               f"no review {review_id}")
            await refuse_if_finalized(conn, str(round_row["round_id"]))
            row = await (await conn.execute(
                "SELECT * FROM fraud_reviews WHERE review_id = %s FOR UPDATE",
                [review_id])).fetchone()
            assert row is not None  # reviews are never deleted
            if row["state"] != "PENDING":
                raise ApiError(grpc.StatusCode.FAILED_PRECONDITION, "REVIEW_ALREADY_RESOLVED",
                               f"review {review_id} is already {row['state'].lower()}")
            state = "APPROVED" if decision == "APPROVE" else "REJECTED"
            user_id, round_id = row["user_id"], row["round_id"]
            affected = 1
            if decision == "REJECT":
                await conn.execute(
                    "INSERT INTO fraud_rejections (rejection_id, round_id, user_id, vote_ref,"
                    " decision_id, review_id, rejected_by) VALUES (%s, %s, %s, %s, %s, %s, %s)"
                    " ON CONFLICT DO NOTHING",
                    [str(uuid.uuid4()), round_id, user_id,
                     row["vote_ref"] if scope == "VOTE" else None,
                     row["decision_id"] if scope == "VOTE" else None, review_id, actor])
            if scope == "USER_ROUND":
                # The user's other pending reviews in the round share the verdict.
                others = await conn.execute(
                    "UPDATE fraud_reviews SET state = %s, resolved_by = %s,"
                    " resolved_at = now(), note = %s WHERE user_id = %s AND round_id = %s"
                    " AND state = 'PENDING' AND review_id <> %s",
                    [state, actor, request.note, user_id, round_id, review_id])
                affected += max(0, others.rowcount)
            await conn.execute(
                "UPDATE fraud_reviews SET state = %s, resolved_by = %s, resolved_at = now(),"
                " note = %s, resolve_request_id = %s, resolve_decision = %s,"
                " resolve_scope = %s, affected_votes = %s WHERE review_id = %s",
                [state, actor, request.note, request_id, decision, scope, affected, review_id])
            await write_audit(conn, [AuditRecord(
                actor_role="operator", actor=actor, action="review.resolve",
                target_id=review_id, reason=request.note, user_id=user_id, round_id=round_id,
                request_id=request_id, attributes={
                    "decision": decision, "scope": scope, "vote_id": row["vote_ref"],
                    "score": row["score"], "signals": row["signals"],
                    "affected_votes": affected})])
            resolved = await self._fetch_review(conn, review_id)
        return pb.ResolveReviewResponse(review=_review(resolved), affected_votes=affected)

    async def _fetch_review(self, conn: Conn, review_id: str) -> dict[str, Any]:
        row = await (await conn.execute(
            f"SELECT {_REVIEW_COLUMNS} FROM fraud_reviews r WHERE r.review_id = %s",
            [review_id])).fetchone()
        assert row is not None
        return row

    async def CreateBlock(self, request: pb.CreateBlockRequest,
                          context: grpc.aio.ServicerContext[Any, Any]) -> pb.CreateBlockResponse:
        problems = []
        if not request.request_id:
            problems.append(FieldViolation("request_id", "required"))
        kind = _KINDS.get(request.kind)
        if kind is None:
            problems.append(FieldViolation("kind", "USER, DEVICE, IP or CIDR required"))
        reason = request.reason.strip()
        if not 1 <= len(reason) <= 500:
            problems.append(FieldViolation("reason", "1 to 500 chars required"))
        expire_at: datetime | None = None
        if request.HasField("expire_time"):
            expire_at = request.expire_time.ToDatetime(tzinfo=UTC)
            if expire_at <= datetime.now(UTC):
                problems.append(FieldViolation("expire_time", "in the past"))
        if problems:
            raise invalid_argument(*problems)
        assert kind is not None
        value = normalize_block_value(kind, request.value)
        request_id = _uuid(request.request_id, "request_id")
        actor = current_principal().subject
        async with self._pool.connection() as conn, conn.transaction():
            previous = await (await conn.execute(
                "SELECT * FROM fraud_blocks WHERE create_request_id = %s",
                [request_id])).fetchone()
            if previous is not None:
                if (previous["kind"], previous["value"], previous["reason"]) != (
                        kind, value, reason):
                    raise ApiError(grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_MISMATCH",
                                   "request_id was used for another block")
                return pb.CreateBlockResponse(block=_block(previous))
            # An expired block no longer applies: retire it so the new one can take its place.
            await conn.execute(
                "UPDATE fraud_blocks SET deleted_at = now(), deleted_by = 'expired'"
                " WHERE kind = %s AND value = %s AND deleted_at IS NULL"
                " AND expire_at <= now()", [kind, value])
            try:
                async with conn.transaction():
                    row = await (await conn.execute(
                        "INSERT INTO fraud_blocks (block_id, kind, value, reason, created_by,"
                        " expire_at, create_request_id) VALUES (%s, %s, %s, %s, %s, %s, %s)"
                        " RETURNING *",
                        [str(uuid.uuid4()), kind, value, reason, actor, expire_at,
                         request_id])).fetchone()
            except pg_errors.UniqueViolation:
                raise ApiError(grpc.StatusCode.ALREADY_EXISTS, "BLOCK_ALREADY_EXISTS",
                               f"an active {kind.lower()} block of {value} exists") from None
            assert row is not None
            await write_audit(conn, [AuditRecord(
                actor_role="operator", actor=actor, action="block.create",
                target_id=str(row["block_id"]), reason=reason,
                user_id=value if kind == "USER" else "", request_id=request_id,
                attributes={"kind": kind, "value": value,
                            "expire_time": expire_at.isoformat() if expire_at else ""})])
        if kind == "USER":
            until = {value: int(expire_at.timestamp() * 1000)} if expire_at else None
            await self._state.set_blocked([value], until_ms=until)
        await self._blocklist.reload()
        return pb.CreateBlockResponse(block=_block(row))

    async def DeleteBlock(self, request: pb.DeleteBlockRequest,
                          context: grpc.aio.ServicerContext[Any, Any]) -> pb.DeleteBlockResponse:
        problems = []
        if not request.block_id:
            problems.append(FieldViolation("block_id", "required"))
        if not request.request_id:
            problems.append(FieldViolation("request_id", "required"))
        if problems:
            raise invalid_argument(*problems)
        block_id = _uuid(request.block_id, "block_id")
        request_id = _uuid(request.request_id, "request_id")
        actor = current_principal().subject
        async with self._pool.connection() as conn, conn.transaction():
            row = await (await conn.execute(
                "SELECT * FROM fraud_blocks WHERE block_id = %s FOR UPDATE",
                [block_id])).fetchone()
            if row is None or (row["deleted_at"] is not None
                               and row["delete_request_id"] != request_id):
                raise ApiError(grpc.StatusCode.NOT_FOUND, "BLOCK_NOT_FOUND",
                               f"no active block {block_id}")
            if row["deleted_at"] is not None:  # a retry of the delete that removed it
                return pb.DeleteBlockResponse(block=_block(row))
            await conn.execute(
                "UPDATE fraud_blocks SET deleted_at = now(), deleted_by = %s,"
                " delete_request_id = %s WHERE block_id = %s", [actor, request_id, block_id])
            await write_audit(conn, [AuditRecord(
                actor_role="operator", actor=actor, action="block.delete", target_id=block_id,
                reason=f"unblock {row['kind'].lower()} {row['value']}",
                user_id=row["value"] if row["kind"] == "USER" else "", request_id=request_id,
                attributes={"kind": row["kind"], "value": row["value"],
                            "block_reason": row["reason"], "created_by": row["created_by"]})])
        if row["kind"] == "USER":
            await self._state.set_blocked([row["value"]], blocked=False)
        await self._blocklist.reload()
        return pb.DeleteBlockResponse(block=_block(row))

    async def ListBlocks(self, request: pb.ListBlocksRequest,
                         context: grpc.aio.ServicerContext[Any, Any]) -> pb.ListBlocksResponse:
        size = _page_size(request.page_size)
        after = _decode_token(request.page_token, 2)
        where = ["deleted_at IS NULL", "(expire_at IS NULL OR expire_at > now())"]
        params: list[Any] = []
        if request.kind:
            kind = _KINDS.get(request.kind)
            if kind is None:
                raise invalid_argument(FieldViolation("kind", "unknown kind"))
            where.append("kind = %s")
            params.append(kind)
        if after is not None:
            where.append("(created_at, block_id) < (%s::timestamptz, %s::uuid)")
            params += after
        rows, token = await self._page(
            f"SELECT * FROM fraud_blocks WHERE {' AND '.join(where)}"
            " ORDER BY created_at DESC, block_id DESC LIMIT %s", params, size,
            lambda last: [last["created_at"].isoformat(), str(last["block_id"])])
        return pb.ListBlocksResponse(blocks=[_block(r) for r in rows], next_page_token=token)

    async def ListAuditEntries(self, request: pb.ListAuditEntriesRequest,
                               context: grpc.aio.ServicerContext[Any, Any],
                               ) -> pb.ListAuditEntriesResponse:
        size = _page_size(request.page_size)
        after = _decode_token(request.page_token, 1)
        where = ["action LIKE %s"]
        params: list[Any] = [ACTION_PREFIX + "%"]
        if request.user_id:
            where.append("details ->> 'user_id' = %s")
            params.append(request.user_id)
        if request.round_id:
            where.append("details ->> 'round_id' = %s")
            params.append(request.round_id)
        if request.actor:
            where.append("actor_subject = %s")
            params.append(request.actor)
        if request.action:
            where.append("action = %s")
            params.append(ACTION_PREFIX + request.action)
        start = request.start_time.ToDatetime(UTC) if request.HasField("start_time") else None
        end = request.end_time.ToDatetime(UTC) if request.HasField("end_time") else None
        if start is not None and end is not None and start > end:
            raise invalid_argument(FieldViolation("start_time", "after end_time"))
        if start is not None:
            where.append("recorded_at >= %s")
            params.append(start)
        if end is not None:
            where.append("recorded_at < %s")
            params.append(end)
        if after is not None:
            if not isinstance(after[0], int):
                raise invalid_argument(FieldViolation("page_token", "not a token this RPC issued"))
            where.append("audit_id < %s")
            params.append(after[0])
        rows, token = await self._page(
            f"SELECT * FROM audit_log WHERE {' AND '.join(where)}"
            " ORDER BY audit_id DESC LIMIT %s", params, size,
            lambda last: [int(last["audit_id"])])
        return pb.ListAuditEntriesResponse(entries=[_entry(r) for r in rows],
                                           next_page_token=token)


    # -- traveller exemptions ------------------------------------------------------------

    async def GrantTravellerExemption(
            self, request: pb.GrantTravellerExemptionRequest,
            context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.GrantTravellerExemptionResponse:
        problems = []
        user_id = request.user_id.strip()
        if not 1 <= len(user_id) <= MAX_VALUE or not user_id.isprintable():
            problems.append(FieldViolation("user_id", f"1 to {MAX_VALUE} printable chars"))
        countries: list[str] = []
        if len(request.countries) > MAX_COUNTRIES:
            problems.append(FieldViolation("countries", f"at most {MAX_COUNTRIES}"))
        for index, code in enumerate(request.countries):
            if len(code) != 2 or not code.isascii() or not code.isalpha():
                problems.append(FieldViolation(f"countries[{index}]",
                                               "not an ISO 3166-1 alpha-2 code"))
            elif code.upper() not in countries:
                countries.append(code.upper())
        expire_at: datetime | None = None
        if not request.HasField("expire_time"):
            problems.append(FieldViolation("expire_time", "required"))
        else:
            expire_at = request.expire_time.ToDatetime(tzinfo=UTC)
            if expire_at <= datetime.now(UTC):
                problems.append(FieldViolation("expire_time", "in the past"))
        note = request.note.strip()
        if not 1 <= len(note) <= 500:
            problems.append(FieldViolation("note", "1 to 500 chars required"))
        if problems:
            raise invalid_argument(*problems)
        require_request_id(request.request_id)
        actor = current_principal().subject

        async def grant(conn: Conn) -> pb.GrantTravellerExemptionResponse:
            row = await (await conn.execute(
                "INSERT INTO fraud_travellers (user_id, countries, expire_at, created_by, reason)"
                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (user_id) DO UPDATE SET"
                " countries = excluded.countries, expire_at = excluded.expire_at,"
                " created_by = excluded.created_by, created_at = now(),"
                " reason = excluded.reason RETURNING *",
                [user_id, countries or None, expire_at, actor, note])).fetchone()
            assert row is not None
            await write_audit(conn, [AuditRecord(
                actor_role="operator", actor=actor, action="traveller.grant",
                target_id=user_id, reason=note, user_id=user_id,
                request_id=request.request_id, attributes={
                    "countries": countries or "anywhere",
                    "expire_time": expire_at.isoformat() if expire_at else ""})])
            return pb.GrantTravellerExemptionResponse(exemption=_traveller(row))

        response = await self._once("GrantTravellerExemption", request.request_id, request,
                                    pb.GrantTravellerExemptionResponse, grant)
        await self._blocklist.reload()
        return response

    async def RevokeTravellerExemption(
            self, request: pb.RevokeTravellerExemptionRequest,
            context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.RevokeTravellerExemptionResponse:
        if not request.user_id:
            raise invalid_argument(FieldViolation("user_id", "required"))
        require_request_id(request.request_id)
        actor = current_principal().subject

        async def revoke(conn: Conn) -> pb.RevokeTravellerExemptionResponse:
            row = await (await conn.execute(
                "DELETE FROM fraud_travellers WHERE user_id = %s RETURNING *",
                [request.user_id])).fetchone()
            if row is None:
                raise ApiError(grpc.StatusCode.NOT_FOUND, "TRAVELLER_NOT_FOUND",
                               f"{request.user_id} has no traveller exemption")
            await write_audit(conn, [AuditRecord(
                actor_role="operator", actor=actor, action="traveller.revoke",
                target_id=request.user_id, reason=f"revoke exemption of {request.user_id}",
                user_id=request.user_id, request_id=request.request_id, attributes={
                    "countries": row["countries"] or "anywhere",
                    "expire_time": row["expire_at"].isoformat() if row["expire_at"] else "",
                    "granted_by": row["created_by"], "note": row["reason"]})])
            return pb.RevokeTravellerExemptionResponse(exemption=_traveller(row))

        response = await self._once("RevokeTravellerExemption", request.request_id, request,
                                    pb.RevokeTravellerExemptionResponse, revoke)
        await self._blocklist.reload()
        return response

    async def ListTravellerExemptions(
            self, request: pb.ListTravellerExemptionsRequest,
            context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.ListTravellerExemptionsResponse:
        size = _page_size(request.page_size)
        after = _decode_token(request.page_token, 1)
        where = ["(expire_at IS NULL OR expire_at > now())"]
        params: list[Any] = []
        if after is not None:
            if not isinstance(after[0], str):
                raise invalid_argument(FieldViolation("page_token", "not a token this RPC issued"))
            where.append("user_id > %s")
            params.append(after[0])
        rows, token = await self._page(
            f"SELECT * FROM fraud_travellers WHERE {' AND '.join(where)}"
            " ORDER BY user_id LIMIT %s", params, size, lambda last: [last["user_id"]])
        return pb.ListTravellerExemptionsResponse(
            exemptions=[_traveller(r) for r in rows], next_page_token=token)

    # -- per-show fraud policy -----------------------------------------------------------

    async def SetFraudPolicy(self, request: pb.SetFraudPolicyRequest,
                             context: grpc.aio.ServicerContext[Any, Any],
                             ) -> pb.SetFraudPolicyResponse:
        problems = []
        show_id = ""
        try:
            show_id = str(uuid.UUID(request.show_id))
        except ValueError:
            problems.append(FieldViolation("show_id", "must be a show id (UUID)"))
        block, review = request.block_threshold, request.review_threshold
        if not (math.isfinite(block) and math.isfinite(review)
                and 0 < review <= block <= 1):
            problems.append(FieldViolation(
                "review_threshold", "need 0 < review_threshold <= block_threshold <= 1"))
        countries: list[str] = []
        if not 1 <= len(request.allowed_countries) <= MAX_COUNTRIES:
            problems.append(FieldViolation("allowed_countries", f"1 to {MAX_COUNTRIES} required"))
        for index, code in enumerate(request.allowed_countries):
            if len(code) != 2 or not code.isascii() or not code.isalpha():
                problems.append(FieldViolation(f"allowed_countries[{index}]",
                                               "not an ISO 3166-1 alpha-2 code"))
            elif code.upper() not in countries:
                countries.append(code.upper())
        note = request.note.strip()
        if len(note) > 500:
            problems.append(FieldViolation("note", "longer than 500 chars"))
        scoring = _SCORINGS.get(request.scoring, "?")
        if scoring == "?":
            problems.append(FieldViolation("scoring", "not a FraudScoring value"))
        geo = {}
        for name in ("foreign_country", "location_mismatch"):
            geo[name] = _ENFORCEMENTS.get(getattr(request, name), "?")
            if geo[name] == "?":
                problems.append(FieldViolation(name, "not a GeoEnforcement value"))
        if problems:
            raise invalid_argument(*problems)
        require_request_id(request.request_id)
        actor = current_principal().subject

        async def set_policy(conn: Conn) -> pb.SetFraudPolicyResponse:
            show = await (await conn.execute("SELECT 1 FROM shows WHERE show_id = %s",
                                             [show_id])).fetchone()
            if show is None:
                raise ApiError(grpc.StatusCode.NOT_FOUND, "SHOW_NOT_FOUND", f"no show {show_id}")
            row = await (await conn.execute(
                "INSERT INTO fraud_policies (show_id, block_threshold, review_threshold,"
                " allowed_countries, note, updated_by, scoring, foreign_country,"
                " location_mismatch) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (show_id) DO UPDATE SET block_threshold = excluded.block_threshold,"
                " review_threshold = excluded.review_threshold,"
                " allowed_countries = excluded.allowed_countries, note = excluded.note,"
                " updated_by = excluded.updated_by, updated_at = now(),"
                " scoring = excluded.scoring, foreign_country = excluded.foreign_country,"
                " location_mismatch = excluded.location_mismatch RETURNING *",
                [show_id, block, review, countries, note, actor, scoring,
                 geo["foreign_country"], geo["location_mismatch"]])).fetchone()
            assert row is not None
            await write_audit(conn, [AuditRecord(
                actor_role="operator", actor=actor, action="policy.set", target_id=show_id,
                reason=note, request_id=request.request_id, attributes={
                    "show_id": show_id, "block_threshold": block, "review_threshold": review,
                    "allowed_countries": countries, "scoring": scoring or "default",
                    "foreign_country": geo["foreign_country"] or "default",
                    "location_mismatch": geo["location_mismatch"] or "default"})])
            return pb.SetFraudPolicyResponse(policy=_policy(row))

        response = await self._once("SetFraudPolicy", request.request_id, request,
                                    pb.SetFraudPolicyResponse, set_policy)
        await self._blocklist.reload()
        return response

    async def GetFraudPolicy(self, request: pb.GetFraudPolicyRequest,
                             context: grpc.aio.ServicerContext[Any, Any],
                             ) -> pb.GetFraudPolicyResponse:
        show_id = _uuid(request.show_id, "show_id")
        async with self._pool.connection() as conn:
            row = await (await conn.execute("SELECT * FROM fraud_policies WHERE show_id = %s",
                                            [show_id])).fetchone()
        if row is None:
            raise ApiError(grpc.StatusCode.NOT_FOUND, "FRAUD_POLICY_NOT_FOUND",
                           f"show {show_id} has no fraud policy: the defaults apply")
        return pb.GetFraudPolicyResponse(policy=_policy(row))

    async def _once(self, method: str, request_id: str, request: Any,
                    response_type: type[ResponseT],
                    perform: Callable[[Conn], Awaitable[ResponseT]]) -> ResponseT:
        """`perform` once per request id (runtime/idempotency.py), in one transaction with
        its audit entry; a refusal it raises changes nothing and is not remembered."""
        async with self._pool.connection() as conn, conn.transaction():
            return await once(conn, f"televote.fraud.v1.FraudReviewService/{method}",
                              request_id, request, response_type, lambda: perform(conn))


#: FraudScoring and GeoEnforcement as fraud_policies stores them (NULL: the deployment's
#: default, FRAUD_SCORING and FRAUD_GEO_*).
_SCORINGS: dict[int, str | None] = {
    fraud_types_pb2.FRAUD_SCORING_UNSPECIFIED: None, fraud_types_pb2.FRAUD_SCORING_SEED: SEED,
    fraud_types_pb2.FRAUD_SCORING_TUNED: TUNED}
_ENFORCEMENTS: dict[int, str | None] = {
    fraud_types_pb2.GEO_ENFORCEMENT_UNSPECIFIED: None,
    fraud_types_pb2.GEO_ENFORCEMENT_REFUSE: REFUSE, fraud_types_pb2.GEO_ENFORCEMENT_SCORE: SCORE}


def _enum(values: dict[int, str | None], stored: str | None) -> int:
    return next(number for number, name in values.items() if name == stored)


def _policy(row: dict[str, Any]) -> fraud_types_pb2.FraudPolicy:
    return fraud_types_pb2.FraudPolicy(
        show_id=str(row["show_id"]), block_threshold=row["block_threshold"],
        review_threshold=row["review_threshold"],
        allowed_countries=list(row["allowed_countries"]), note=row["note"],
        updated_by=row["updated_by"], update_time=_ts(row["updated_at"]),
        scoring=_enum(_SCORINGS, row["scoring"]),  # type: ignore[arg-type]
        foreign_country=_enum(_ENFORCEMENTS, row["foreign_country"]),  # type: ignore[arg-type]
        location_mismatch=_enum(_ENFORCEMENTS,  # type: ignore[arg-type]
                                row["location_mismatch"]))


def _traveller(row: dict[str, Any]) -> fraud_types_pb2.TravellerExemption:
    return fraud_types_pb2.TravellerExemption(
        user_id=row["user_id"], countries=list(row["countries"] or []),
        expire_time=_ts(row["expire_at"]), note=row["reason"], granted_by=row["created_by"],
        grant_time=_ts(row["created_at"]))


def _entry(row: dict[str, Any]) -> fraud_types_pb2.AuditEntry:
    details = row["details"] or {}
    attributes = {key: attribute_text(value)
                  for key, value in (details.get("attributes") or {}).items()}
    if row["reason"]:
        attributes.setdefault("reason", row["reason"])
    return fraud_types_pb2.AuditEntry(
        entry_id=str(row["audit_id"]), time=_ts(row["recorded_at"]), actor=row["actor_subject"],
        action=str(row["action"]).removeprefix(ACTION_PREFIX),
        user_id=str(details.get("user_id", "")), round_id=str(details.get("round_id", "")),
        target_id=str(details.get("target_id", row["target"])), attributes=attributes,
        request_id=str(details.get("request_id", "")))
