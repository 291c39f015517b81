"""One carrier message, from its first receipt to its one outcome.

1. Refuse bad input before anything is written (wrong carrier, unknown short code, a number
   that is not Cambodian, empty or over-long text, a gateway time the edge's clock denies).
2. Record the first receipt (sms_messages); a redelivery finds it, and is refused if its
   content differs. Its time, when the edge received the first delivery, judges lines-open
   for every redelivery.
3. One replica at a time decides the outcome (a lease in Redis, so 200 concurrent copies
   make one vote attempt and the others wait for its answer): parse, find the round and the
   contestant, vote through vote_svc (idempotent on a request id derived from the carrier
   and its message id), and record the outcome once (sms_outcomes). Only COUNTED is charged.
4. The first outcome is the answer to every redelivery. A crash anywhere before the outcome
   is recorded leaves the message undecided; the carrier's redelivery decides it, and the
   vote, if it was already recorded, is found by its request id instead of counted again.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc

from runtime.errors import ApiError, FieldViolation, invalid_argument
from runtime.gateway_time import gateway_time_problem
from runtime.storage import RedisClient
from sms_svc.parsing import (
    InvalidMsisdnError,
    content_hash,
    is_valid_number,
    normalise_msisdn,
    parse,
    pseudonym,
)
from sms_svc.replies import Outcome, reply
from sms_svc.store import Answer, Binding, ContentMismatchError, SmsStore
from sms_svc.votes import VoteSender, VoteUndecidedError

log = logging.getLogger(__name__)

MAX_TEXT = 1600
MAX_MESSAGE_ID = 128
#: Namespace of the vote request ids derived from (carrier, carrier message id).
REQUEST_ID_NAMESPACE = uuid.UUID("6f0f1b9e-3c55-4a8e-9d64-0b5f4f6a1255")

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

#: vote_svc's refusal reasons -> the message's outcome.
_REFUSALS = {
    "VOTING_CLOSED": Outcome.CLOSED, "VOTING_NOT_OPEN": Outcome.CLOSED,
    "ROUND_NOT_FOUND": Outcome.CLOSED, "INVALID_CONTESTANT": Outcome.UNKNOWN_CONTESTANT,
    "RATE_LIMITED": Outcome.RATE_LIMITED, "FRAUD_BLOCKED": Outcome.BLOCKED,
}


@dataclass(frozen=True)
class InboundSms:
    """A carrier's message as it reached the edge."""

    carrier: str  # SMART, CELLCARD, METFONE
    carrier_message_id: str
    msisdn: str
    short_code: str
    text: str
    received_at: datetime  # by the edge
    gateway_received_at: datetime | None = None


#: Sends a reply (carrier, carrier message id, msisdn, short code, text).
ReplySender = Callable[..., Coroutine[Any, Any, bool]]


def unavailable(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE", message,
                    retry_after_seconds=1.0)


