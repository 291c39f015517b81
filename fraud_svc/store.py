"""fraud_svc's PostgreSQL side: the blocklist cache, travellers, show policies, the audit log.

Blocks and traveller exemptions are read on every vote, so each replica keeps them in memory
and reloads them every `fraud_refresh_seconds` (and at once after its own changes); the
blocks, which grow with every flagged bot, are read again only when a one-row fingerprint of
the active ones has changed. User
blocks are also mirrored into Redis (state.py), so a flag applies on every replica at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from fraud_svc.features import Policy
from fraud_svc.geoip import IPNetwork, parse_ip
from runtime import audit

log = logging.getLogger(__name__)

Pool = AsyncConnectionPool[AsyncConnection[dict[str, Any]]]
Conn = AsyncConnection[dict[str, Any]]

#: audit_log.action of fraud_svc's entries carry this prefix; AuditEntry.action omits it.
ACTION_PREFIX = "fraud."


@dataclass
class Blocklist:
    """The active blocks and traveller exemptions, as of the last reload."""

    users: dict[str, str] = field(default_factory=dict)
    devices: dict[str, str] = field(default_factory=dict)
    ips: dict[str, str] = field(default_factory=dict)
    networks: list[tuple[IPNetwork, str]] = field(default_factory=list)
    #: user id -> allowed countries (None: anywhere).
    travellers: dict[str, frozenset[str] | None] = field(default_factory=dict)
    #: round id -> its show's fraud policy (rounds not yet finalized of shows that have one).
    policies: dict[str, Policy] = field(default_factory=dict)

    def match(self, user_id: str, device_id: str, ip: str) -> str | None:
        """A description of the block that applies to the vote, if any."""
        if user_id in self.users:
            return f"user blocked ({self.users[user_id]})"
        if device_id and device_id in self.devices:
            return f"device blocked ({self.devices[device_id]})"
        if ip and self.ips:
            found = self.ips.get(ip)
            if found is not None:
                return f"IP blocked ({found})"
        if ip and self.networks:
            address = parse_ip(ip)
            if address is not None:
                version, value = address
                for network, reason in self.networks:
                    shift = network.max_prefixlen - network.prefixlen
                    if (version == network.version
                            and value >> shift == int(network.network_address) >> shift):
                        return f"network {network} blocked ({reason})"
        return None

    def is_traveller(self, user_id: str, country: str | None) -> bool:
        if user_id not in self.travellers:
            return False
        countries = self.travellers[user_id]
        return countries is None or (country is not None and country in countries)


#: Which blocks are active, in one row: their number and the sum of a 64-bit hash of their
#: ids (a block's fields never change, it is only deleted or expires).
_BLOCKS_FINGERPRINT = """
SELECT count(*) AS blocks, coalesce(sum(hashtextextended(block_id::text, 0)), 0) AS ids
FROM fraud_blocks WHERE deleted_at IS NULL AND (expire_at IS NULL OR expire_at > now())
"""


class BlocklistCache:
    """Reloads the blocklist from PostgreSQL in the background."""

    def __init__(self, pool: Pool, refresh_seconds: float, defaults: Policy,
                 on_first_load: Callable[[Blocklist], Awaitable[None]] | None = None) -> None:
        self._pool = pool
        #: The deployment's policy (`Policy.default`), for what a show's policy leaves to it
        #: (NULL columns).
        self._defaults = defaults
        self._refresh_seconds = refresh_seconds
        self._on_first_load = on_first_load
        self.current = Blocklist()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._blocks_fingerprint: dict[str, Any] | None = None

    async def ensure_started(self) -> None:
        """Loads the list and starts reloading it, on the first RPC.

        Lazily, because the pool opens only after the server starts (runtime/server.py).
        """
        if self._task is not None:
            return
        async with self._lock:
            if self._task is not None:
                return
            await self.reload()
            if self._on_first_load is not None:
                await self._on_first_load(self.current)
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def reload(self) -> None:
        fresh = Blocklist()
        async with self._pool.connection() as conn:
            # Reading the fingerprint first: a change after it makes the next one differ.
            fingerprint = await (await conn.execute(_BLOCKS_FINGERPRINT)).fetchone()
            rows = None
            if fingerprint != self._blocks_fingerprint:
                rows = await (await conn.execute(
                    "SELECT kind, value, reason FROM fraud_blocks WHERE deleted_at IS NULL"
                    " AND (expire_at IS NULL OR expire_at > now())")).fetchall()
            travellers = await (await conn.execute(
                "SELECT user_id, countries FROM fraud_travellers"
                " WHERE expire_at IS NULL OR expire_at > now()")).fetchall()
            policies = await (await conn.execute(
                "SELECT r.round_id::text AS round_id, p.show_id::text AS show_id,"
                " p.block_threshold, p.review_threshold, p.allowed_countries,"
                " p.scoring, p.foreign_country, p.location_mismatch"
                " FROM fraud_policies p JOIN episodes e USING (show_id)"
                " JOIN rounds r USING (episode_id) WHERE r.state <> 'FINALIZED'")).fetchall()
        if rows is None:
            # The same blocks as last time. Rebuilding them every FRAUD_REFRESH_SECONDS took
            # ~1 us per block (flagged bots run into the 10,000s) out of the event loop that
            # scores the batches.
            current = self.current
            fresh.users, fresh.devices = current.users, current.devices
            fresh.ips, fresh.networks = current.ips, current.networks
        for row in rows or ():
            kind, value, reason = str(row["kind"]), str(row["value"]), str(row["reason"])
            if kind == "USER":
                fresh.users[value] = reason
            elif kind == "DEVICE":
                fresh.devices[value] = reason
            elif kind == "IP":
                fresh.ips[value] = reason
            else:
                fresh.networks.append((ipaddress.ip_network(value), reason))
        for row in travellers:
            countries = row["countries"]
            fresh.travellers[str(row["user_id"])] = (
                None if countries is None else frozenset(str(c).upper() for c in countries))
        defaults = self._defaults
        for row in policies:
            fresh.policies[str(row["round_id"])] = Policy(
                str(row["show_id"]), float(row["block_threshold"]),
                float(row["review_threshold"]),
                frozenset(str(c).upper() for c in row["allowed_countries"]),
                row["scoring"] or defaults.scoring,
                row["foreign_country"] or defaults.foreign_country,
                row["location_mismatch"] or defaults.location_mismatch)
        self.current = fresh
        self._blocks_fingerprint = fingerprint

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_seconds)
            try:
                await self.reload()
            except Exception:  # keep the last good list; the next reload may succeed
                log.exception("blocklist reload failed")


@dataclass
class AuditRecord:
    """One audit_log row written by fraud_svc."""

    actor_role: str
    actor: str
    action: str  # without the "fraud." prefix
    target_id: str
    reason: str = ""
    user_id: str = ""
    round_id: str = ""
    request_id: str = ""
    attributes: Mapping[str, object] = field(default_factory=dict)

    def entry(self) -> audit.Entry:
        return audit.Entry(self.actor_role, self.actor, ACTION_PREFIX + self.action,
                           self.target_id, self.reason, {
                               "user_id": self.user_id, "round_id": self.round_id,
                               "target_id": self.target_id, "request_id": self.request_id,
                               "attributes": dict(self.attributes)})


async def write_audit(conn: Conn, records: list[AuditRecord]) -> list[int]:
    """Appends the records; returns their audit ids in order."""
    return await audit.write(conn, [record.entry() for record in records])


def attribute_text(value: object) -> str:
    """An audit attribute as AuditEntry's string map shows it."""
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, default=str)


