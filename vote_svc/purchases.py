"""Vote packages bought in the app stores: verified, credited once, refunds clawed back.

A purchase (PurchaseVotePackage):
1. a retry of a request id returns its first answer (before the store is asked again);
2. the store vouches for the receipt (vote_svc/stores.py, off the event loop);
3. one PostgreSQL transaction adds votes + bonus to the wallet and appends the purchase and
   its audit entry; the unique (store, transaction id) makes a receipt credit once, whoever
   sends it and however often (the loser of a race sees RECEIPT_ALREADY_USED);
4. the Redis admission cache's `credited` is raised to the committed total (as grants do);
5. Google: the purchase is consumed so the voter can buy the package again; a failed
   consumption is retried by the poller (the credit stands either way).

A refund (Apple REFUND/REVOKE notifications, Google voided purchases) is applied once per
purchase: under the wallet's row lock the Redis admission cache gives up what it can still
spend (at most the purchase's votes, CLAW in vote_svc/admission.py), so no vote admitted at
that moment spends the same votes; `wallets.clawed_back` records it. Votes of the purchase
already cast stay counted, are recorded against the purchase (`already_spent`) and the voter
is flagged for review (see vote_svc/README.md, Purchases, for why a refund never changes a
result by itself).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import psycopg
import psycopg.rows
from google.protobuf import json_format, struct_pb2

from runtime import audit, keys, locks
from runtime.errors import ApiError
from runtime.storage import Storage, fetch_one
from televote.vote.v1 import vote_service_pb2
from vote_svc import store as store_sql
from vote_svc.admission import Scripts
from vote_svc.packages import PackageCatalogue
from vote_svc.stores import (
    APPLE,
    GOOGLE,
    Stores,
    Verified,
    google_order_fallback,
    not_configured,
)

log = logging.getLogger(__name__)

#: Google keeps voided purchases for 30 days; the poll never asks further back, and each poll
#: overlaps the last one a little (a refund recorded late on Google's side is still seen).
VOIDED_HORIZON = timedelta(days=30)
VOIDED_OVERLAP = timedelta(minutes=10)
#: A Google purchase this old and still not consumed is consumed by the poller.
CONSUME_RETRY_AFTER = timedelta(seconds=30)

MAX_RECEIPT_BYTES = 64 * 1024
STORE_NAMES = {vote_service_pb2.STORE_APPLE: APPLE, vote_service_pb2.STORE_GOOGLE: GOOGLE}
#: The actor of audit entries written on a store's word.
STORE_ACTOR = "store"


@dataclass(frozen=True)
class Credit:
    purchase_id: str
    store_transaction_id: str
    votes_credited: int
    paid_balance: int
    price_micros: int
    currency_code: str
    credited_at: datetime


@dataclass(frozen=True)
class Refund:
    purchase_id: str
    clawed_back: int
    already_spent: int
    flagged_for_review: bool


def _fingerprint(user_id: str, store: str, package_id: str, receipt: str) -> bytes:
    receipt_hash = hashlib.sha256(receipt.encode()).hexdigest()
    return hashlib.sha256(json.dumps([user_id, store, package_id, receipt_hash]).encode()
                          ).digest()


async def _audit(connection: psycopg.AsyncConnection[Any], role: str, subject: str,
                 action: str, target: str, reason: str, details: dict[str, Any]) -> None:
    await audit.write(connection, [audit.Entry(role, subject, action, target, reason, details)])


@contextlib.asynccontextmanager
async def _autocommit(storage: Storage) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A pooled connection where each statement commits by itself: the purchase path's
    statements are each atomic, and a BEGIN and a COMMIT apiece cost a round trip each."""
    async with storage.pool.connection() as connection:
        await connection.set_autocommit(True)
        try:
            yield connection
        finally:
            await connection.set_autocommit(False)


