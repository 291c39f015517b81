"""sms_svc's SQL: short code bindings and the append-only SMS records (migrations/0014).

It reads sync_svc's shows, episodes, rounds and contestants and writes only its own tables.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

from psycopg import AsyncConnection

from runtime import audit
from runtime.access import Principal
from runtime.coalesce import Coalescer, company_wait_ms
from runtime.storage import Storage, fetch_one


@dataclass(frozen=True)
class Binding:
    """A short code on one carrier, bound to a show."""

    carrier: str
    short_code: str
    show_id: str
    price_micros: int
    currency_code: str
    bound_by: str = ""
    bound_at: datetime | None = None


class Target(NamedTuple):
    """Where a vote received at some moment goes: the round open for SMS then (None when
    none was) and the contestant with the message's number in it (None when none is)."""

    episode_id: str
    round_id: str
    sms_open: bool
    contestant_id: str | None
    contestant_name: str


class Claim(NamedTuple):
    """The first receipt of a carrier's message (the same for every redelivery)."""

    message_id: str
    received_at: datetime
    language: str
    first: bool


class Answer(NamedTuple):
    """A message's recorded outcome (the first one; it never changes)."""

    message_id: str
    outcome: str
    contestant_number: int
    vote_id: str
    charged: bool
    price_micros: int
    currency_code: str
    reply_text: str
    language: str


@dataclass(frozen=True)
class PendingReply:
    """A reply of the outbox not yet handed to the SMS gateway."""

    message_id: str
    carrier: str
    carrier_message_id: str
    msisdn: str
    short_code: str
    text: str
    attempts: int


class ContentMismatchError(Exception):
    """The carrier message id came before with other content."""


_BINDING_COLUMNS = ("carrier, short_code, show_id::text AS show_id, price_micros, currency_code,"
                    " bound_by, bound_at")


def _binding(row: dict[str, Any]) -> Binding:
    return Binding(row["carrier"], row["short_code"], row["show_id"], int(row["price_micros"]),
                   row["currency_code"], row["bound_by"], row["bound_at"])


#: How long a claim or an outcome waits for other messages' to share a statement, unless its
#: caller brings a batch of its own (runtime.coalesce.company_wait_ms).
_WAIT_MS = 2.0

#: The rows written come back as one text of ids, not one row each.
#: Rows travel as one JSON array of arrays (ClaimRow, OutcomeRow in order): json.dumps is C,
#: where psycopg dumps a Python list element by element (and UTF-8 as it is: a Khmer reply
#: escaped as \uXXXX costs more to write and to read).
_CLAIM = """
WITH input AS (
    SELECT (e->>0)::uuid AS message_id, e->>1 AS carrier, e->>2 AS carrier_message_id,
           decode(e->>3, 'hex') AS content_hash, e->>4 AS pseudonym, e->>5 AS short_code,
           e->>6 AS text, e->>7 AS language, (e->>8)::timestamptz AS received_at,
           (e->>9)::timestamptz AS gateway_received_at, e->>10 AS msisdn
      FROM jsonb_array_elements(%s::jsonb) e),
inserted AS (
    INSERT INTO sms_messages (message_id, carrier, carrier_message_id, content_hash,
                              pseudonym, short_code, text, language, received_at,
                              gateway_received_at)
    SELECT message_id, carrier, carrier_message_id, content_hash, pseudonym, short_code,
           text, language, received_at, gateway_received_at FROM input
    ON CONFLICT (carrier, carrier_message_id) DO NOTHING
    RETURNING message_id),
addresses AS (
    INSERT INTO sms_reply_addresses (message_id, msisdn, received_at)
    SELECT i.message_id, i.msisdn, i.received_at FROM input i JOIN inserted USING (message_id))
SELECT coalesce(string_agg(message_id::text, ','), '') AS message_ids FROM inserted
"""

