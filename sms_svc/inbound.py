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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import grpc

from runtime.coalesce import Coalescer
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
from sms_svc.store import (
    Answer,
    Binding,
    Claim,
    ClaimRow,
    ContentMismatchError,
    OutcomeRow,
    PendingReply,
    SmsStore,
    Target,
)
from sms_svc.votes import VoteSender, VoteUndecidedError, sms_vote

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


#: Called with the replies of outcomes just recorded (sms_svc/outbox.py sends them).
RepliesRecorded = Callable[[list[PendingReply]], None]


def unavailable(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE", message,
                    retry_after_seconds=1.0)


@dataclass
class _Message:
    """One message on its way through a batch."""

    sms: InboundSms
    msisdn: str
    binding: Binding
    number: int | None
    language: str
    pseudonym: str
    claim: Claim | None = None
    #: Under the lease, someone may have decided meanwhile: read the answer first.
    maybe_decided: bool = False


class InboundProcessor:
    """Turns carrier messages into outcomes, once each.

    A batch of messages (ReceiveInboundSmsBatch, or one ReceiveInboundSms) goes through each
    step together: one statement records all first receipts, one Redis round trip takes
    all leases, their votes share SubmitVotes calls, one statement records all outcomes
    (with their replies), and concurrent batches share these with each other too.
    """

    def __init__(self, store: SmsStore, redis: RedisClient, votes: VoteSender, *,
                 secret: bytes, default_language: str, lease_ms: int, max_age_ms: int,
                 deadline_ms: float, replies_recorded: RepliesRecorded | None = None) -> None:
        self._store = store
        self._leases = Leases(redis, lease_ms)
        self._votes = votes
        self._secret = secret
        self._default_language = default_language
        self._max_age_ms = max_age_ms
        self._deadline_ms = deadline_ms
        self._replies_recorded = replies_recorded

    async def receive(self, sms: InboundSms) -> Answer:
        (result,) = await self.receive_many([sms])
        if isinstance(result, ApiError):
            raise result
        return result

    async def receive_many(self, batch: Sequence[InboundSms]) -> list[Answer | ApiError]:
        """Each message's outcome (the first recorded for it), or why it has none."""
        results: list[Answer | ApiError | None] = [None] * len(batch)
        deadline = time.monotonic() + self._deadline_ms / 1000
        messages: dict[int, _Message] = {}
        for index, sms in enumerate(batch):
            try:
                messages[index] = await self._check(sms)
            except ApiError as error:
                results[index] = error
        claims = await self._store.claim([ClaimRow(
            str(uuid.uuid4()), m.sms.carrier, m.sms.carrier_message_id,
            content_hash(m.msisdn, m.sms.short_code, m.sms.text), m.pseudonym,
            m.sms.short_code, m.sms.text, m.language, m.sms.received_at,
            m.sms.gateway_received_at, m.msisdn) for m in messages.values()])
        for index, claim in zip(list(messages), claims, strict=True):
            if isinstance(claim, ContentMismatchError):
                results[index] = ApiError(
                    grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_MISMATCH",
                    "this carrier message id came before with another sender, short code or "
                    "text")
                del messages[index]
            elif isinstance(claim, BaseException):
                raise claim
            else:
                messages[index].claim = claim
                messages[index].maybe_decided = not claim.first
        # Redeliveries: most often decided long ago.
        await self._answer_decided(messages, results)
        keys = [(m.sms.carrier, m.sms.carrier_message_id) for m in messages.values()]
        taken = await self._leases.take(keys)
        waiting = {index: messages.pop(index)
                   for index, held in zip(list(messages), taken, strict=True) if not held}
        try:
            # Under the lease, no other copy decides meanwhile; one may have decided before.
            await self._answer_decided(messages, results)
            decided = await self._decide(messages, results)
        finally:
            self._leases.release([key for key, held in zip(keys, taken, strict=True) if held])
        if decided and self._replies_recorded is not None:
            self._replies_recorded(decided)
        if waiting:  # another copy of these is being decided: its answer is theirs
            answers = await asyncio.gather(*(self._await_other_copy(m, deadline)
                                             for m in waiting.values()))
            for index, answer in zip(waiting, answers, strict=True):
                results[index] = answer
        assert all(result is not None for result in results)
        return results  # type: ignore[return-value]

    async def _answer_decided(self, messages: dict[int, _Message],
                              results: list[Answer | ApiError | None]) -> None:
        """Answer (and drop) the messages already decided."""
        ids = {m.claim.message_id: index for index, m in messages.items()
               if m.maybe_decided and m.claim is not None}
        for message_id, answer in (await self._store.answers(list(ids))).items():
            results[ids[message_id]] = answer
            del messages[ids[message_id]]

    async def _await_other_copy(self, message: _Message, deadline: float) -> Answer | ApiError:
        """A copy whose lease another holds: its outcome once recorded; or the lease once
        free (the holder died or gave up undecided), then decided here."""
        pause = 0.01
        key = (message.sms.carrier, message.sms.carrier_message_id)
        while True:
            if time.monotonic() + pause >= deadline:
                return unavailable("the message is being decided; redeliver it")
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.2)
            assert message.claim is not None
            answers = await self._store.answers([message.claim.message_id])
            if answers:
                return answers[message.claim.message_id]
            (taken,) = await self._leases.take([key])
            if taken:
                break
        results: list[Answer | ApiError | None] = [None]
        try:
            message.maybe_decided = True
            one = {0: message}
            await self._answer_decided(one, results)
            decided = await self._decide(one, results)
        finally:
            self._leases.release([key])
        if decided and self._replies_recorded is not None:
            self._replies_recorded(decided)
        assert results[0] is not None
        return results[0]

    async def _check(self, sms: InboundSms) -> _Message:
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
        parsed = parse(sms.text)
        return _Message(sms, msisdn, binding, parsed.number,
                        parsed.language or self._default_language,
                        pseudonym(self._secret, msisdn))

    async def _decide(self, messages: dict[int, _Message],
                      results: list[Answer | ApiError | None]) -> list[PendingReply]:
        """Decide the messages (whose leases are held): vote, record the outcomes. Fills in
        `results`; returns the replies of the outcomes recorded here."""
        outcomes: dict[int, tuple[Outcome, Target | None]] = {}
        voting: dict[int, Target] = {}
        for index, m in messages.items():
            assert m.claim is not None
            number = m.number
            if number is None:
                outcomes[index] = (Outcome.INVALID_FORMAT, None)
                continue
            target = (await self._store.target(m.binding.show_id, m.claim.received_at, number)
                      if is_valid_number(number) else None)
            if target is None or not target.sms_open:
                # No such number in any round: say so, rather than "closed".
                outcomes[index] = ((Outcome.UNKNOWN_CONTESTANT, None)
                                   if target is None and not is_valid_number(number)
                                   else (Outcome.CLOSED, target))
            elif target.contestant_id is None:
                outcomes[index] = (Outcome.UNKNOWN_CONTESTANT, target)
            else:
                voting[index] = target
        ballots = []
        for index, target in voting.items():
            m = messages[index]
            assert m.claim is not None and target.contestant_id is not None
            ballots.append(sms_vote(
                request_id=str(uuid.uuid5(REQUEST_ID_NAMESPACE,
                                          f"{m.sms.carrier}:{m.sms.carrier_message_id}")),
                user_id="sms:" + m.pseudonym, round_id=target.round_id,
                contestant_id=target.contestant_id, received_at=m.claim.received_at))
        votes = await self._votes.vote(ballots)
        vote_ids: dict[int, str] = {}
        for index, result in zip(voting, votes, strict=True):
            if isinstance(result, VoteUndecidedError):
                results[index] = unavailable(f"the vote could not be recorded ({result}); "
                                             "redeliver")
            elif result.ok:
                outcomes[index] = (Outcome.COUNTED, voting[index])
                vote_ids[index] = result.accepted.vote_id
            elif (refusal := _REFUSALS.get(result.error.reason)) is not None:
                outcomes[index] = (refusal, voting[index])
            else:
                log.error("vote_svc refused an SMS vote unexpectedly: %s %s",
                          result.error.reason, result.error.message)
                results[index] = unavailable("the vote could not be recorded; redeliver")
        rows = []
        for index, (outcome, target) in outcomes.items():
            m = messages[index]
            assert m.claim is not None
            counted = outcome is Outcome.COUNTED
            rows.append(OutcomeRow(
                m.claim.message_id, outcome.value, m.number or 0, m.binding.show_id,
                target.episode_id if target else None, target.round_id if target else None,
                vote_ids.get(index), counted, m.binding.price_micros if counted else 0,
                m.binding.currency_code,
                reply(outcome, m.language, number=m.number or 0,
                      name=target.contestant_name if target else "",
                      short_code=m.sms.short_code), m.language))
        replies = []
        for index, recorded in zip(outcomes, await self._store.record(rows), strict=True):
            if isinstance(recorded, BaseException):
                raise recorded
            answer, mine = recorded
            results[index] = answer
            if mine:
                m = messages[index]
                replies.append(PendingReply(answer.message_id, m.sms.carrier,
                                            m.sms.carrier_message_id, m.msisdn,
                                            m.sms.short_code, answer.reply_text, 0))
        return replies


