"""Paid balances: credits and spends in PostgreSQL (the truth), Redis as admission cache.

balance = wallets.credited - wallets.spent - wallets.clawed_back. Grants add to `credited`
and to wallet_credits and audit_log in one transaction, once per request id
(runtime/idempotency.py), and store purchases likewise to purchases (vote_svc/purchases.py);
spends are added by the ledger's group commit with the votes that spend them; refunds add to
`clawed_back`. The Redis cache (`runtime.keys.user_key`) holds `credited` and `spent` (there:
spent + clawed back) too; a credit only raises a loaded cache's `credited` to the committed
total, so a credit and a cache load racing each other cannot count it twice.
"""

from __future__ import annotations

import uuid
from typing import Any

import grpc
import psycopg

from runtime import audit, keys
from runtime.access import Principal
from runtime.errors import ApiError
from runtime.idempotency import fingerprint, once, require_request_id
from runtime.protoconv import timestamp
from runtime.storage import Storage, fetch_one
from televote.vote.v1 import wallet_admin_service_pb2
from vote_svc import store
from vote_svc.admission import Scripts

GRANT_METHOD = "televote.vote.v1.WalletAdminService/GrantVotes"


async def grant_votes(storage: Storage, scripts: Scripts, principal: Principal,
                      request: wallet_admin_service_pb2.GrantVotesRequest,
                      ) -> wallet_admin_service_pb2.GrantVotesResponse:
    """Credit paid votes once per request id (runtime/idempotency.py), audited, then raise
    the Redis cache. `request` is valid (api.py checked it)."""
    async with storage.pool.connection() as connection, connection.transaction():
        response = await once(
            connection, GRANT_METHOD, request.request_id, request,
            wallet_admin_service_pb2.GrantVotesResponse,
            lambda: _grant(connection, principal, request))
        row: dict[str, Any] | None = await fetch_one(connection, store.WALLET_CREDITED,
                                                     (request.user_id,))
    if row is not None:
        await scripts.grant(keys=[keys.user_key(keys.shard_of(request.user_id), request.user_id)],
                            args=[row["credited"]])
    return response


async def _grant(connection: psycopg.AsyncConnection[Any], principal: Principal,
                 request: wallet_admin_service_pb2.GrantVotesRequest,
                 ) -> wallet_admin_service_pb2.GrantVotesResponse:
    user_id, count, reason = request.user_id, request.count, request.reason
    request_id = require_request_id(request.request_id)
    balance_row: dict[str, Any] | None = await fetch_one(connection, store.CREDIT_WALLET,
                                                         (user_id, count))
    assert balance_row is not None
    grant_id = str(uuid.uuid4())
    created: dict[str, Any] | None = await fetch_one(
        connection, store.INSERT_WALLET_CREDIT,
        (grant_id, request_id, user_id, count, reason, principal.subject,
         fingerprint(GRANT_METHOD, request), balance_row["balance"]))
    assert created is not None
    await audit.write(connection, [audit.Entry(
        principal.role.value, principal.subject, "wallet.grant", f"user:{user_id}", reason,
        {"grant_id": grant_id, "request_id": request_id, "votes": count,
         "balance_after": balance_row["balance"]})])
    return wallet_admin_service_pb2.GrantVotesResponse(
        grant_id=grant_id, paid_balance=balance_row["balance"], granted_by=principal.subject,
        granted_at=timestamp(created["created_at"]))


async def balance(storage: Storage, user_id: str, episode_id: str) -> tuple[int, int, int]:
    """(free votes left in the episode, the episode's quota, paid balance).

    Reads the Redis cache when loaded (it includes votes admitted but not yet committed),
    else PostgreSQL; it never fills the cache (only admission does, after a shard is known
    to be complete).
    """
    async with storage.pool.connection() as connection:
        row: dict[str, Any] | None = await fetch_one(connection, store.BALANCE,
                                                     (user_id, user_id, episode_id))
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