class InboundProcessor:
    """Turns carrier messages into outcomes, once each."""

    def __init__(self, store: SmsStore, redis: RedisClient, votes: VoteSender, *,
                 secret: bytes, default_language: str, lease_ms: int, max_age_ms: int,
                 deadline_ms: float, send_reply: ReplySender | None = None) -> None:
        self._store = store
        self._redis = redis
        self._votes = votes
        self._secret = secret
        self._default_language = default_language
        self._lease_ms = lease_ms
        self._max_age_ms = max_age_ms
        self._deadline_ms = deadline_ms
        self._send_reply = send_reply
        self._replies: set[asyncio.Task[bool]] = set()

    async def receive(self, sms: InboundSms) -> Answer:
        msisdn, binding = await self._check(sms)
        parsed = parse(sms.text)
        language = parsed.language or self._default_language
        try:
            claim = await self._store.claim(
                carrier=sms.carrier, carrier_message_id=sms.carrier_message_id,
                content=content_hash(msisdn, sms.short_code, sms.text),
                pseudonym=pseudonym(self._secret, msisdn), msisdn=msisdn,
                short_code=sms.short_code, text=sms.text, language=language,
                received_at=sms.received_at, gateway_received_at=sms.gateway_received_at)
        except ContentMismatchError:
            raise ApiError(grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_MISMATCH",
                           "this carrier message id came before with another sender, short "
                           "code or text") from None
        deadline = time.monotonic() + self._deadline_ms / 1000
        lease_key = f"tv:sms:lease:{sms.carrier}:{sms.carrier_message_id}"
        token = secrets.token_hex(8)
        if not claim.first:  # a redelivery: most often decided long ago
            answer = await self._store.answer(claim.message_id)
            if answer is not None:
                return answer
        pause, waited = 0.01, False
        while True:
            if await self._redis.set(lease_key, token, nx=True, px=self._lease_ms):
                break
            waited = True
            if time.monotonic() + pause >= deadline:
                raise unavailable("the message is being decided; redeliver it")
            await asyncio.sleep(pause)  # another copy of it is being decided
            pause = min(pause * 2, 0.2)
        try:
            # Under the lease, no other copy decides meanwhile; one may have decided before
            # (unless this is the first receipt and nobody held the lease).
            answer = (await self._store.answer(claim.message_id)
                      if waited or not claim.first else None)
            if answer is not None:
                return answer
            answer, mine = await self._decide(sms, binding, claim.message_id, claim.received_at,
                                              language, parsed.number, msisdn)
        finally:
            await self._release(lease_key, token)
        if mine and self._send_reply is not None:
            self._reply(sms, msisdn, answer.reply_text)
        return answer

    async def _check(self, sms: InboundSms) -> tuple[str, Binding]:
        bad: list[FieldViolation] = []
        if not sms.carrier_message_id or len(sms.carrier_message_id) > MAX_MESSAGE_ID:
            bad.append(FieldViolation("carrier_message_id", f"1 to {MAX_MESSAGE_ID} characters"))
        msisdn = ""
        try:
            msisdn = normalise_msisdn(sms.msisdn)
        except InvalidMsisdnError as error:
            bad.append(FieldViolation("msisdn", str(error)))
        if not sms.text.strip():
            bad.append(FieldViolation("text", "is empty"))
        elif len(sms.text) > MAX_TEXT:
            bad.append(FieldViolation("text", f"at most {MAX_TEXT} characters"))
        if not sms.short_code:
            bad.append(FieldViolation("short_code", "is required"))
        if sms.gateway_received_at is not None:
            problem = gateway_time_problem(sms.gateway_received_at, sms.received_at,
                                           max_age_ms=self._max_age_ms)
            if problem is not None:
                bad.append(FieldViolation("received_at", problem))
        if bad:
            raise invalid_argument(*bad)
        binding = await self._store.binding(sms.carrier, sms.short_code)
        if binding is None:
            raise ApiError(grpc.StatusCode.NOT_FOUND, "SHORT_CODE_NOT_FOUND",
                           f"short code {sms.short_code} is not televote's on this carrier")
        return msisdn, binding

    async def _decide(self, sms: InboundSms, binding: Binding, message_id: str,
                      received_at: datetime, language: str, number: int | None,
                      msisdn: str) -> tuple[Answer, bool]:
        def record(outcome: Outcome, *, episode_id: str | None = None,
                   round_id: str | None = None, vote_id: str | None = None,
                   name: str = "") -> Awaitable[tuple[Answer, bool]]:
            return self._store.record(
                message_id, outcome=outcome.value, contestant_number=number or 0,
                show_id=binding.show_id, episode_id=episode_id, round_id=round_id,
                vote_id=vote_id, price_micros=binding.price_micros,
                currency_code=binding.currency_code,
                reply_text=reply(outcome, language, number=number or 0, name=name,
                                 short_code=sms.short_code), language=language)

        if number is None:
            return await record(Outcome.INVALID_FORMAT)
        target = (await self._store.target(binding.show_id, received_at, number)
                  if is_valid_number(number) else None)
        if target is None or not target.sms_open:
            if target is None and not is_valid_number(number):
                # No such number in any round: say so, rather than "closed".
                return await record(Outcome.UNKNOWN_CONTESTANT)
            return await record(Outcome.CLOSED)
        if target.contestant_id is None:
            return await record(Outcome.UNKNOWN_CONTESTANT, episode_id=target.episode_id,
                                round_id=target.round_id)
        try:
            result = await self._votes.vote(
                request_id=str(uuid.uuid5(REQUEST_ID_NAMESPACE,
                                          f"{sms.carrier}:{sms.carrier_message_id}")),
                user_id="sms:" + pseudonym(self._secret, msisdn), round_id=target.round_id,
                contestant_id=target.contestant_id, received_at=received_at)
        except VoteUndecidedError as error:
            raise unavailable(f"the vote could not be recorded ({error}); redeliver") from None
        where = {"episode_id": target.episode_id, "round_id": target.round_id,
                 "name": target.contestant_name}
        if result.ok:
            return await record(Outcome.COUNTED, vote_id=result.accepted.vote_id, **where)
        outcome = _REFUSALS.get(result.error.reason)
        if outcome is None:
            log.error("vote_svc refused an SMS vote unexpectedly: %s %s",
                      result.error.reason, result.error.message)
            raise unavailable("the vote could not be recorded; redeliver")
        return await record(outcome, **where)

    async def _release(self, key: str, token: str) -> None:
        # Only our own lease: after a pause longer than the lease, another replica owns it.
        await self._redis.eval(_RELEASE, 1, key, token)

    def _reply(self, sms: InboundSms, msisdn: str, text: str) -> None:
        assert self._send_reply is not None
        task = asyncio.get_running_loop().create_task(self._send_reply(
            carrier=sms.carrier, carrier_message_id=sms.carrier_message_id, msisdn=msisdn,
            short_code=sms.short_code, text=text))
        self._replies.add(task)
        task.add_done_callback(self._replies.discard)


def now() -> datetime:
    return datetime.now(UTC)