async def finalized_rounds(conn: Conn, round_ids: list[str]) -> set[str]:
    """Those of `round_ids` (canonical UUID text) whose final result is stored."""
    rows = await (await conn.execute(
        "SELECT r.round_id::text AS round_id FROM unnest(%s::uuid[]) AS r(round_id)"
        " WHERE EXISTS (SELECT 1 FROM round_results f WHERE f.round_id = r.round_id)"
        "    OR EXISTS (SELECT 1 FROM rounds o WHERE o.round_id = r.round_id"
        "               AND o.state = 'FINALIZED')", [round_ids])).fetchall()
    return {str(row["round_id"]) for row in rows}


# The automatic verdict on a BLOCKed ledger vote: a review born REJECTED (or the vote's
# existing review) and the rejection the final result reads; returns the rejection's id when
# this call made it.
_REJECT_SQL = """
WITH review AS (
    INSERT INTO fraud_reviews (review_id, vote_ref, decision_id, user_id, round_id, score,
                               signals, state, resolved_by, resolved_at, note)
    VALUES (%(review_id)s, %(ref)s, %(decision_id)s, %(user_id)s, %(round_id)s, %(score)s,
            %(signals)s, 'REJECTED', %(actor)s, now(), %(note)s)
    ON CONFLICT (round_id, user_id, vote_ref) DO NOTHING
    RETURNING review_id
)
INSERT INTO fraud_rejections (rejection_id, round_id, user_id, vote_ref, decision_id,
                              review_id, rejected_by)
SELECT %(rejection_id)s, %(round_id)s, %(user_id)s, %(ref)s, %(decision_id)s,
       coalesce((SELECT review_id FROM review),
                (SELECT r.review_id FROM fraud_reviews r WHERE r.round_id = %(round_id)s
                   AND r.user_id = %(user_id)s AND r.vote_ref = %(ref)s)),
       %(actor)s
ON CONFLICT DO NOTHING
RETURNING rejection_id
"""


