"""Carrier messages, from their first receipt to their one outcome each (one message, or a
carrier's batch: every step below is taken once for all the messages of a batch).

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
from google.protobuf.timestamp_pb2 import Timestamp

from runtime import ids
from runtime.coalesce import Coalescer
from runtime.errors import ApiError, FieldViolation, invalid_argument
from runtime.gateway_time import gateway_time_problem
from runtime.storage import OUTAGES, RedisClient
from runtime.vote_results import refusal
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
    Round,
    SmsStore,
    Target,
)
from sms_svc.votes import VoteSender, VoteUndecidedError, sms_vote

log = logging.getLogger(__name__)

MAX_TEXT = 1600
MAX_MESSAGE_ID = 128
#: Namespace of the vote request ids derived from (carrier, carrier message id).
REQUEST_ID_NAMESPACE = uuid.UUID("6f0f1b9e-3c55-4a8e-9d64-0b5f4f6a1255")

#: Takes ("1") or releases ("0") each key's lease (ARGV[3]: one character per key, not one
#: argument each): a release deletes only this replica's own (after a pause longer than the
#: lease, another replica holds it).
_LEASES = """
local held = {}
for i, key in ipairs(KEYS) do
    if string.sub(ARGV[3], i, i) == '1' then
        held[i] = redis.call('SET', key, ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0
    else
        if redis.call('GET', key) == ARGV[1] then redis.call('DEL', key) end
        held[i] = 0
    end
end
return held
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


def storage_unavailable(error: BaseException) -> ApiError:
    """PostgreSQL or Redis failed under a message: the carrier redelivers it. Whatever was
    recorded of it is found again, never counted twice: its receipt by (carrier, message
    id), its vote by its request id, its outcome by its message."""
    return ApiError(grpc.StatusCode.UNAVAILABLE, "STORAGE_UNAVAILABLE",
                    f"the message could not be recorded ({type(error).__name__}); redeliver "
                    "it", retry_after_seconds=1.0)


@dataclass(slots=True)
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
        self._reading_ahead: set[asyncio.Future[Round | None]] = set()

    async def receive(self, sms: InboundSms) -> Answer:
        (result,) = await self.receive_many([sms])
        if isinstance(result, ApiError):
            raise result
        return result

    async def receive_many(self, batch: Sequence[InboundSms]) -> list[Answer | ApiError]:
        """Each message's outcome (the first recorded for it), or why it has none."""
        results: list[Answer | ApiError | None] = [None] * len(batch)
        try:
            await self._receive(batch, results)
        except OUTAGES as error:
            # Each message not answered yet is UNAVAILABLE on its own: the carrier
            # redelivers exactly those.
            log.warning("storage failed under %d SMS messages: %r",
                        sum(result is None for result in results), error)
            refused = storage_unavailable(error)
            results = [refused if result is None else result for result in results]
        assert all(result is not None for result in results)
        return results  # type: ignore[return-value]

    async def _receive(self, batch: Sequence[InboundSms],
                       results: list[Answer | ApiError | None]) -> None:
        deadline = time.monotonic() + self._deadline_ms / 1000
        messages: dict[int, _Message] = {}
        bindings: dict[tuple[str, str], Binding | None] = {}
        for index, sms in enumerate(batch):
            try:
                messages[index] = await self._check(sms, bindings)
            except ApiError as error:
                results[index] = error
        times: dict[datetime, str] = {}  # a carrier's batch shares one receipt time
        rows = []
        # Time-ordered: the message id keys sms_messages, sms_outcomes and
        # sms_reply_addresses, and a random one put each insert on a random page of all three
        # indexes.
        for m, message_id in zip(messages.values(), ids.new_time_ids(len(messages)),
                                 strict=True):
            received = times.get(m.sms.received_at)
            if received is None:
                received = times[m.sms.received_at] = m.sms.received_at.isoformat()
            rows.append(ClaimRow(
                message_id, m.sms.carrier, m.sms.carrier_message_id,
                content_hash(m.msisdn, m.sms.short_code, m.sms.text).hex(), m.pseudonym,
                m.sms.short_code, m.sms.text, m.language, received,
                m.sms.gateway_received_at.isoformat() if m.sms.gateway_received_at else None,
                m.msisdn))
        claims = await self._store.claim(rows)
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
        # The rounds these messages' votes go to are read while the leases are taken (a
        # carrier's batch shares one read: SmsStore.round_at), not after.
        self._read_rounds_ahead(messages)
        # Redeliveries: most often decided long ago.
        await self._answer_decided(messages, results)
        waiting = await self._decide_under_leases(messages, results)
        if waiting:  # another copy of these is being decided: its answer is theirs
            await self._await_other_copies(waiting, results, deadline)

    def _read_rounds_ahead(self, messages: dict[int, _Message]) -> None:
        """Start reading the rounds `_decide` will look up (once per show and receipt time):
        it then finds them read, or being read. A failed read is read again there."""
        wanted = {(m.binding.show_id, m.claim.received_at) for m in messages.values()
                  if m.claim is not None and m.claim.first and is_valid_number(m.number)}
        for show_id, received_at in wanted:
            task = asyncio.ensure_future(self._store.round_at(show_id, received_at))
            self._reading_ahead.add(task)
            task.add_done_callback(self._read_ahead)

    def _read_ahead(self, task: asyncio.Future[Round | None]) -> None:
        self._reading_ahead.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: `_decide` reads again, and meets the failure

    async def _answer_decided(self, messages: dict[int, _Message],
                              results: list[Answer | ApiError | None]) -> None:
        """Answer (and drop) the messages already decided."""
        ids = {m.claim.message_id: index for index, m in messages.items()
               if m.maybe_decided and m.claim is not None}
        for message_id, answer in (await self._store.answers(list(ids))).items():
            results[ids[message_id]] = answer
            del messages[ids[message_id]]

    async def _await_other_copies(self, waiting: dict[int, _Message],
                                  results: list[Answer | ApiError | None],
                                  deadline: float) -> None:
        """Copies whose leases others hold: their outcomes once recorded; or, for a lease
        that comes free undecided (its holder died or gave up), decided here. All of them
        are looked up in one statement and one Redis round trip per pause."""
        pause = 0.01
        for message in waiting.values():
            message.maybe_decided = True
        while waiting:
            if time.monotonic() + pause >= deadline:
                for index in waiting:
                    results[index] = unavailable("the message is being decided; redeliver it")
                return
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.2)
            await self._answer_decided(waiting, results)
            waiting = await self._decide_under_leases(waiting, results)

    async def _decide_under_leases(self, messages: dict[int, _Message],
                                   results: list[Answer | ApiError | None],
                                   ) -> dict[int, _Message]:
        """Take the messages' leases (one round trip) and decide those taken; returns the
        others, whose leases another copy holds."""
        indexes = list(messages)
        keys = [(m.sms.carrier, m.sms.carrier_message_id) for m in messages.values()]
        taken = await self._leases.take(keys)
        waiting = {index: messages.pop(index)
                   for index, held in zip(list(messages), taken, strict=True) if not held}
        try:
            # Under the lease, no other copy decides meanwhile; one may have decided before.
            await self._answer_decided(messages, results)
            decided = await self._decide(messages, results)
        finally:
            # A lease whose message now has its outcome recorded is left to end by itself:
            # a copy waiting for it reads that outcome at its next pause, and so does every
            # later redelivery, before any lease (Redis's expiry costs less than a release).
            # Only a message left undecided (its vote undecided, storage failed) frees its
            # lease at once, for the carrier's redelivery to decide it.
            self._leases.release([keys[position] for position, index in enumerate(indexes)
                                  if taken[position] and not isinstance(results[index], Answer)])
        if decided and self._replies_recorded is not None:
            self._replies_recorded(decided)
        return waiting

    async def _check(self, sms: InboundSms,
                     bindings: dict[tuple[str, str], Binding | None]) -> _Message:
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
        for name in ("carrier_message_id", "short_code", "text"):
            if "\x00" in getattr(sms, name):  # PostgreSQL's text cannot hold it
                bad.append(FieldViolation(name, "contains a NUL character"))
        if sms.gateway_received_at is not None:
            problem = gateway_time_problem(sms.gateway_received_at, sms.received_at,
                                           max_age_ms=self._max_age_ms)
            if problem is not None:
                bad.append(FieldViolation("received_at", problem))
        if bad:
            raise invalid_argument(*bad)
        key = (sms.carrier, sms.short_code)
        if key in bindings:  # a carrier's batch names one short code
            binding = bindings[key]
        else:
            binding = bindings[key] = await self._store.binding(*key)
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
        #: (show, receipt time) -> the round then: a carrier's batch shares both.
        rounds: dict[tuple[str, datetime], Round | None] = {}
        for index, m in messages.items():
            assert m.claim is not None
            number = m.number
            if number is None:
                outcomes[index] = (Outcome.INVALID_FORMAT, None)
                continue
            target = None
            if is_valid_number(number):
                key = (m.binding.show_id, m.claim.received_at)
                if key in rounds:
                    latest = rounds[key]
                else:
                    latest = rounds[key] = await self._store.round_at(*key)
                target = latest.target(m.claim.received_at, number) if latest else None
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
        stamps: dict[datetime, Timestamp] = {}
        for index, target in voting.items():
            m = messages[index]
            assert m.claim is not None and target.contestant_id is not None
            stamp = stamps.get(m.claim.received_at)
            if stamp is None:
                stamp = stamps[m.claim.received_at] = Timestamp()
                stamp.FromDatetime(m.claim.received_at)
            ballots.append(sms_vote(
                request_id=ids.name_id(REQUEST_ID_NAMESPACE,
                                       f"{m.sms.carrier}:{m.sms.carrier_message_id}"),
                user_id="sms:" + m.pseudonym, round_id=target.round_id,
                contestant_id=target.contestant_id, received_at=stamp))
        votes = await self._votes.vote(ballots)
        vote_ids: dict[int, str] = {}
        for index, result in zip(voting, votes, strict=True):
            if isinstance(result, VoteUndecidedError):
                results[index] = unavailable(f"the vote could not be recorded ({result}); "
                                             "redeliver")
            elif (refused := refusal(result)) is None:
                outcomes[index] = (Outcome.COUNTED, voting[index])
                vote_ids[index] = result.accepted.vote_id
            elif (outcome := _REFUSALS.get(refused.reason)) is not None:
                outcomes[index] = (outcome, voting[index])
            else:
                log.error("vote_svc refused an SMS vote unexpectedly: %s", refused)
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
    taken and released for many messages in one script call per carrier (concurrent
    batches share it too). A replica killed holding one is taken over when it ends."""

    def __init__(self, redis: RedisClient, lease_ms: int) -> None:
        self._lease_ms = lease_ms
        self._token = secrets.token_hex(8)  # this replica's: a lease it holds names it
        self._script = redis.register_script(_LEASES)
        self._ops: Coalescer[tuple[bool, str, str], bool] = Coalescer(self._run,
                                                                      max_batch=2000)
        self._releasing: set[asyncio.Future[list[bool | BaseException]]] = set()

    async def take(self, messages: list[tuple[str, str]]) -> list[bool]:
        """Whether each lease was free and is now held."""
        if not messages:
            return []
        taken = await self._ops.submit_many([(True, *m) for m in messages])
        for held in taken:
            if isinstance(held, BaseException):
                raise held
        return taken  # type: ignore[return-value]

    def release(self, messages: list[tuple[str, str]]) -> None:
        """Let the leases go, with the next round trip (the callers' answers do not wait)."""
        if not messages:
            return
        future = self._ops.submit_many([(False, *m) for m in messages], wait_ms=2.0)
        self._releasing.add(future)
        future.add_done_callback(self._released)

    def _released(self, future: asyncio.Future[list[bool | BaseException]]) -> None:
        self._releasing.discard(future)
        if future.cancelled():  # shut down before the round trip: the leases end by themselves
            return
        failed = next((released for released in future.result()
                       if isinstance(released, BaseException)), None)
        if failed is not None:
            # The lease ends by itself; a copy waiting for it decides after that.
            log.warning("releasing an SMS lease failed: %r", failed)

    async def _run(self, ops: list[tuple[bool, str, str]]) -> list[bool]:
        by_carrier: dict[str, list[int]] = {}
        for index, (_, carrier, _) in enumerate(ops):
            by_carrier.setdefault(carrier, []).append(index)

        async def call(carrier: str, indexes: list[int]) -> list[int]:
            # One carrier's leases share a hash slot ({carrier}): one script on Redis
            # Cluster too.
            return await self._script(  # type: ignore[no-any-return]
                keys=[f"tv:sms:lease:{{{carrier}}}:{ops[i][2]}" for i in indexes],
                args=[self._token, self._lease_ms,
                      "".join(["1" if ops[i][0] else "0" for i in indexes])])
        replies = await asyncio.gather(*(call(carrier, indexes)
                                         for carrier, indexes in by_carrier.items()))
        taken = [False] * len(ops)
        for indexes, leases in zip(by_carrier.values(), replies, strict=True):
            for index, held in zip(indexes, leases, strict=True):
                taken[index] = bool(held)
        return taken


def now() -> datetime:
    return datetime.now(UTC)
