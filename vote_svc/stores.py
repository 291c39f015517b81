"""The app stores, through the libraries their owners publish, kept off the event loop.

Both libraries are synchronous (pyOpenSSL and PyJWT for Apple, httplib2 for Google), and a
store can be slow: every call runs on `StoreCalls`' own threads with a deadline and a cap on
calls in flight, so a slow store answers STORE_UNAVAILABLE and never holds up a vote.

- Apple: `SignedDataVerifier` (app-store-server-library) checks a signed transaction or
  notification: the x5c chain up to the configured root with Apple's marker OIDs, optionally
  OCSP, ES256, then bundle id and environment.
- Google: `googleapiclient` androidpublisher v3 from the library's static discovery document,
  authorised by a service-account key (google-auth): purchases.products.get and .consume,
  and purchases.voidedpurchases.list.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import grpc

from runtime.config import ConfigError
from runtime.errors import ApiError

T = TypeVar("T")

APPLE, GOOGLE = "APPLE", "GOOGLE"
GOOGLE_SCOPE = "https://www.googleapis.com/auth/androidpublisher"

# ProductPurchase.purchaseState
_PURCHASED, _CANCELLED, _PENDING = 0, 1, 2


def store_unavailable(detail: str) -> ApiError:
    return ApiError(grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE",
                    f"the store could not be asked ({detail}); nothing was credited, retry "
                    "with the same request_id", retry_after_seconds=1.0)


def receipt_invalid(cause: str, message: str) -> ApiError:
    return ApiError(grpc.StatusCode.FAILED_PRECONDITION, "RECEIPT_INVALID", message,
                    metadata={"cause": cause})


def not_configured(store: str) -> ApiError:
    return ApiError(grpc.StatusCode.FAILED_PRECONDITION, "STORE_NOT_CONFIGURED",
                    f"this deployment does not sell through {store.title()}")


@dataclass(frozen=True)
class Verified:
    """A purchase the store vouched for."""

    store: str
    #: Apple transactionId / Google orderId: credits once.
    transaction_id: str
    #: Apple originalTransactionId / the Google purchase token (kept: consuming it again
    #: after a failure, and matching notifications, need it).
    reference: str
    product_id: str
    environment: str
    purchased_at: datetime
    store_price_micros: int | None = None
    store_currency: str | None = None


def google_order_fallback(token: str) -> str:
    """The transaction id of a Google purchase without an order id (a promo code's)."""
    return "token:" + hashlib.sha256(token.encode()).hexdigest()


def _millis(value: int | str | None) -> datetime:
    if value is None:
        return datetime.now(UTC)
    return datetime.fromtimestamp(int(value) / 1000, UTC)


class StoreCalls:
    """Runs the stores' synchronous calls on threads of their own, each under a deadline.

    A call is refused at once when `max_inflight` are running: a queue behind a stuck store
    would only turn every purchase into a timeout. A call that times out keeps its thread
    (Python cannot stop it) and its slot until it really ends, so a stuck store cannot pile
    up threads either.
    """

    def __init__(self, threads: int, max_inflight: int, timeout_s: float) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, "store")
        self._max = max_inflight
        self._inflight = 0
        self._lock = threading.Lock()
        self.timeout_s = timeout_s

    async def run(self, call: Callable[..., T], *args: Any) -> T:
        with self._lock:
            if self._inflight >= self._max:
                raise store_unavailable("too many store calls in flight")
            self._inflight += 1
        try:
            future = self._pool.submit(call, *args)
        except BaseException:
            self._release(None)
            raise
        future.add_done_callback(self._release)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout_s)
        except TimeoutError:
            raise store_unavailable(f"no answer in {self.timeout_s:g} s") from None

    def _release(self, _: object) -> None:
        with self._lock:
            self._inflight -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _read_certificate(path: Path) -> bytes:
    """DER bytes of a DER or PEM certificate file."""
    data = path.read_bytes()
    if data.lstrip().startswith(b"-----BEGIN"):
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        return x509.load_pem_x509_certificate(data).public_bytes(serialization.Encoding.DER)
    return data