async def reject_vote(conn: Conn, *, ref: str, decision_id: str, user_id: str, round_id: str,
                      score: float, signals: list[dict[str, object]], actor: str,
                      note: str) -> bool:
    """Reject one ledger vote (review and rejection); False when it already was."""
    cursor = await conn.execute(_REJECT_SQL, {
        "review_id": str(uuid.uuid4()), "rejection_id": str(uuid.uuid4()), "ref": ref,
        "decision_id": decision_id, "user_id": user_id, "round_id": round_id, "score": score,
        "signals": Jsonb(signals), "actor": actor, "note": note})
    return await cursor.fetchone() is not None


REVIEW_COLUMNS = """
    r.review_id, r.seq, r.vote_ref, r.user_id, r.round_id, r.score, r.signals, r.state,
    r.created_at, r.resolved_by, r.resolved_at, r.note, r.resolve_request_id, r.resolve_decision,
    r.resolve_scope, r.affected_votes,
    (SELECT count(*) FROM fraud_reviews o
     WHERE o.user_id = r.user_id AND o.round_id = r.round_id) AS user_round_votes
"""


async def fetch_review(conn: Conn, review_id: str) -> dict[str, Any]:
    row = await (await conn.execute(
        f"SELECT {REVIEW_COLUMNS} FROM fraud_reviews r WHERE r.review_id = %s",
        [review_id])).fetchone()
    assert row is not None
    return row


# -- scoring.py: a scored batch's reviews, flags and audit entries, in one statement

# A vote scored again (vote_svc retried the batch) keeps its first review; a user flagged
# twice keeps the first flag.
RECORD_SCORES = f"""
WITH batch AS (SELECT %(batch)s::jsonb AS b), audit AS (
    {audit.insert_sql("(SELECT b -> 'audit' FROM batch)")}
), reviews AS (
    INSERT INTO fraud_reviews (review_id, vote_ref, user_id, round_id, score, signals,
                               decision_id)
    SELECT (r ->> 'review_id')::uuid, r ->> 'vote_ref', r ->> 'user_id', r ->> 'round_id',
           (r ->> 'score')::float8, r -> 'signals', r ->> 'decision_id'
    FROM batch, jsonb_array_elements(b -> 'reviews') WITH ORDINALITY AS e(r, position)
    ORDER BY position
    ON CONFLICT (round_id, user_id, vote_ref) DO NOTHING
), blocks AS (
    INSERT INTO fraud_blocks (block_id, kind, value, reason, created_by)
    SELECT (f ->> 'block_id')::uuid, 'USER', f ->> 'value', f ->> 'reason', %(actor)s
    FROM batch, jsonb_array_elements(b -> 'blocks') AS f
    ON CONFLICT (kind, value) WHERE deleted_at IS NULL DO NOTHING
)
SELECT 1
"""


# -- moderation.py: operators' verdicts, blocks, traveller exemptions and show policies