class Purchases:
    """The purchase path and the refund path of one replica."""

    def __init__(self, storage: Storage, scripts: Scripts, stores: Stores,
                 catalogue: PackageCatalogue) -> None:
        self._storage = storage
        self._scripts = scripts
        self._stores = stores
        self._catalogue = catalogue

    # -- buying ------------------------------------------------------------------------------

    async def purchase(self, user_id: str, request_id: str, store: str, package_id: str,
                       receipt: str) -> Credit:
        fingerprint = _fingerprint(user_id, store, package_id, receipt)
        async with _autocommit(self._storage) as connection:
            prior = await self._prior(connection, request_id, fingerprint)
        if prior is not None:
            return prior
        package = next((p for p in await self._catalogue.packages()
                        if p.package_id == package_id), None)
        if package is None:
            raise ApiError(grpc.StatusCode.NOT_FOUND, "PACKAGE_NOT_FOUND",
                           f"no package {package_id!r} on sale")
        verified = await self._verify(store, package, receipt)
        expected = (package.apple_product_id if store == APPLE else package.google_product_id)
        if verified.product_id != expected:
            raise ApiError(grpc.StatusCode.FAILED_PRECONDITION, "RECEIPT_INVALID",
                           f"the receipt is for product {verified.product_id!r}, not for"
                           f" package {package_id!r}", metadata={"cause": "OTHER_PRODUCT"})
        credit = await self._credit(user_id, request_id, fingerprint, package, verified)
        if store == GOOGLE:
            await self._consume(credit.purchase_id, expected, receipt)
        return credit

    async def _verify(self, store: str, package: vote_service_pb2.VotePackage,
                      receipt: str) -> Verified:
        if store == APPLE:
            if self._stores.apple is None:
                raise not_configured(store)
            return await self._stores.calls.run(self._stores.apple.verify_transaction, receipt)
        if self._stores.google is None:
            raise not_configured(store)
        return await self._stores.calls.run(self._stores.google.verify,
                                            package.google_product_id, receipt)

    async def _prior(self, connection: psycopg.AsyncConnection[Any], request_id: str,
                     fingerprint: bytes) -> Credit | None:
        row = await fetch_one(connection, store_sql.PURCHASE_BY_REQUEST, (request_id,))
        return None if row is None else _replay(row, fingerprint)

    async def _credit(self, user_id: str, request_id: str, fingerprint: bytes,
                      package: vote_service_pb2.VotePackage, verified: Verified) -> Credit:
        """Credit once, then raise the admission cache. Two statements in autocommit: a look
        for this request id or this receipt, then one statement that credits the wallet and
        appends the purchase and its audit entry (atomic by itself). Racing submissions meet
        at the purchases' unique keys: the loser's statement fails whole and it looks again."""
        for _ in range(3):
            async with _autocommit(self._storage) as connection:
                cursor = await connection.execute(
                    store_sql.PURCHASE_BY_REQUEST_OR_RECEIPT,
                    (request_id, verified.store, verified.transaction_id))
                rows: list[dict[str, Any]] = await cursor.fetchall()
                mine = next((r for r in rows if r["request_id"] == request_id), None)
                if mine is not None:
                    return _replay(mine, fingerprint)
                if rows:
                    await self._receipt_reused(connection, user_id, request_id, verified,
                                               rows[0])
                try:
                    credit, credited = await self._insert(connection, user_id, request_id,
                                                          fingerprint, package, verified)
                except psycopg.errors.UniqueViolation:
                    continue
            await self._scripts.grant(keys=[keys.user_key(keys.shard_of(user_id), user_id)],
                                      args=[credited])
            return credit
        raise ApiError(grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE",
                       "the purchase was not recorded; retry with the same request_id")

    async def _receipt_reused(self, connection: psycopg.AsyncConnection[Any], user_id: str,
                              request_id: str, verified: Verified, used: dict[str, Any],
                              ) -> None:
        """Refuse, audited: someone presenting a receipt that credited another purchase is a
        fraud signal."""
        await _audit(connection, "voter", user_id, "purchase.receipt_reused", f"user:{user_id}",
                     verified.store, {"request_id": request_id, "store": verified.store,
                                      "store_transaction_id": verified.transaction_id,
                                      "credited_purchase_id": used["purchase_id"],
                                      "credited_user": used["user_id"]})
        raise ApiError(grpc.StatusCode.ALREADY_EXISTS, "RECEIPT_ALREADY_USED",
                       "this receipt already credited a purchase")

    async def _insert(self, connection: psycopg.AsyncConnection[Any], user_id: str,
                      request_id: str, fingerprint: bytes,
                      package: vote_service_pb2.VotePackage, verified: Verified,
                      ) -> tuple[Credit, int]:
        """(the credit, the wallet's credited total after it)."""
        votes = package.votes + package.bonus_votes
        purchase_id = str(uuid.uuid4())
        details = {"purchase_id": purchase_id, "request_id": request_id,
                   "store": verified.store, "store_transaction_id": verified.transaction_id,
                   "environment": verified.environment, "package_id": package.package_id,
                   "product_id": verified.product_id, "votes": votes,
                   "price_micros": package.price.amount_micros,
                   "currency": package.price.currency_code,
                   "store_price_micros": verified.store_price_micros,
                   "store_currency": verified.store_currency}
        cursor = await connection.execute(store_sql.CREDIT_PURCHASE, {
            "user": user_id, "votes": votes, "purchase": purchase_id, "request": request_id,
            "store": verified.store, "transaction": verified.transaction_id,
            "reference": verified.reference, "environment": verified.environment,
            "package": package.package_id, "product": verified.product_id,
            "bought": package.votes, "bonus": package.bonus_votes,
            "price": package.price.amount_micros, "currency": package.price.currency_code,
            "store_price": verified.store_price_micros, "store_currency": verified.store_currency,
            "purchased_at": verified.purchased_at, "fingerprint": fingerprint,
            "details": json.dumps(details)})
        row: dict[str, Any] | None = await cursor.fetchone()
        assert row is not None
        return (Credit(purchase_id, verified.transaction_id, votes, row["balance"],
                       package.price.amount_micros, package.price.currency_code,
                       row["credited_at"]), int(row["credited"]))

    async def _consume(self, purchase_id: str, product_id: str, token: str) -> None:
        """Consume a credited Google purchase; on failure the poller tries again."""
        assert self._stores.google is not None
        try:
            await self._stores.calls.run(self._stores.google.consume, product_id, token)
        except ApiError as error:
            log.warning("purchase %s not consumed yet: %s", purchase_id, error.message)
            return
        async with _autocommit(self._storage) as connection:
            await connection.execute(store_sql.RECORD_CONSUMPTION, {"p": purchase_id})

    # -- refunds -----------------------------------------------------------------------------

    async def refund(self, store: str, transaction_id: str, *, source: str, store_reason: str,
                     refunded_at: datetime, details: dict[str, Any]) -> Refund | None:
        """Apply a store's refund of a purchase once; None when there is nothing to apply
        (not a purchase of ours, or refunded before)."""
        user_key: str | None = None
        clawed = 0
        try:
            async with self._storage.pool.connection() as connection:
                async with connection.transaction():
                    purchase = await fetch_one(connection, store_sql.PURCHASE_TO_REFUND,
                                               (store, transaction_id))
                    if purchase is None:
                        await _audit(connection, STORE_ACTOR, store, "purchase.refund_unmatched",
                                     f"{store.lower()}:{transaction_id}", store_reason,
                                     {"source": source, **details})
                        return None
                    user_id, votes = purchase["user_id"], int(purchase["votes"])
                    # The wallet's row lock first: it orders this refund after any other of
                    # the same purchase, and after the ledger batches spending the wallet.
                    wallet = await fetch_one(connection, store_sql.LOCK_WALLET, (user_id,))
                    assert wallet is not None
                    if await fetch_one(connection, store_sql.REFUNDED,
                                       (purchase["purchase_id"],)) is not None:
                        return None
                    user_key = keys.user_key(keys.shard_of(user_id), user_id)
                    clawed = int(await self._scripts.claw(keys=[user_key], args=[
                        votes, wallet["credited"], wallet["spent"] + wallet["clawed_back"]]))
                    spent = votes - clawed
                    refund = Refund(purchase["purchase_id"], clawed, spent, spent > 0)
                    await connection.execute(store_sql.INSERT_REFUND, (
                        str(uuid.uuid4()), refund.purchase_id, user_id, source, store_reason,
                        refunded_at, votes, clawed, spent, refund.flagged_for_review))
                    await connection.execute(store_sql.CLAW_BACK, (clawed, user_id))
                    await _audit(connection, STORE_ACTOR, store, "purchase.refund",
                                 f"user:{user_id}", store_reason, {
                                     "purchase_id": refund.purchase_id, "source": source,
                                     "store_transaction_id": transaction_id,
                                     "votes_credited": votes, "clawed_back": clawed,
                                     "already_spent": spent, **details})
                    if refund.flagged_for_review:
                        await _audit(connection, STORE_ACTOR, store, "purchase.flag_for_review",
                                     f"user:{user_id}", "votes of a refunded purchase were cast",
                                     {"purchase_id": refund.purchase_id,
                                      "already_spent": spent})
                user_key = None  # committed: the claw-back stands
                return refund
        finally:
            if user_key is not None and clawed:
                # Not committed: give admission back what the cache gave up.
                await self._storage.redis.hincrby(user_key, "spent", -clawed)

    async def apple_notification(self, signed_payload: str) -> None:
        if self._stores.apple is None:
            raise not_configured(APPLE)
        notification, transaction = await self._stores.pushes.run(
            self._stores.apple.verify_notification, signed_payload)
        kind = notification.rawNotificationType or ""
        subtype = notification.rawSubtype or ""
        details: dict[str, Any] = {"notification_uuid": notification.notificationUUID,
                                   "type": kind, "subtype": subtype}
        if kind in ("REFUND", "REVOKE") and transaction is not None \
                and transaction.transactionId:
            reason = transaction.rawRevocationReason
            await self.refund(
                APPLE, str(transaction.transactionId), source="APPLE_NOTIFICATION",
                store_reason=f"{kind} revocationReason={reason}",
                refunded_at=_millis(transaction.revocationDate), details=details)
            return
        # Anything else (a declined or reversed refund, a consumption request, a test) is
        # recorded for the people who answer Apple, and changes no balance.
        async with self._storage.pool.connection() as connection:
            await _audit(connection, STORE_ACTOR, APPLE, "purchase.store_notification",
                         f"apple:{getattr(transaction, 'transactionId', None)}", kind, details)
            await connection.commit()

    async def google_notification(self, push_token: str, message: struct_pb2.Struct,
                                  subscription: str) -> None:
        google = self._stores.google
        if google is None:
            raise not_configured(GOOGLE)
        expected = self._stores.google_push_token
        if not expected or not hmac.compare_digest(push_token.encode(), expected.encode()):
            raise ApiError(grpc.StatusCode.PERMISSION_DENIED, "NOTIFICATION_UNAUTHENTICATED",
                           "the push token is missing or wrong")
        fields = json_format.MessageToDict(message)
        try:
            notification = json.loads(base64.b64decode(fields["data"], validate=True))
            if not isinstance(notification, dict):
                raise ValueError("not an object")
        except (KeyError, TypeError, ValueError, binascii.Error):
            raise _notification_invalid("message.data is not base64 JSON") from None
        if notification.get("packageName") != google.package_name:
            raise _notification_invalid("the notification is for another app")
        voided = notification.get("voidedPurchaseNotification") or {}
        one_time = notification.get("oneTimeProductNotification") or {}
        token = voided.get("purchaseToken") or (
            one_time.get("purchaseToken") if one_time.get("notificationType") == 2 else None)
        details = {"message_id": fields.get("messageId") or fields.get("message_id"),
                   "subscription": subscription,
                   "event_time_ms": notification.get("eventTimeMillis")}
        if isinstance(token, str) and token:
            await self._confirm_google_refund(token, notification.get("eventTimeMillis"),
                                              details)
            return
        async with self._storage.pool.connection() as connection:
            await _audit(connection, STORE_ACTOR, GOOGLE, "purchase.store_notification",
                         "google", next(iter(set(notification) - {
                             "version", "packageName", "eventTimeMillis"}), ""), details)
            await connection.commit()

    async def _confirm_google_refund(self, token: str, event_ms: Any,
                                     details: dict[str, Any]) -> None:
        """A push names a token; only Google's Voided Purchases API says it was voided (a
        forged push, past the push token, can make us ask, never claw back)."""
        google = self._stores.google
        assert google is not None
        now = datetime.now(UTC)
        try:
            start = datetime.fromtimestamp(int(event_ms) / 1000, UTC) - timedelta(hours=1)
        except (TypeError, ValueError):
            start = now - timedelta(days=3)
        start = max(start, now - VOIDED_HORIZON + timedelta(minutes=1))
        voided = await self._stores.pushes.run(google.voided, _ms(start), _ms(now))
        match = next((v for v in voided if v.get("purchaseToken") == token), None)
        if match is None:
            async with self._storage.pool.connection() as connection:
                await _audit(connection, STORE_ACTOR, GOOGLE, "purchase.refund_unconfirmed",
                             "google", "not among Google's voided purchases", details)
                await connection.commit()
            return
        await self._apply_voided(match, "GOOGLE_RTDN", details)

    async def _apply_voided(self, voided: dict[str, Any], source: str,
                            details: dict[str, Any]) -> Refund | None:
        token = str(voided.get("purchaseToken", ""))
        order_id = voided.get("orderId") or google_order_fallback(token)
        return await self.refund(
            GOOGLE, str(order_id), source=source,
            store_reason=(f"voidedSource={voided.get('voidedSource')}"
                          f" voidedReason={voided.get('voidedReason')}"),
            refunded_at=_millis(voided.get("voidedTimeMillis")), details=details)

    # -- the poller ----------------------------------------------------------------------------

    async def run_poller(self, interval_s: float) -> None:
        """Google's voided purchases and unconsumed purchases, on one replica at a time."""
        while True:
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # the next round tries again; a store outage must not kill it
                log.exception("purchase poll failed")
            await asyncio.sleep(interval_s)

    async def poll_once(self) -> int:
        """One poll; returns the refunds it applied (0 when another replica holds the turn)."""
        google = self._stores.google
        if google is None:
            return 0
        applied = 0
        # The turn is the transaction's (runtime.locks.try_singleton): held while Google is
        # asked (under the store timeout) and the refunds are applied, each in its own
        # transaction; the new high-water mark commits with the turn.
        async with self._storage.pool.connection() as turn, turn.transaction():
            if not await locks.try_singleton(turn, "vote_svc.purchase-poll"):
                return 0
            now = datetime.now(UTC)
            state = await fetch_one(turn, store_sql.VOIDED_POLLED_TO)
            horizon = now - VOIDED_HORIZON + timedelta(minutes=1)
            start = max(state["polled_to"] - VOIDED_OVERLAP, horizon) if state else horizon
            for voided in await self._stores.pushes.run(google.voided, _ms(start), _ms(now)):
                if await self._apply_voided(voided, "GOOGLE_VOIDED_POLL", {}):
                    applied += 1
            await turn.execute(store_sql.SET_VOIDED_POLLED_TO, (now,))
            await self._consume_missing()
        return applied

    async def _consume_missing(self) -> None:
        async with self._storage.pool.connection() as connection:
            cursor = await connection.execute(store_sql.UNCONSUMED, (CONSUME_RETRY_AFTER,))
            rows: list[dict[str, Any]] = await cursor.fetchall()
        for row in rows:
            await self._consume(row["purchase_id"], row["product_id"], row["store_reference"])