class AppleStore:
    """Verifies StoreKit 2 signed transactions and Server Notifications V2 (synchronous)."""

    def __init__(self, root_paths: list[Path], bundle_id: str, environment: str,
                 app_apple_id: int | None, online_checks: bool) -> None:
        from appstoreserverlibrary.models.Environment import Environment
        from appstoreserverlibrary.signed_data_verifier import SignedDataVerifier
        self.environment = Environment(environment)
        self._verifier = SignedDataVerifier(
            [_read_certificate(path) for path in root_paths], online_checks,
            self.environment, bundle_id, app_apple_id)

    def _refusal(self, error: Exception, what: str) -> ApiError:
        from appstoreserverlibrary.signed_data_verifier import (
            VerificationException,
            VerificationStatus,
        )
        if isinstance(error, VerificationException):
            if error.status == VerificationStatus.RETRYABLE_VERIFICATION_FAILURE:
                return store_unavailable("Apple's certificate status could not be checked")
            cause = {
                VerificationStatus.INVALID_APP_IDENTIFIER: "OTHER_APP",
                VerificationStatus.INVALID_ENVIRONMENT: "OTHER_ENVIRONMENT",
            }.get(error.status, "SIGNATURE")
        else:
            cause = "MALFORMED"
        return receipt_invalid(cause, f"the {what} did not verify ({cause.lower()})")

    def verify_transaction(self, signed_transaction: str) -> Verified:
        try:
            transaction = self._verifier.verify_and_decode_signed_transaction(
                signed_transaction)
        except Exception as error:  # the library wraps what it knows; the rest is malformed
            raise self._refusal(error, "signed transaction") from None
        return self.verified(transaction)

    def verified(self, transaction: Any) -> Verified:
        """A decoded transaction the store vouches for, or RECEIPT_INVALID."""
        if not transaction.transactionId or not transaction.productId:
            raise receipt_invalid("MALFORMED", "the transaction has no id or product")
        if transaction.revocationDate is not None:
            raise receipt_invalid("REVOKED", "Apple refunded or revoked this transaction")
        if transaction.quantity not in (None, 1):
            raise receipt_invalid("QUANTITY", "a vote package is bought one at a time")
        price = transaction.price
        return Verified(
            store=APPLE, transaction_id=str(transaction.transactionId),
            reference=str(transaction.originalTransactionId or transaction.transactionId),
            product_id=transaction.productId, environment=self.environment.value,
            purchased_at=_millis(transaction.purchaseDate),
            # Apple's price is in milliunits of the currency.
            store_price_micros=price * 1000 if price is not None else None,
            store_currency=transaction.currency)

    def verify_notification(self, signed_payload: str) -> tuple[Any, Any | None]:
        """(the decoded notification, its decoded transaction when it carries one)."""
        try:
            notification = self._verifier.verify_and_decode_notification(signed_payload)
            transaction = None
            if notification.data is not None and notification.data.signedTransactionInfo:
                transaction = self._verifier.verify_and_decode_signed_transaction(
                    notification.data.signedTransactionInfo)
        except Exception as error:
            refusal = self._refusal(error, "notification")
            if refusal.reason == "RECEIPT_INVALID":
                raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, "NOTIFICATION_INVALID",
                               refusal.message, metadata=refusal.metadata) from None
            raise refusal from None
        return notification, transaction