#: The outcomes, and (with a reply sender) each new outcome's reply in the outbox, in one
#: statement: a reply is never recorded without its outcome nor an outcome without its reply.
#: The outbox row is due after the lease, so no other replica takes it while this one sends.
_RECORD = """
WITH recorded AS (
    INSERT INTO sms_outcomes (message_id, outcome, contestant_number, show_id, episode_id,
                              round_id, vote_id, charged, price_micros, currency_code,
                              reply_text)
    SELECT (e->>0)::uuid, e->>1, (e->>2)::int, (e->>3)::uuid, (e->>4)::uuid, (e->>5)::uuid,
           (e->>6)::uuid, (e->>7)::bool, (e->>8)::bigint, e->>9, e->>10
      FROM jsonb_array_elements(%s::jsonb) e
    ON CONFLICT (message_id) DO NOTHING RETURNING message_id),
queued AS (
    INSERT INTO sms_reply_outbox (message_id, due_at, lease_token)
    SELECT message_id, clock_timestamp() + %s * interval '1 ms', %s FROM recorded WHERE %s)
SELECT coalesce(string_agg(message_id::text, ','), '') AS message_ids FROM recorded
"""

_ANSWERS = """
SELECT o.message_id::text AS message_id, o.outcome, o.contestant_number,
       coalesce(o.vote_id::text, '') AS vote_id, o.charged, o.price_micros, o.currency_code,
       o.reply_text, m.language
  FROM sms_outcomes o JOIN sms_messages m USING (message_id)
 WHERE o.message_id = ANY(%s::uuid[])
"""


#: Due replies, oldest first, taken for a lease in this process's name (SKIP LOCKED: replicas
#: polling at once take different ones). A due reply whose number was purged can never be sent:
#: it is dropped with its reason instead of staying pending for ever.
_TAKE_DUE_REPLIES = """
WITH due AS (
    SELECT message_id,
           EXISTS (SELECT 1 FROM sms_reply_addresses a
                    WHERE a.message_id = sms_reply_outbox.message_id) AS addressed
      FROM sms_reply_outbox
     WHERE sent_at IS NULL AND dropped_at IS NULL AND due_at <= clock_timestamp()
     ORDER BY due_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED),
dropped AS (
    UPDATE sms_reply_outbox o SET dropped_at = clock_timestamp(), drop_reason = %(purged)s,
                                  lease_token = NULL
      FROM due WHERE o.message_id = due.message_id AND NOT due.addressed),
taken AS (
    UPDATE sms_reply_outbox o SET due_at = clock_timestamp() + %(lease_ms)s * interval '1 ms',
                                  lease_token = %(token)s
      FROM due WHERE o.message_id = due.message_id AND due.addressed
    RETURNING o.message_id, o.attempts)
SELECT t.message_id::text AS message_id, m.carrier, m.carrier_message_id, a.msisdn,
       m.short_code, r.reply_text AS text, t.attempts
  FROM taken t JOIN sms_messages m USING (message_id)
  JOIN sms_outcomes r USING (message_id)
  JOIN sms_reply_addresses a USING (message_id)
"""

#: Before sending, a replica confirms (and extends) its lease on each reply: a reply that
#: waited here past its lease (for a sending slot, a slow gateway) may have been taken by
#: another replica meanwhile, which sends it instead.
_HOLD_REPLIES = """
UPDATE sms_reply_outbox SET due_at = clock_timestamp() + %(lease_ms)s * interval '1 ms'
 WHERE message_id = ANY(%(ids)s::uuid[]) AND lease_token = %(token)s
   AND sent_at IS NULL AND dropped_at IS NULL AND due_at > clock_timestamp()
RETURNING message_id::text AS message_id
"""

#: Why a reply was dropped unsent (sms_reply_outbox.drop_reason).
MSISDN_PURGED = "MSISDN_PURGED"


@dataclass(frozen=True)
class Round:
    """A round of a show as sms_svc judges messages by it."""

    round_id: str
    episode_id: str
    opens_at: datetime
    #: When SMS lines closed (or will): the channel's close, or the round's early close.
    sms_close: datetime
    #: SMS number -> (contestant id, name), the round's contestants only.
    contestants: dict[int, tuple[str, str]]

    def target(self, received_at: datetime, number: int) -> Target:
        """Where a message received at `received_at` (when this round was the latest opened)
        that votes for `number` goes."""
        contestant = self.contestants.get(number)
        return Target(self.episode_id, self.round_id, received_at < self.sms_close,
                      contestant[0] if contestant else None,
                      contestant[1] if contestant else "")


class ClaimRow(NamedTuple):
    """A message's first receipt, as recorded (message_id is new, used if it is the first)."""

    message_id: str
    carrier: str
    carrier_message_id: str
    content: str  # hex
    pseudonym: str
    short_code: str
    text: str
    language: str
    received_at: str  # ISO 8601 (rows go to PostgreSQL as JSON)
    gateway_received_at: str | None
    msisdn: str