async def refund_report(database_url: str, since: datetime | None = None) -> dict[str, Any]:
    """What refunds took back and what they could not: every refund since `since`, and the
    votes of refunded purchases that had already been cast and stay counted (the policy in
    vote_svc/README.md, Purchases). `televote refunds` prints it."""
    async with await psycopg.AsyncConnection.connect(database_url) as connection:
        cursor = connection.cursor(row_factory=psycopg.rows.dict_row)
        await cursor.execute(store_sql.REFUNDS_SINCE, (since or datetime.fromtimestamp(0, UTC),))
        rows = await cursor.fetchall()
    refunds = [{key: (value.isoformat() if isinstance(value, datetime) else
                      value.strip() if key == "currency_code" else value)
                for key, value in row.items()} for row in rows]
    return {
        "refunds": refunds,
        "votes_credited": sum(r["votes_credited"] for r in refunds),
        "votes_clawed_back": sum(r["clawed_back"] for r in refunds),
        "votes_already_cast_and_counted": sum(r["already_spent"] for r in refunds),
        "voters_flagged_for_review": sorted({r["user_id"] for r in refunds
                                             if r["flagged_for_review"]}),
    }


def _replay(row: dict[str, Any], fingerprint: bytes) -> Credit:
    """The first answer to a request id, if this is the same request."""
    if bytes(row["fingerprint"]) != fingerprint:
        raise ApiError(grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_MISMATCH",
                       "this request_id was used for a different purchase")
    return Credit(row["purchase_id"], row["store_transaction_id"], row["votes"],
                  row["balance_after"], row["price_micros"], row["currency_code"].strip(),
                  row["credited_at"])


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _millis(value: Any) -> datetime:
    if value is None:
        return datetime.now(UTC)
    return datetime.fromtimestamp(int(value) / 1000, UTC)


def _notification_invalid(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, "NOTIFICATION_INVALID", message)