class GooglePlay:
    """The Play Developer API for one app (synchronous; one HTTP connection per thread)."""

    def __init__(self, credentials_path: Path, package_name: str, api_url: str,
                 environment: str, timeout_s: float) -> None:
        from google.oauth2 import service_account
        from googleapiclient.discovery import build
        self.package_name = package_name
        self.environment = environment
        self._credentials = service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
            json.loads(credentials_path.read_text()), scopes=[GOOGLE_SCOPE])
        options = {"api_endpoint": api_url} if api_url else None
        self._service = build("androidpublisher", "v3", credentials=self._credentials,
                              static_discovery=True, cache_discovery=False,
                              client_options=options)
        self._timeout_s = timeout_s
        self._local = threading.local()

    def _http(self) -> Any:
        # httplib2 connections are not thread-safe: one per store thread, reused.
        http = getattr(self._local, "http", None)
        if http is None:
            import google_auth_httplib2
            import httplib2
            http = google_auth_httplib2.AuthorizedHttp(
                self._credentials, http=httplib2.Http(timeout=self._timeout_s))
            self._local.http = http
        return http

    def _execute(self, request: Any) -> Any:
        from google.auth.exceptions import GoogleAuthError
        from googleapiclient.errors import HttpError
        try:
            return request.execute(http=self._http())
        except HttpError as error:
            status = int(error.resp.status)
            if status in (400, 404, 410):
                reason = ""
                if isinstance(error.error_details, list) and error.error_details:
                    reason = str(error.error_details[0].get("reason", ""))
                raise receipt_invalid(
                    "OTHER_APP" if "PackageName" in reason else
                    "OTHER_PRODUCT" if "ProductId" in reason else "UNKNOWN_PURCHASE",
                    f"Google Play does not know this purchase ({reason or status})",
                ) from None
            raise store_unavailable(f"Google Play answered {status}") from None
        except (OSError, GoogleAuthError) as error:  # unreachable, timed out, token refused
            self._local.http = None
            raise store_unavailable(type(error).__name__) from None

    def product_purchase(self, product_id: str, token: str) -> dict[str, Any]:
        purchases = self._service.purchases().products()
        answer: dict[str, Any] = self._execute(purchases.get(
            packageName=self.package_name, productId=product_id, token=token))
        return answer

    def verify(self, product_id: str, token: str) -> Verified:
        """purchases.products.get: the purchase must be PURCHASED, in this environment."""
        purchase = self.product_purchase(product_id, token)
        state = purchase.get("purchaseState")
        if state == _PENDING:
            raise receipt_invalid("PENDING", "the purchase is still pending payment")
        if state != _PURCHASED:
            raise receipt_invalid("CANCELLED", "the purchase was cancelled or refunded")
        environment = "Sandbox" if purchase.get("purchaseType") == 0 else "Production"
        if environment != self.environment:
            raise receipt_invalid("OTHER_ENVIRONMENT",
                                  f"a {environment.lower()} purchase in {self.environment}")
        order_id = purchase.get("orderId") or google_order_fallback(token)
        return Verified(
            store=GOOGLE, transaction_id=order_id, reference=token,
            product_id=purchase.get("productId") or product_id,
            environment=environment, purchased_at=_millis(purchase.get("purchaseTimeMillis")))

    def consume(self, product_id: str, token: str) -> None:
        self._execute(self._service.purchases().products().consume(
            packageName=self.package_name, productId=product_id, token=token))

    def voided(self, start_ms: int, end_ms: int) -> list[dict[str, Any]]:
        """Every voided purchase (refunds, chargebacks, revocations) voided in the range."""
        voided: list[dict[str, Any]] = []
        page: str | None = None
        while True:
            answer = self._execute(self._service.purchases().voidedpurchases().list(
                packageName=self.package_name, startTime=start_ms, endTime=end_ms,
                maxResults=1000, token=page))
            voided.extend(answer.get("voidedPurchases", []))
            page = (answer.get("tokenPagination") or {}).get("nextPageToken")
            if not page:
                return voided


@dataclass
class Stores:
    """The stores this deployment sells through (None: not configured) and their threads:
    `calls` for purchases, `pushes` for notifications and the poller, so that a flood of
    (anonymous, possibly junk) notifications cannot take the threads purchases need."""

    calls: StoreCalls
    pushes: StoreCalls
    apple: AppleStore | None
    google: GooglePlay | None
    google_push_token: str

    def close(self) -> None:
        self.calls.close()
        self.pushes.close()

    @classmethod
    def from_config(cls, config: Any) -> Stores:
        timeout_s = config.vote_store_timeout_ms / 1000
        apple = None
        if config.vote_apple_root_certs:
            try:
                apple = AppleStore(
                    [Path(p.strip()) for p in config.vote_apple_root_certs.split(",")
                     if p.strip()],
                    config.vote_apple_bundle_id, config.vote_apple_environment,
                    config.vote_apple_app_apple_id, config.vote_apple_online_checks)
            except (OSError, ValueError) as error:
                raise ConfigError(
                    "vote_svc: invalid configuration: VOTE_APPLE_ROOT_CERTS,"
                    f" VOTE_APPLE_ENVIRONMENT or VOTE_APPLE_APP_APPLE_ID: {error}") from None
        google = None
        if config.vote_google_credentials:
            if config.vote_google_environment not in ("Production", "Sandbox"):
                raise ConfigError("vote_svc: invalid configuration: VOTE_GOOGLE_ENVIRONMENT:"
                                  " Production or Sandbox")
            try:
                google = GooglePlay(Path(config.vote_google_credentials),
                                    config.vote_google_package_name,
                                    config.vote_google_api_url,
                                    config.vote_google_environment, timeout_s)
            except (OSError, ValueError, KeyError) as error:
                raise ConfigError("vote_svc: invalid configuration: VOTE_GOOGLE_CREDENTIALS:"
                                  f" not a service-account key file ({error})") from None
        return cls(StoreCalls(config.vote_store_threads, config.vote_store_max_inflight,
                              timeout_s),
                   StoreCalls(2, config.vote_store_max_inflight, timeout_s),
                   apple, google, config.vote_google_push_token)