class OutcomeRow(NamedTuple):
    """A message's outcome, to record unless one is recorded."""

    message_id: str
    outcome: str
    contestant_number: int
    show_id: str | None
    episode_id: str | None
    round_id: str | None
    vote_id: str | None
    charged: bool
    price_micros: int
    currency_code: str
    reply_text: str
    language: str  # not a column: for the answer


class SmsStore:
    """Everything sms_svc reads and writes in PostgreSQL.

    A burst of messages (the close-of-lines peak) shares statements: each claim and each
    outcome waits up to 2 ms for others and goes in one multi-row INSERT, as vote_svc's
    ledger does, instead of a pooled connection and a round trip each.
    """

    def __init__(self, storage: Storage, *, binding_cache_ms: float = 1000.0,
                 replies_queued: bool = False, reply_lease_ms: int = 10_000) -> None:
        self._pool = storage.pool
        #: Whether outcomes' replies go to the outbox (a reply sender is configured), and for
        #: how long the recording replica alone may send them.
        self._replies_queued = replies_queued
        self._reply_lease_ms = reply_lease_ms
        #: This process's name on the reply leases it holds: it sends and marks only those.
        self.lease_token = secrets.token_hex(16)
        self._binding_cache_s = binding_cache_ms / 1000
        self._claims: Coalescer[ClaimRow, Claim] = Coalescer(self._claim_batch, max_batch=500)
        self._outcomes: Coalescer[OutcomeRow, tuple[Answer, bool]] = Coalescer(
            self._record_batch, max_batch=500)
        #: show -> (when the read began, its rounds); and the read in flight per show.
        self._rounds: dict[str, tuple[datetime, list[Round]]] = {}
        self._reading: dict[str, tuple[datetime, asyncio.Future[list[Round]]]] = {}
        #: (carrier, short code) -> (monotonic time read, binding).
        self._bindings: dict[tuple[str, str], tuple[float, Binding | None]] = {}

    # -- short codes ----------------------------------------------------------------------

    async def binding(self, carrier: str, short_code: str) -> Binding | None:
        """The binding, read at most once per SMS_BINDING_CACHE_MS: a re-binding takes
        effect within that."""
        cached = self._bindings.get((carrier, short_code))
        if cached is not None and time.monotonic() - cached[0] < self._binding_cache_s:
            return cached[1]
        read_at = time.monotonic()
        binding = await self._read_binding(carrier, short_code)
        self._bindings[(carrier, short_code)] = (read_at, binding)
        return binding

    async def _read_binding(self, carrier: str, short_code: str) -> Binding | None:
        async with self._pool.connection() as connection:
            row = await fetch_one(
                connection, f"SELECT {_BINDING_COLUMNS} FROM sms_short_codes"
                " WHERE carrier = %s AND short_code = %s", (carrier, short_code))
        return None if row is None else _binding(row)

    async def bindings(self) -> list[Binding]:
        async with self._pool.connection() as connection:
            cursor = await connection.execute(
                f"SELECT {_BINDING_COLUMNS} FROM sms_short_codes ORDER BY carrier, short_code")
            return [_binding(row) for row in await cursor.fetchall()]

    @staticmethod
    async def bind(connection: AsyncConnection[Any], principal: Principal, binding: Binding,
                   request_id: str) -> Binding | None:
        """Bind (or re-bind) inside the caller's transaction, audited; None: no such show."""
        cursor = await connection.execute("SELECT 1 FROM shows WHERE show_id = %s",
                                          (binding.show_id,))
        if await cursor.fetchone() is None:
            return None
        cursor = await connection.execute(
            "INSERT INTO sms_short_codes (carrier, short_code, show_id, price_micros,"
            "                             currency_code, bound_by)"
            " VALUES (%s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (carrier, short_code) DO UPDATE SET show_id = excluded.show_id,"
            "   price_micros = excluded.price_micros, currency_code = excluded.currency_code,"
            "   bound_by = excluded.bound_by, bound_at = now()"
            f" RETURNING {_BINDING_COLUMNS}",
            (binding.carrier, binding.short_code, binding.show_id, binding.price_micros,
             binding.currency_code, principal.subject))
        row = await cursor.fetchone()
        assert row is not None
        await audit.write(connection, [audit.Entry(
            principal.role.value, principal.subject, "sms.short_code.bind",
            f"short_code:{binding.carrier}:{binding.short_code}",
            details={"request_id": request_id, "show_id": binding.show_id,
                     "price_micros": binding.price_micros,
                     "currency_code": binding.currency_code})])
        return _binding(row)

    # -- where a vote goes ----------------------------------------------------------------

    async def round_at(self, show_id: str, received_at: datetime) -> Round | None:
        """The show's round that had opened when a message reached the edge (the latest);
        None when none had. Its `target` tells whether SMS lines were still open then.

        Judged from the rounds' recorded times, so every redelivery of one message, whenever
        it arrives, is judged alike (by the first receipt's time). The show's rounds are
        read once for all the messages received before the read began: a read that began
        after a message arrived knows every round that had opened by then."""
        rounds = await self._rounds_since(show_id, received_at)
        opened = [r for r in rounds if r.opens_at <= received_at]
        return max(opened, key=lambda r: r.opens_at) if opened else None

    async def _rounds_since(self, show_id: str, received_at: datetime) -> list[Round]:
        cached = self._rounds.get(show_id)
        if cached is not None and cached[0] >= received_at:
            return cached[1]
        pending = self._reading.get(show_id)
        if pending is None or pending[0] < received_at:
            began = datetime.now(UTC)
            future = asyncio.ensure_future(self._read_rounds(show_id, began))
            pending = (began, future)
            self._reading[show_id] = pending
        return await asyncio.shield(pending[1])

    async def _read_rounds(self, show_id: str, began: datetime) -> list[Round]:
        try:
            async with self._pool.connection() as connection:
                cursor = await connection.execute(
                    "SELECT r.round_id::text AS round_id, r.episode_id::text AS episode_id,"
                    "       r.opens_at, least(r.closes_at + r.sms_close_offset_ms"
                    "                          * interval '1 ms', coalesce(r.closed_at,"
                    "                          'infinity')) AS sms_close,"
                    "       c.sms_number, c.contestant_id::text AS contestant_id, c.name"
                    "  FROM episodes e JOIN rounds r USING (episode_id)"
                    "  LEFT JOIN contestants c ON c.episode_id = r.episode_id"
                    "       AND c.contestant_id = ANY (r.contestant_ids)"
                    " WHERE e.show_id = %s AND r.opens_at > %s - interval '1 day'",
                    (show_id, began))
                rows: list[dict[str, Any]] = await cursor.fetchall()
        finally:
            if self._reading.get(show_id, (None,))[0] == began:
                del self._reading[show_id]
        rounds: dict[str, Round] = {}
        for row in rows:
            found = rounds.setdefault(row["round_id"], Round(
                row["round_id"], row["episode_id"], row["opens_at"],
                row["sms_close"] if row["sms_close"] is not None else datetime.max.replace(
                    tzinfo=UTC), {}))
            if row["sms_number"] is not None:
                found.contestants[int(row["sms_number"])] = (row["contestant_id"], row["name"])
        result = list(rounds.values())
        cached = self._rounds.get(show_id)
        if cached is None or cached[0] < began:
            self._rounds[show_id] = (began, result)
        return result

    # -- the records ----------------------------------------------------------------------

    async def claim(self, rows: list[ClaimRow]) -> list[Claim | BaseException]:
        """Record messages' first receipts, or find them: per row its Claim, or
        ContentMismatchError when the id came before with other content. Concurrent callers'
        rows share one statement."""
        return await self._claims.submit_many(rows,
                                             wait_ms=company_wait_ms(len(rows), _WAIT_MS))

    async def _claim_batch(self, rows: list[ClaimRow]) -> list[Claim | BaseException]:
        async with self._pool.connection() as connection:
            cursor = await connection.execute(_CLAIM, (json.dumps(rows, ensure_ascii=False),))
            inserted = _ids(await cursor.fetchone())
            later = [row for row in rows if row.message_id not in inserted]
            existing: dict[tuple[str, str], dict[str, Any]] = {}
            if later:
                cursor = await connection.execute(
                    "SELECT carrier, carrier_message_id, message_id::text AS message_id,"
                    "       content_hash, received_at, language FROM sms_messages"
                    " WHERE (carrier, carrier_message_id) IN"
                    "       (SELECT * FROM unnest(%s::text[], %s::text[]))",
                    ([row.carrier for row in later], [row.carrier_message_id for row in later]))
                rows_found: list[dict[str, Any]] = await cursor.fetchall()
                existing = {(found["carrier"], found["carrier_message_id"]): found
                            for found in rows_found}
        claims: list[Claim | BaseException] = []
        times: dict[str, datetime] = {}  # a carrier's batch shares one receipt time
        for row in rows:
            if row.message_id in inserted:
                received_at = times.get(row.received_at)
                if received_at is None:
                    received_at = times[row.received_at] = datetime.fromisoformat(
                        row.received_at)
                claims.append(Claim(row.message_id, received_at, row.language, True))
                continue
            found = existing[(row.carrier, row.carrier_message_id)]
            claims.append(ContentMismatchError()
                          if bytes(found["content_hash"]).hex() != row.content
                          else Claim(found["message_id"], found["received_at"],
                                     found["language"], False))
        return claims

    async def answers(self, message_ids: list[str]) -> dict[str, Answer]:
        """The recorded outcomes of those messages that have one."""
        if not message_ids:
            return {}
        async with self._pool.connection() as connection:
            return await _answers(connection, message_ids)

    async def record(self, rows: list[OutcomeRow]) -> list[tuple[Answer, bool] | BaseException]:
        """Record outcomes unless recorded; per row (the recorded one, whether it is this
        one). With a reply sender, a new outcome's reply joins the outbox in the same
        statement. Concurrent callers' rows share one statement."""
        return await self._outcomes.submit_many(
            rows, wait_ms=company_wait_ms(len(rows), _WAIT_MS))

    async def _record_batch(self, rows: list[OutcomeRow],
                            ) -> list[tuple[Answer, bool] | BaseException]:
        async with self._pool.connection() as connection:
            cursor = await connection.execute(
                _RECORD, (json.dumps(rows, ensure_ascii=False), self._reply_lease_ms,
                          self.lease_token, self._replies_queued))
            mine = _ids(await cursor.fetchone())
            earlier = await _answers(connection, [row.message_id for row in rows
                                                  if row.message_id not in mine])
        results: list[tuple[Answer, bool] | BaseException] = []
        for row in rows:
            if row.message_id in mine:
                results.append((Answer(row.message_id, row.outcome, row.contestant_number,
                                       row.vote_id or "", row.charged, row.price_micros,
                                       row.currency_code, row.reply_text, row.language), True))
            else:
                results.append((earlier[row.message_id], False))
        return results

    # -- the reply outbox (migrations/0020) -------------------------------------------------

    async def take_due_replies(self, limit: int) -> list[PendingReply]:
        """Pending replies whose time has come (their recording replica died, or their last
        try failed), taken for `reply_lease_ms` in this process's name: no other replica
        takes them meanwhile. Due replies whose number was purged are dropped."""
        async with self._pool.connection() as connection:
            cursor = await connection.execute(_TAKE_DUE_REPLIES, {
                "limit": limit, "lease_ms": self._reply_lease_ms, "token": self.lease_token,
                "purged": MSISDN_PURGED})
            rows: list[dict[str, Any]] = await cursor.fetchall()
        return [PendingReply(**row) for row in rows]

    async def hold_replies(self, message_ids: list[str]) -> set[str]:
        """Of these replies, those whose lease this process still holds (now extended): only
        those may be sent."""
        async with self._pool.connection() as connection:
            cursor = await connection.execute(_HOLD_REPLIES, {
                "ids": message_ids, "lease_ms": self._reply_lease_ms,
                "token": self.lease_token})
            rows: list[dict[str, Any]] = await cursor.fetchall()
        return {str(row["message_id"]) for row in rows}

    async def replies_sent(self, message_ids: list[str]) -> None:
        async with self._pool.connection() as connection:
            await connection.execute(
                "UPDATE sms_reply_outbox SET sent_at = clock_timestamp(),"
                "       attempts = attempts + 1"
                " WHERE message_id = ANY(%s::uuid[]) AND sent_at IS NULL"
                "   AND dropped_at IS NULL AND lease_token = %s",
                (message_ids, self.lease_token))

    async def replies_failed(self, message_ids: list[str], error: str,
                             retry_after_ms: int) -> None:
        async with self._pool.connection() as connection:
            await connection.execute(
                "UPDATE sms_reply_outbox SET attempts = attempts + 1, last_error = %s,"
                "       due_at = clock_timestamp() + %s * interval '1 ms'"
                " WHERE message_id = ANY(%s::uuid[]) AND sent_at IS NULL"
                "   AND dropped_at IS NULL AND lease_token = %s",
                (error[:500], retry_after_ms, message_ids, self.lease_token))

    async def reply_address(self, message_id: str) -> str | None:
        async with self._pool.connection() as connection:
            row = await fetch_one(
                connection, "SELECT msisdn FROM sms_reply_addresses WHERE message_id = %s",
                (message_id,))
        return None if row is None else str(row["msisdn"])

    async def deliver(self, *, carrier: str, carrier_message_id: str, status: str,
                      carrier_charged: bool, charged_micros: int, error_code: str,
                      reported_at: datetime | None) -> tuple[str, bool] | None:
        """Append a delivery report; (message id, disputed), or None for an unknown message.

        A redelivered report (same status, charge and time) is recorded once."""
        async with self._pool.connection() as connection, connection.transaction():
            cursor = await connection.execute(
                "SELECT m.message_id::text AS message_id, coalesce(o.charged, false) AS charged"
                "  FROM sms_messages m LEFT JOIN sms_outcomes o USING (message_id)"
                " WHERE m.carrier = %s AND m.carrier_message_id = %s",
                (carrier, carrier_message_id))
            row: dict[str, Any] | None = await cursor.fetchone()
            if row is None:
                return None
            disputed = carrier_charged and not row["charged"]
            await connection.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (row["message_id"],))
            cursor = await connection.execute(
                "SELECT 1 FROM sms_deliveries WHERE message_id = %s AND status = %s"
                "   AND carrier_charged = %s AND reported_at IS NOT DISTINCT FROM %s",
                (row["message_id"], status, carrier_charged, reported_at))
            if await cursor.fetchone() is None:
                await connection.execute(
                    "INSERT INTO sms_deliveries (message_id, status, carrier_charged,"
                    "     charged_micros, carrier_error_code, disputed, reported_at)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s)",
                    (row["message_id"], status, carrier_charged, charged_micros, error_code,
                     disputed, reported_at))
        return str(row["message_id"]), disputed


