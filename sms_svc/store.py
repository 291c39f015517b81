"""sms_svc's SQL: short code bindings and the append-only SMS records (migrations/0014).

It reads sync_svc's shows, episodes, rounds and contestants and writes only its own tables.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection

from runtime.access import Principal
from runtime.storage import Storage


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


@dataclass(frozen=True)
class Target:
    """Where a vote received at some moment goes: the round open for SMS then (None when
    none was) and the contestant with the message's number in it (None when none is)."""

    episode_id: str
    round_id: str
    sms_open: bool
    contestant_id: str | None
    contestant_name: str


@dataclass(frozen=True)
class Claim:
    """The first receipt of a carrier's message (the same for every redelivery)."""

    message_id: str
    received_at: datetime
    language: str
    first: bool


@dataclass(frozen=True)
class Answer:
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


class ContentMismatchError(Exception):
    """The carrier message id came before with other content."""


_BINDING_COLUMNS = ("carrier, short_code, show_id::text AS show_id, price_micros, currency_code,"
                    " bound_by, bound_at")


def _binding(row: dict[str, Any]) -> Binding:
    return Binding(row["carrier"], row["short_code"], row["show_id"], int(row["price_micros"]),
                   row["currency_code"], row["bound_by"], row["bound_at"])


class SmsStore:
    """Everything sms_svc reads and writes in PostgreSQL."""

    def __init__(self, storage: Storage) -> None:
        self._pool = storage.pool

    # -- short codes ----------------------------------------------------------------------

    async def binding(self, carrier: str, short_code: str) -> Binding | None:
        async with self._pool.connection() as connection:
            cursor = await connection.execute(
                f"SELECT {_BINDING_COLUMNS} FROM sms_short_codes"
                " WHERE carrier = %s AND short_code = %s", (carrier, short_code))
            row: dict[str, Any] | None = await cursor.fetchone()
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
        await connection.execute(
            "INSERT INTO audit_log (actor_role, actor_subject, action, target, details)"
            " VALUES (%s, %s, 'sms.short_code.bind', %s, %s)",
            (principal.role.value, principal.subject,
             f"short_code:{binding.carrier}:{binding.short_code}",
             json.dumps({"request_id": request_id, "show_id": binding.show_id,
                         "price_micros": binding.price_micros,
                         "currency_code": binding.currency_code})))
        return _binding(row)

    # -- where a vote goes ----------------------------------------------------------------

    async def target(self, show_id: str, received_at: datetime, number: int) -> Target | None:
        """The show's round that had opened when the message reached the edge (the latest),
        and whether SMS lines were still open for it then; None when no round had opened.

        Judged from the round's recorded times, so every redelivery of one message, whenever
        it arrives, is judged alike (the first receipt's time)."""
        async with self._pool.connection() as connection:
            cursor = await connection.execute(
                "SELECT r.round_id::text AS round_id, r.episode_id::text AS episode_id,"
                "       %(at)s < least(r.closes_at + r.sms_close_offset_ms * interval '1 ms',"
                "                      coalesce(r.closed_at, 'infinity')) AS sms_open,"
                "       c.contestant_id::text AS contestant_id, c.name"
                "  FROM episodes e JOIN rounds r USING (episode_id)"
                "  LEFT JOIN contestants c ON c.episode_id = r.episode_id"
                "       AND c.sms_number = %(number)s AND c.contestant_id = ANY (r.contestant_ids)"
                " WHERE e.show_id = %(show)s AND r.opens_at <= %(at)s"
                " ORDER BY r.opens_at DESC LIMIT 1",
                {"at": received_at, "number": number, "show": show_id})
            row: dict[str, Any] | None = await cursor.fetchone()
        if row is None:
            return None
        return Target(row["episode_id"], row["round_id"], bool(row["sms_open"]),
                      row["contestant_id"], row["name"] or "")

    # -- the records ----------------------------------------------------------------------

    async def claim(self, *, carrier: str, carrier_message_id: str, content: bytes,
                    pseudonym: str, msisdn: str, short_code: str, text: str, language: str,
                    received_at: datetime, gateway_received_at: datetime | None) -> Claim:
        """Record a message's first receipt, or find it; raises ContentMismatchError when the
        id came before with other content."""
        message_id = str(uuid.uuid4())
        async with self._pool.connection() as connection:
            cursor = await connection.execute(
                "INSERT INTO sms_messages (message_id, carrier, carrier_message_id, content_hash,"
                "     pseudonym, short_code, text, language, received_at, gateway_received_at)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (carrier, carrier_message_id) DO NOTHING RETURNING message_id",
                (message_id, carrier, carrier_message_id, content, pseudonym, short_code, text,
                 language, received_at, gateway_received_at))
            if await cursor.fetchone() is not None:
                await connection.execute(
                    "INSERT INTO sms_reply_addresses (message_id, msisdn, received_at)"
                    " VALUES (%s, %s, %s)", (message_id, msisdn, received_at))
                return Claim(message_id, received_at, language, True)
            cursor = await connection.execute(
                "SELECT message_id::text AS message_id, content_hash, received_at, language"
                "  FROM sms_messages WHERE carrier = %s AND carrier_message_id = %s",
                (carrier, carrier_message_id))
            row: dict[str, Any] | None = await cursor.fetchone()
        assert row is not None
        if bytes(row["content_hash"]) != content:
            raise ContentMismatchError
        return Claim(row["message_id"], row["received_at"], row["language"], False)

    async def answer(self, message_id: str) -> Answer | None:
        async with self._pool.connection() as connection:
            return await _answer(connection, message_id)

    async def record(self, message_id: str, *, outcome: str, contestant_number: int,
                     show_id: str | None, episode_id: str | None, round_id: str | None,
                     vote_id: str | None, price_micros: int, currency_code: str,
                     reply_text: str) -> tuple[Answer, bool]:
        """Record a message's outcome unless one is recorded; (the recorded one, whether it
        is this one)."""
        charged = outcome == "COUNTED"
        async with self._pool.connection() as connection:
            cursor = await connection.execute(
                "INSERT INTO sms_outcomes (message_id, outcome, contestant_number, show_id,"
                "     episode_id, round_id, vote_id, charged, price_micros, currency_code,"
                "     reply_text)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (message_id) DO NOTHING RETURNING message_id",
                (message_id, outcome, contestant_number, show_id, episode_id, round_id,
                 vote_id, charged, price_micros if charged else 0, currency_code, reply_text))
            mine = await cursor.fetchone() is not None
            recorded = await _answer(connection, message_id)
        assert recorded is not None
        return recorded, mine

    async def reply_address(self, message_id: str) -> str | None:
        async with self._pool.connection() as connection:
            cursor = await connection.execute(
                "SELECT msisdn FROM sms_reply_addresses WHERE message_id = %s", (message_id,))
            row: dict[str, Any] | None = await cursor.fetchone()
        return None if row is None else str(row["msisdn"])

    async def deliver(self, *, carrier: str, carrier_message_id: str, status: str,
                      carrier_charged: bool, charged_micros: int, error_code: str,
                      reported_at: datetime | None) -> tuple[str, bool] | None:
        """Append a delivery report; (message id, disputed), or None for an unknown message.

        A redelivered report (same status, charge and time) is recorded once."""
        async with self._pool.connection() as connection:
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


async def _answer(connection: AsyncConnection[Any], message_id: str) -> Answer | None:
    cursor = await connection.execute(
        "SELECT o.outcome, o.contestant_number, coalesce(o.vote_id::text, '') AS vote_id,"
        "       o.charged, o.price_micros, o.currency_code, o.reply_text, m.language"
        "  FROM sms_outcomes o JOIN sms_messages m USING (message_id)"
        " WHERE o.message_id = %s", (message_id,))
    row: dict[str, Any] | None = await cursor.fetchone()
    if row is None:
        return None
    return Answer(message_id, row["outcome"], row["contestant_number"], row["vote_id"],
                  row["charged"], int(row["price_micros"]), row["currency_code"],
                  row["reply_text"], row["language"])
