"""fraud_svc's servicers: FraudScoringService (internal) and FraudReviewService (operators'
review queue, blocks, exemptions, policies and the fraud audit trail)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from fraud_svc import moderation, store
from fraud_svc.config import FraudConfig
from fraud_svc.features import REFUSE, SCORE, SEED, TUNED, Scorer
from fraud_svc.geoip import IpIntel
from fraud_svc.scoring import Scoring
from fraud_svc.state import FeatureState
from fraud_svc.store import (
    ACTION_PREFIX,
    BlocklistCache,
    Conn,
    Pool,
    attribute_text,
)
from runtime import ids
from runtime.errors import ApiError, FieldViolation, invalid_argument
from runtime.idempotency import once, require_request_id
from runtime.interceptors import current_principal
from runtime.protoconv import timestamp
from runtime.storage import fetch_one
from televote.fraud.v1 import (
    fraud_review_service_pb2 as pb,
)
from televote.fraud.v1 import (
    fraud_review_service_pb2_grpc,
    fraud_scoring_service_pb2_grpc,
    fraud_types_pb2,
)
from televote.fraud.v1 import fraud_scoring_service_pb2 as scoring_pb

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


def _decode_token(token: str, *kinds: type) -> list[Any] | None:
    """The position a page token names (one value of each of `kinds`), None for no token."""
    if not token:
        return None
    try:
        position = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        position = None
    if (not isinstance(position, list) or len(position) != len(kinds)
            or not all(isinstance(v, k) for v, k in zip(position, kinds, strict=True))):
        raise invalid_argument(FieldViolation("page_token", "not a token this RPC issued"))
    return position


def _countries(codes: Sequence[str], field: str, problems: list[FieldViolation], *,
               required: bool) -> list[str]:
    """`codes` as distinct upper-case ISO 3166-1 alpha-2 codes; what is wrong with them goes
    into `problems`."""
    if len(codes) > MAX_COUNTRIES or (required and not codes):
        problems.append(FieldViolation(
            field, f"1 to {MAX_COUNTRIES} required" if required else f"at most {MAX_COUNTRIES}"))
    countries: list[str] = []
    for index, code in enumerate(codes):
        if len(code) != 2 or not code.isascii() or not code.isalpha():
            problems.append(FieldViolation(f"{field}[{index}]", "not an ISO 3166-1 alpha-2 code"))
        elif code.upper() not in countries:
            countries.append(code.upper())
    return countries


class _Where:
    """A listing's filter: its conditions (joined by AND) and their parameters, in order."""

    def __init__(self, *conditions: str) -> None:
        self.conditions = list(conditions)
        self.params: list[Any] = []

    def add(self, condition: str, *params: Any) -> None:
        self.conditions.append(condition)
        self.params.extend(params)

    def __str__(self) -> str:
        return " AND ".join(self.conditions)


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
        create_time=timestamp(row["created_at"]), resolved_by=row["resolved_by"] or "",
        resolve_time=timestamp(row["resolved_at"]), note=row["note"])


def _block(row: dict[str, Any]) -> fraud_types_pb2.Block:
    return fraud_types_pb2.Block(
        block_id=str(row["block_id"]), kind=_KIND_NUMBERS[row["kind"]], value=row["value"],
        reason=row["reason"], created_by=row["created_by"],
        create_time=timestamp(row["created_at"]), expire_time=timestamp(row["expire_at"]))


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