def _ids(row: dict[str, Any] | None) -> set[str]:
    """The ids a statement returned as one text (200 rows of a uuid each cost more)."""
    assert row is not None
    return set(row["message_ids"].split(",")) if row["message_ids"] else set()


async def _answers(connection: AsyncConnection[Any], message_ids: list[str],
                   ) -> dict[str, Answer]:
    if not message_ids:
        return {}
    cursor = await connection.execute(_ANSWERS, (message_ids,))
    rows: list[dict[str, Any]] = await cursor.fetchall()
    return {row["message_id"]: Answer(
        row["message_id"], row["outcome"], row["contestant_number"], row["vote_id"],
        row["charged"], int(row["price_micros"]), row["currency_code"], row["reply_text"],
        row["language"]) for row in rows}


#: An episode's charged messages, all carriers or one, with whether fraud review rejected
#: the vote (read as the final result reads fraud_rejections): `televote sms settlement`.
SETTLEMENT_CHARGES = """
SELECT r.carrier, r.carrier_message_id, r.message_id::text AS message_id, r.received_at,
       r.answered_at, r.pseudonym, r.contestant_number, r.vote_id::text AS vote_id,
       r.price_micros, r.currency_code,
       EXISTS (SELECT 1 FROM votes v JOIN fraud_rejections f
                    ON f.round_id = v.round_id::text AND f.user_id = v.user_id
                   AND (f.vote_ref IS NULL OR f.vote_ref = v.request_id)
                WHERE v.user_id = 'sms:' || r.pseudonym AND v.vote_id = r.vote_id) AS rejected
  FROM sms_records r
 WHERE r.episode_id = %(episode)s AND r.charged
   AND (%(carrier)s::text IS NULL OR r.carrier = %(carrier)s)
 ORDER BY r.carrier, r.received_at, r.message_id
"""

#: `televote sms purge --before DATE`: the numbers kept for replies go; records stay. A reply
#: still pending for one of them can never be sent: it is dropped, with the reason.
PURGE_MSISDNS = f"""
WITH purged AS (
    DELETE FROM sms_reply_addresses WHERE received_at < %s RETURNING message_id),
dropped AS (
    UPDATE sms_reply_outbox o SET dropped_at = clock_timestamp(),
                                  drop_reason = '{MSISDN_PURGED}', lease_token = NULL
      FROM purged p
     WHERE o.message_id = p.message_id AND o.sent_at IS NULL AND o.dropped_at IS NULL)
SELECT count(*) AS removed FROM purged
"""
