"""Paid balances: credits and spends in PostgreSQL (the truth), Redis as admission cache.

balance = wallets.credited - wallets.spent - wallets.clawed_back. Grants (and store purchases,
vote_svc/purchases.py) add to `credited` and to their own record and audit_log in one
transaction; spends are added by the ledger's group commit with the votes that spend them;
refunds add to `clawed_back`. The Redis cache (`runtime.keys.user_key`) holds `credited` and
`spent` (there: spent + clawed back) too; a credit only raises a loaded cache's `credited` to
the committed total, so a credit and a cache load racing each other cannot count it twice.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import grpc
import psycopg

from runtime import keys
from runtime.access import Principal
from runtime.errors import ApiError
from runtime.storage import Storage
from vote_svc.admission import Scripts


@dataclass(frozen=True)
class Grant:
    grant_id: str
    paid_balance: int
    granted_at: datetime
    granted_by: str


def _fingerprint(user_id: str, count: int, reason: str) -> bytes:
    return hashlib.sha256(json.dumps([user_id, count, reason]).encode()).digest()


async def grant_votes(storage: Storage, scripts: Scripts, principal: Principal, *,
                      request_id: str, user_id: str, count: int, reason: str) -> Grant:
    """Credit paid votes once per request id, audited, then raise the Redis cache."""
    fingerprint = _fingerprint(user_id, count, reason)
    grant: Grant | None = None
    for _ in range(3):  # a concurrent retry of the same request may win the insert
        try:
            grant = await _grant_once(storage, principal, request_id, user_id, count, reason,
                                      fingerprint)
            break
        except psycopg.errors.UniqueViolation:
            continue
    if grant is None:
        raise ApiError(grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE", "retry the grant")
    async with storage.pool.connection() as connection:
        cursor = await connection.execute(
            "SELECT credited FROM wallets WHERE user_id = %s", (user_id,))
        row: dict[str, Any] | None = await cursor.fetchone()
    if row is not None:
        await scripts.grant(keys=[keys.user_key(keys.shard_of(user_id), user_id)],
                            args=[row["credited"]])
    return grant


async def _grant_once(storage: Storage, principal: Principal, request_id: str, user_id: str,
                      count: int, reason: str, fingerprint: bytes) -> Grant:
    async with storage.pool.connection() as connection, connection.transaction():
        cursor = await connection.execute(
            "SELECT credit_id::text, user_id, fingerprint, balance_after, created_at, granted_by"
            "  FROM wallet_credits WHERE request_id = %s", (request_id,))
        prior: dict[str, Any] | None = await cursor.fetchone()
        if prior is not None:
            if bytes(prior["fingerprint"]) != fingerprint:
                raise ApiError(grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_MISMATCH",
                               "this request_id was used for a different grant")
            return Grant(prior["credit_id"], prior["balance_after"], prior["created_at"],
                         prior["granted_by"])
        cursor = await connection.execute(
            "INSERT INTO wallets (user_id, credited) VALUES (%s, %s)"
            " ON CONFLICT (user_id) DO UPDATE SET credited = wallets.credited + excluded.credited"
            " RETURNING credited - spent - clawed_back AS balance", (user_id, count))
        balance_row: dict[str, Any] | None = await cursor.fetchone()
        assert balance_row is not None
        grant_id = str(uuid.uuid4())
        cursor = await connection.execute(
            "INSERT INTO wallet_credits (credit_id, request_id, user_id, votes, source, reason,"
            "                            granted_by, fingerprint, balance_after)"
            " VALUES (%s, %s, %s, %s, 'grant', %s, %s, %s, %s) RETURNING created_at",
            (grant_id, request_id, user_id, count, reason, principal.subject, fingerprint,
             balance_row["balance"]))
        created: dict[str, Any] | None = await cursor.fetchone()
        assert created is not None
        await connection.execute(
            "INSERT INTO audit_log (actor_role, actor_subject, action, target, reason, details)"
            " VALUES (%s, %s, 'wallet.grant', %s, %s, %s)",
            (principal.role.value, principal.subject, f"user:{user_id}", reason,
             json.dumps({"grant_id": grant_id, "request_id": request_id, "votes": count,
                         "balance_after": balance_row["balance"]})))
        return Grant(grant_id, balance_row["balance"], created["created_at"], principal.subject)


async def balance(storage: Storage, user_id: str, episode_id: str) -> tuple[int, int, int]:
    """(free votes left in the episode, the episode's quota, paid balance).

    Reads the Redis cache when loaded (it includes votes admitted but not yet committed),
    else PostgreSQL; it never fills the cache (only admission does, after a shard is known
    to be complete).
    """
    async with storage.pool.connection() as connection:
        cursor = await connection.execute(
            "SELECT e.free_vote_quota AS quota,"
            "       (SELECT used FROM free_vote_usage f"
            "         WHERE f.user_id = %s AND f.episode_id = e.episode_id) AS used,"
            "       (SELECT credited - spent - clawed_back FROM wallets w WHERE w.user_id = %s)"
            "         AS paid"
            "  FROM episodes e WHERE e.episode_id = %s", (user_id, user_id, episode_id))
        row: dict[str, Any] | None = await cursor.fetchone()
    if row is None:
        raise ApiError(grpc.StatusCode.NOT_FOUND, "EPISODE_NOT_FOUND", "no such episode")
    quota = int(row["quota"])
    used, paid = int(row["used"] or 0), int(row["paid"] or 0)
    cached = await storage.redis.hmget(keys.user_key(keys.shard_of(user_id), user_id),
                                       ["credited", "spent", f"free:{episode_id}"])
    if cached[0] is not None and cached[1] is not None:
        paid = int(cached[0]) - int(cached[1])
    if cached[2] is not None:
        used = int(cached[2])
    return max(quota - used, 0), quota, paid