class FraudScoringServicer(fraud_scoring_service_pb2_grpc.FraudScoringServiceServicer):
    """Internal scoring (fraud_svc/scoring.py) and the rejection of blocked ledger votes."""

    def __init__(self, config: FraudConfig, pool: Pool, state: FeatureState, intel: IpIntel,
                 blocklist: BlocklistCache, scorer: Scorer) -> None:
        self._pool = pool
        self._scoring = Scoring(config, pool, state, intel, blocklist, scorer)

    def drain(self) -> None:
        self._scoring.drain()

    async def ScoreVotes(self, request: scoring_pb.ScoreVotesRequest,
                         context: grpc.aio.ServicerContext[Any, Any],
                         ) -> scoring_pb.ScoreVotesResponse:
        response = scoring_pb.ScoreVotesResponse()
        await self._scoring.score_into(request.votes, response.scores)
        return response

    async def ScoreVoteStream(  # type: ignore[override]  # writes with context.write()
            self, request_iterator: AsyncIterator[scoring_pb.ScoreVoteStreamRequest],
            context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """Each batch scored in a task of its own (as concurrent calls would be), answered as
        it finishes; a batch's refusal is its answer, the stream goes on."""
        writing = asyncio.Lock()  # one write at a time on a call
        scoring: set[asyncio.Task[None]] = set()

        async def answer(request: scoring_pb.ScoreVoteStreamRequest) -> None:
            response = scoring_pb.ScoreVoteStreamResponse(batch=request.batch)
            try:
                await self._scoring.score_into(request.votes, response.scores)
            except ApiError as error:
                del response.scores[:]
                response.error.CopyFrom(error.to_proto())
            async with writing:
                await context.write(response)

        requests = aiter(request_iterator)
        drained = asyncio.ensure_future(self._scoring.draining.wait())
        try:
            while True:
                received = asyncio.ensure_future(anext(requests))
                await asyncio.wait((received, drained), return_when=asyncio.FIRST_COMPLETED)
                if not received.done():
                    received.cancel()
                    break
                try:
                    request = received.result()
                except StopAsyncIteration:
                    break
                task = asyncio.create_task(answer(request))
                scoring.add(task)
                task.add_done_callback(scoring.discard)
            await asyncio.gather(*scoring)
        finally:
            drained.cancel()
            for task in scoring:
                task.cancel()

    async def RejectLedgerVotes(
            self, request: scoring_pb.RejectLedgerVotesRequest,
            context: grpc.aio.ServicerContext[Any, Any]) -> scoring_pb.RejectLedgerVotesResponse:
        problems = []
        if not 1 <= len(request.votes) <= MAX_PAGE:
            problems.append(FieldViolation("votes", f"1 to {MAX_PAGE} required"))
        if not request.rescored_by:
            problems.append(FieldViolation("rescored_by", "required"))
        for index, block in enumerate(request.votes):
            at = f"votes[{index}]"
            if not ids.is_id(block.vote_id):
                problems.append(FieldViolation(f"{at}.vote_id", "must be a UUID"))
            if not block.ref or not block.user_id:
                problems.append(FieldViolation(at, "ref and user_id required"))
            if ids.canonical(block.round_id) != block.round_id:
                problems.append(FieldViolation(f"{at}.round_id", "must be a UUID, lower case"))
            if block.score.action != fraud_types_pb2.FRAUD_ACTION_BLOCK:
                problems.append(FieldViolation(f"{at}.score.action", "must be BLOCK"))
        if problems:
            raise invalid_argument(*problems)
        finalized, rejected = await moderation.reject_ledger_votes(
            self._pool, request.votes, caller=current_principal().subject,
            rescored_by=request.rescored_by)
        return scoring_pb.RejectLedgerVotesResponse(
            finalized_round_ids=sorted(finalized), rejected=rejected)


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
            rows = await store.fetch_all(conn, sql, [*params, size + 1])
        if len(rows) <= size:
            return rows, ""
        return rows[:size], _encode_token(position(rows[size - 1]))

    async def ListReviews(self, request: pb.ListReviewsRequest,
                          context: grpc.aio.ServicerContext[Any, Any]) -> pb.ListReviewsResponse:
        size = _page_size(request.page_size)
        after = _decode_token(request.page_token, int)
        where = _Where("true")
        if request.round_id:
            where.add("r.round_id = %s", request.round_id)
        if request.user_id:
            where.add("r.user_id = %s", request.user_id)
        if request.state:
            names = {number: name for name, number in _STATES.items()}
            if request.state not in names:
                raise invalid_argument(FieldViolation("state", "unknown state"))
            where.add("r.state = %s", names[request.state])
        if after is not None:
            where.add("r.seq > %s", after[0])
        rows, token = await self._page(
            store.LIST_REVIEWS.format(where=where), where.params, size,
            lambda last: [int(last["seq"])])
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
        request_id = ids.parse(request.request_id, "request_id")
        review_id = ids.parse(request.review_id, "review_id")
        decision = "APPROVE" if request.decision == pb.REVIEW_DECISION_APPROVE else "REJECT"
        scope = "VOTE" if request.scope == pb.REVIEW_SCOPE_VOTE else "USER_ROUND"
        actor = current_principal().subject

        async def resolve(conn: Conn) -> pb.ResolveReviewResponse:
            resolved, affected = await moderation.resolve_review(
                conn, review_id=review_id, decision=decision, scope=scope, note=request.note,
                request_id=request_id, actor=actor)
            return pb.ResolveReviewResponse(review=_review(resolved), affected_votes=affected)

        return await self._once("ResolveReview", request.request_id, request,
                                pb.ResolveReviewResponse, resolve)

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
        request_id = ids.parse(request.request_id, "request_id")
        actor = current_principal().subject
        created: dict[str, Any] | None = None

        async def create(conn: Conn) -> pb.CreateBlockResponse:
            nonlocal created
            created = await moderation.create_block(
                conn, kind=kind, value=value, reason=reason, expire_at=expire_at,
                request_id=request_id, actor=actor)
            return pb.CreateBlockResponse(block=_block(created))

        response = await self._once("CreateBlock", request.request_id, request,
                                    pb.CreateBlockResponse, create)
        if created is not None:  # not for a retry: the block may have been deleted since
            if kind == "USER":
                until = {value: int(expire_at.timestamp() * 1000)} if expire_at else None
                await self._state.set_blocked([value], until_ms=until)
            await self._blocklist.reload()
        return response

    async def DeleteBlock(self, request: pb.DeleteBlockRequest,
                          context: grpc.aio.ServicerContext[Any, Any]) -> pb.DeleteBlockResponse:
        problems = []
        if not request.block_id:
            problems.append(FieldViolation("block_id", "required"))
        if not request.request_id:
            problems.append(FieldViolation("request_id", "required"))
        if problems:
            raise invalid_argument(*problems)
        block_id = ids.parse(request.block_id, "block_id")
        request_id = ids.parse(request.request_id, "request_id")
        actor = current_principal().subject
        deleted: dict[str, Any] | None = None

        async def delete(conn: Conn) -> pb.DeleteBlockResponse:
            nonlocal deleted
            deleted = await moderation.delete_block(conn, block_id=block_id,
                                                    request_id=request_id, actor=actor)
            return pb.DeleteBlockResponse(block=_block(deleted))

        response = await self._once("DeleteBlock", request.request_id, request,
                                    pb.DeleteBlockResponse, delete)
        if deleted is not None:  # not for a retry: a new block may have been made since
            if deleted["kind"] == "USER":
                await self._state.set_blocked([deleted["value"]], blocked=False)
            await self._blocklist.reload()
        return response

    async def ListBlocks(self, request: pb.ListBlocksRequest,
                         context: grpc.aio.ServicerContext[Any, Any]) -> pb.ListBlocksResponse:
        size = _page_size(request.page_size)
        after = _decode_token(request.page_token, str, str)
        where = _Where("deleted_at IS NULL", "(expire_at IS NULL OR expire_at > now())")
        if request.kind:
            kind = _KINDS.get(request.kind)
            if kind is None:
                raise invalid_argument(FieldViolation("kind", "unknown kind"))
            where.add("kind = %s", kind)
        if after is not None:
            where.add("(created_at, block_id) < (%s::timestamptz, %s::uuid)", *after)
        rows, token = await self._page(
            store.LIST_BLOCKS.format(where=where), where.params, size,
            lambda last: [last["created_at"].isoformat(), str(last["block_id"])])
        return pb.ListBlocksResponse(blocks=[_block(r) for r in rows], next_page_token=token)

    async def ListAuditEntries(self, request: pb.ListAuditEntriesRequest,
                               context: grpc.aio.ServicerContext[Any, Any],
                               ) -> pb.ListAuditEntriesResponse:
        size = _page_size(request.page_size)
        after = _decode_token(request.page_token, int)
        where = _Where()
        where.add("action LIKE %s", ACTION_PREFIX + "%")
        if request.user_id:
            where.add("details ->> 'user_id' = %s", request.user_id)
        if request.round_id:
            where.add("details ->> 'round_id' = %s", request.round_id)
        if request.actor:
            where.add("actor_subject = %s", request.actor)
        if request.action:
            where.add("action = %s", ACTION_PREFIX + request.action)
        start = request.start_time.ToDatetime(UTC) if request.HasField("start_time") else None
        end = request.end_time.ToDatetime(UTC) if request.HasField("end_time") else None
        if start is not None and end is not None and start > end:
            raise invalid_argument(FieldViolation("start_time", "after end_time"))
        if start is not None:
            where.add("recorded_at >= %s", start)
        if end is not None:
            where.add("recorded_at < %s", end)
        if after is not None:
            where.add("audit_id < %s", after[0])
        rows, token = await self._page(
            store.LIST_AUDIT_ENTRIES.format(where=where), where.params, size,
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
        countries = _countries(request.countries, "countries", problems, required=False)
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
        return await self._exemption(
            "GrantTravellerExemption", request, pb.GrantTravellerExemptionResponse,
            lambda conn, actor: moderation.grant_traveller(
                conn, user_id=user_id, countries=countries, expire_at=expire_at, note=note,
                request_id=request.request_id, actor=actor))

    async def RevokeTravellerExemption(
            self, request: pb.RevokeTravellerExemptionRequest,
            context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.RevokeTravellerExemptionResponse:
        if not request.user_id:
            raise invalid_argument(FieldViolation("user_id", "required"))
        return await self._exemption(
            "RevokeTravellerExemption", request, pb.RevokeTravellerExemptionResponse,
            lambda conn, actor: moderation.revoke_traveller(
                conn, user_id=request.user_id, request_id=request.request_id, actor=actor))

    async def _exemption(self, method: str, request: Any, response_type: type[ResponseT],
                         change: Callable[[Conn, str], Awaitable[dict[str, Any]]],
                         ) -> ResponseT:
        """A validated grant or revoke of a traveller exemption: `change(conn, actor)` once
        per request id; the response carries the exemption it returns."""
        require_request_id(request.request_id)
        actor = current_principal().subject

        async def perform(conn: Conn) -> ResponseT:
            exemption = _traveller(await change(conn, actor))
            return response_type(exemption=exemption)  # type: ignore[call-arg]  # both have it

        return await self._once(method, request.request_id, request, response_type, perform,
                                reload=True)

    async def ListTravellerExemptions(
            self, request: pb.ListTravellerExemptionsRequest,
            context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.ListTravellerExemptionsResponse:
        size = _page_size(request.page_size)
        after = _decode_token(request.page_token, str)
        where = _Where("(expire_at IS NULL OR expire_at > now())")
        if after is not None:
            where.add("user_id > %s", after[0])
        rows, token = await self._page(
            store.LIST_TRAVELLERS.format(where=where), where.params, size,
            lambda last: [last["user_id"]])
        return pb.ListTravellerExemptionsResponse(
            exemptions=[_traveller(r) for r in rows], next_page_token=token)

    # -- per-show fraud policy -----------------------------------------------------------

    async def SetFraudPolicy(self, request: pb.SetFraudPolicyRequest,
                             context: grpc.aio.ServicerContext[Any, Any],
                             ) -> pb.SetFraudPolicyResponse:
        problems = []
        show_id = ids.canonical(request.show_id) or ""
        if not show_id:
            problems.append(FieldViolation("show_id", "must be a show id (UUID)"))
        block, review = request.block_threshold, request.review_threshold
        if not (math.isfinite(block) and math.isfinite(review)
                and 0 < review <= block <= 1):
            problems.append(FieldViolation(
                "review_threshold", "need 0 < review_threshold <= block_threshold <= 1"))
        countries = _countries(request.allowed_countries, "allowed_countries", problems,
                               required=True)
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
            return pb.SetFraudPolicyResponse(policy=_policy(await moderation.set_policy(
                conn, show_id=show_id, block=block, review=review, countries=countries,
                note=note, request_id=request.request_id, actor=actor, scoring=scoring,
                foreign_country=geo["foreign_country"],
                location_mismatch=geo["location_mismatch"])))

        return await self._once("SetFraudPolicy", request.request_id, request,
                                pb.SetFraudPolicyResponse, set_policy, reload=True)

    async def GetFraudPolicy(self, request: pb.GetFraudPolicyRequest,
                             context: grpc.aio.ServicerContext[Any, Any],
                             ) -> pb.GetFraudPolicyResponse:
        show_id = ids.parse(request.show_id, "show_id")
        async with self._pool.connection() as conn:
            row = await fetch_one(conn, store.POLICY, [show_id])
        if row is None:
            raise ApiError(grpc.StatusCode.NOT_FOUND, "FRAUD_POLICY_NOT_FOUND",
                           f"show {show_id} has no fraud policy: the defaults apply")
        return pb.GetFraudPolicyResponse(policy=_policy(row))

    async def _once(self, method: str, request_id: str, request: Any,
                    response_type: type[ResponseT],
                    perform: Callable[[Conn], Awaitable[ResponseT]], *,
                    reload: bool = False) -> ResponseT:
        """`perform` once per request id (runtime/idempotency.py), in one transaction with
        its audit entry; a refusal it raises changes nothing and is not remembered. `reload`:
        then reload the blocklist (which the change, or the retried one, is in)."""
        async with self._pool.connection() as conn, conn.transaction():
            response = await once(conn, f"televote.fraud.v1.FraudReviewService/{method}",
                                  request_id, request, response_type, lambda: perform(conn))
        if reload:
            await self._blocklist.reload()
        return response


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
        updated_by=row["updated_by"], update_time=timestamp(row["updated_at"]),
        scoring=_enum(_SCORINGS, row["scoring"]),  # type: ignore[arg-type]
        foreign_country=_enum(_ENFORCEMENTS, row["foreign_country"]),  # type: ignore[arg-type]
        location_mismatch=_enum(_ENFORCEMENTS,  # type: ignore[arg-type]
                                row["location_mismatch"]))


def _traveller(row: dict[str, Any]) -> fraud_types_pb2.TravellerExemption:
    return fraud_types_pb2.TravellerExemption(
        user_id=row["user_id"], countries=list(row["countries"] or []),
        expire_time=timestamp(row["expire_at"]), note=row["reason"], granted_by=row["created_by"],
        grant_time=timestamp(row["created_at"]))


def _entry(row: dict[str, Any]) -> fraud_types_pb2.AuditEntry:
    details = row["details"] or {}
    attributes = {key: attribute_text(value)
                  for key, value in (details.get("attributes") or {}).items()}
    if row["reason"]:
        attributes.setdefault("reason", row["reason"])
    return fraud_types_pb2.AuditEntry(
        entry_id=str(row["audit_id"]), time=timestamp(row["recorded_at"]),
        actor=row["actor_subject"],
        action=str(row["action"]).removeprefix(ACTION_PREFIX),
        user_id=str(details.get("user_id", "")), round_id=str(details.get("round_id", "")),
        target_id=str(details.get("target_id", row["target"])), attributes=attributes,
        request_id=str(details.get("request_id", "")))