REVIEW_ROUND = "SELECT round_id FROM fraud_reviews WHERE review_id = %s"

REVIEW_FOR_UPDATE = "SELECT * FROM fraud_reviews WHERE review_id = %s FOR UPDATE"

INSERT_REJECTION = """
INSERT INTO fraud_rejections
       (rejection_id, round_id, user_id, vote_ref, decision_id, review_id, rejected_by)
VALUES (%s, %s, %s, %s, %s, %s, %s)
ON CONFLICT DO NOTHING
"""

RESOLVE_OTHER_REVIEWS = """
UPDATE fraud_reviews SET state = %s, resolved_by = %s, resolved_at = now(), note = %s
 WHERE user_id = %s AND round_id = %s AND state = 'PENDING' AND review_id <> %s
"""

RESOLVE_REVIEW = """
UPDATE fraud_reviews SET state = %s, resolved_by = %s, resolved_at = now(), note = %s,
       resolve_request_id = %s, resolve_decision = %s, resolve_scope = %s, affected_votes = %s
 WHERE review_id = %s
"""

RETIRE_EXPIRED_BLOCK = """
UPDATE fraud_blocks SET deleted_at = now(), deleted_by = 'expired'
 WHERE kind = %s AND value = %s AND deleted_at IS NULL AND expire_at <= now()
"""

INSERT_BLOCK = """
INSERT INTO fraud_blocks
       (block_id, kind, value, reason, created_by, expire_at, create_request_id)
VALUES (%s, %s, %s, %s, %s, %s, %s)
RETURNING *
"""

BLOCK_FOR_UPDATE = "SELECT * FROM fraud_blocks WHERE block_id = %s FOR UPDATE"

DELETE_BLOCK = """
UPDATE fraud_blocks SET deleted_at = now(), deleted_by = %s, delete_request_id = %s
 WHERE block_id = %s
"""

UPSERT_TRAVELLER = """
INSERT INTO fraud_travellers (user_id, countries, expire_at, created_by, reason)
VALUES (%s, %s, %s, %s, %s)
ON CONFLICT (user_id) DO UPDATE
   SET countries = excluded.countries, expire_at = excluded.expire_at,
       created_by = excluded.created_by, created_at = now(), reason = excluded.reason
RETURNING *
"""

DELETE_TRAVELLER = "DELETE FROM fraud_travellers WHERE user_id = %s RETURNING *"

SHOW_EXISTS = "SELECT 1 FROM shows WHERE show_id = %s"

UPSERT_POLICY = """
INSERT INTO fraud_policies (show_id, block_threshold, review_threshold, allowed_countries, note,
                            updated_by, scoring, foreign_country, location_mismatch)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (show_id) DO UPDATE
   SET block_threshold = excluded.block_threshold,
       review_threshold = excluded.review_threshold,
       allowed_countries = excluded.allowed_countries, note = excluded.note,
       updated_by = excluded.updated_by, updated_at = now(), scoring = excluded.scoring,
       foreign_country = excluded.foreign_country,
       location_mismatch = excluded.location_mismatch
RETURNING *
"""

POLICY = "SELECT * FROM fraud_policies WHERE show_id = %s"


# -- api.py: operators' listings, keyset-paginated; `{where}` is the request's filters.

LIST_REVIEWS = (f"SELECT {REVIEW_COLUMNS} FROM fraud_reviews r WHERE {{where}}"
                " ORDER BY r.seq LIMIT %s")
LIST_BLOCKS = ("SELECT * FROM fraud_blocks WHERE {where}"
               " ORDER BY created_at DESC, block_id DESC LIMIT %s")
LIST_AUDIT_ENTRIES = "SELECT * FROM audit_log WHERE {where} ORDER BY audit_id DESC LIMIT %s"
LIST_TRAVELLERS = "SELECT * FROM fraud_travellers WHERE {where} ORDER BY user_id LIMIT %s"


async def fetch_all(conn: Conn, query: str, params: list[Any]) -> list[dict[str, Any]]:
    """Every row `query` returns."""
    rows: list[dict[str, Any]] = await (await conn.execute(query, params)).fetchall()
    return rows