class Leases:
    """One replica at a time decides a message: a lease in Redis per (carrier, message id),
    taken and released for many messages in one pipelined round trip (concurrent batches'
    share it too). A replica killed holding one is taken over when it ends."""

    def __init__(self, redis: RedisClient, lease_ms: int) -> None:
        self._redis = redis
        self._lease_ms = lease_ms
        self._token = secrets.token_hex(8)  # this replica's: a lease it holds names it
        self._ops: Coalescer[tuple[bool, str], bool] = Coalescer(self._run, max_batch=2000)
        self._releasing: set[asyncio.Future[bool]] = set()

    @staticmethod
    def _key(carrier: str, carrier_message_id: str) -> str:
        return f"tv:sms:lease:{carrier}:{carrier_message_id}"

    async def take(self, messages: list[tuple[str, str]]) -> list[bool]:
        """Whether each lease was free and is now held."""
        if not messages:
            return []
        return list(await asyncio.gather(*(self._ops.submit((True, self._key(*m)))
                                           for m in messages)))

    def release(self, messages: list[tuple[str, str]]) -> None:
        """Let the leases go, with the next round trip (the callers' answers do not wait)."""
        for message in messages:
            future = self._ops.submit((False, self._key(*message)), wait_ms=2.0)
            self._releasing.add(future)
            future.add_done_callback(self._released)

    def _released(self, future: asyncio.Future[bool]) -> None:
        self._releasing.discard(future)
        if not future.cancelled() and future.exception() is not None:
            # The lease ends by itself; a copy waiting for it decides after that.
            log.warning("releasing an SMS lease failed: %r", future.exception())

    async def _run(self, ops: list[tuple[bool, str]]) -> list[bool]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for take, key in ops:
                if take:
                    pipe.set(key, self._token, nx=True, px=self._lease_ms)
                else:
                    # Only our own lease: after a pause longer than the lease, another
                    # replica holds it.
                    pipe.eval(_RELEASE, 1, key, self._token)
            replies = await pipe.execute()
        return [bool(reply) for reply in replies]


def now() -> datetime:
    return datetime.now(UTC)
