"""A stand-in for Google Play's servers: the Developer API calls vote_svc makes, and OAuth.

google-api-python-client builds its requests from the androidpublisher v3 discovery document
(its own static copy) against a base URL (vote_svc: VOTE_GOOGLE_API_URL), authorised by a
service-account key exchanged for an access token at the key's `token_uri`. This server
answers those requests on a free port of 127.0.0.1, in the REST shapes Google documents:

- POST /token: the JWT-bearer grant (the assertion is checked against the generated key);
- GET  androidpublisher/v3/applications/{package}/purchases/products/{product}/tokens/{token}
  -> ProductPurchase; POST ...:consume;
- GET  androidpublisher/v3/applications/{package}/purchases/voidedpurchases -> VoidedPurchases.

Purchases are made with `buy()` (a token per purchase, as the Play Billing library gives the
app); `void()` refunds one. `delay_s` and `fail_status` make it slow or broken. It runs in a
thread of its own, so it answers whichever event loop (or process) calls it.
"""

from __future__ import annotations

import itertools
import json
import re
import secrets
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

# The library's state names: ProductPurchase.purchaseState.
PURCHASED, CANCELLED, PENDING = 0, 1, 2
CLIENT_EMAIL = "purchases@televote-test.iam.gserviceaccount.com"

_PRODUCT = re.compile(r"^/androidpublisher/v3/applications/([^/]+)/purchases/products/([^/]+)"
                      r"/tokens/([^/:]+)(:consume)?$")
_VOIDED = re.compile(r"^/androidpublisher/v3/applications/([^/]+)/purchases/voidedpurchases$")


@dataclass
class Purchase:
    """One Play purchase as Google keeps it."""

    token: str
    package_name: str
    product_id: str
    order_id: str
    state: int = PURCHASED
    test: bool = False
    consumed: bool = False
    purchased_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    voided_ms: int | None = None
    voided_reason: int = 0


class FakePlayStore:
    """Google Play for one app (package name), with its OAuth token endpoint."""

    def __init__(self, package_name: str = "com.hangmeas.xfactor") -> None:
        self.package_name = package_name
        self.push_token = secrets.token_urlsafe(24)
        self.delay_s = 0.0
        self.fail_status: int | None = None
        self.calls: list[tuple[str, str]] = []  # (method, path) of every API call
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._key_id = secrets.token_hex(8)
        self._access_tokens: set[str] = set()
        self._purchases: dict[str, Purchase] = {}
        self._orders = itertools.count(1)
        self._order_prefix = "GPA.{}-{}".format(*(secrets.randbelow(9000) + 1000
                                                  for _ in range(2)))
        self._lock = threading.Lock()
        self._called = threading.Condition()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-play",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def service_account_json(self) -> str:
        """A service-account key file, as the Play Console's Google Cloud project issues."""
        pem = self._key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()).decode()
        return json.dumps({
            "type": "service_account", "project_id": "televote-test",
            "private_key_id": self._key_id, "private_key": pem,
            "client_email": CLIENT_EMAIL,
            "client_id": "1", "token_uri": self.url + "token",
            "auth_uri": self.url + "auth",
        })

    def wait_for_calls(self, count: int, timeout_s: float = 10.0) -> bool:
        """Block until the API has been called `count` times in all (tests: "the store is
        now holding that request")."""
        with self._called:
            return self._called.wait_for(lambda: len(self.calls) >= count, timeout_s)

    # -- the store's side of a purchase ------------------------------------------------------

    def buy(self, product_id: str, *, package_name: str | None = None,
            state: int = PURCHASED, test: bool = False) -> str:
        """A purchase made in the app; returns its purchase token."""
        token = secrets.token_urlsafe(96)  # real tokens are long and opaque
        with self._lock:
            order = f"{self._order_prefix}-{next(self._orders):05d}"
            self._purchases[token] = Purchase(token, package_name or self.package_name,
                                              product_id, order, state, test)
        return token

    def purchase(self, token: str) -> Purchase:
        with self._lock:
            return self._purchases[token]

    def void(self, token: str, reason: int = 1) -> Purchase:
        """Google refunds the purchase (voidedReason 1: remorse); returns it."""
        with self._lock:
            purchase = self._purchases[token]
            purchase.state = CANCELLED
            purchase.voided_ms = int(time.time() * 1000)
            purchase.voided_reason = reason
            return purchase

    def rtdn_push(self, token: str, subscription: str = "projects/p/subscriptions/rtdn",
                  ) -> dict[str, Any]:
        """The JSON body a Pub/Sub push subscription posts for the voiding of `token`."""
        import base64
        purchase = self.purchase(token)
        notification = {
            "version": "1.0", "packageName": purchase.package_name,
            "eventTimeMillis": str(purchase.voided_ms or int(time.time() * 1000)),
            "voidedPurchaseNotification": {"purchaseToken": token,
                                           "orderId": purchase.order_id,
                                           "productType": 2, "refundType": 1},
        }
        message_id = str(secrets.randbelow(10**15))
        published = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
        return {"message": {"data": base64.b64encode(json.dumps(notification).encode()).decode(),
                            "messageId": message_id, "message_id": message_id,
                            "publishTime": published, "publish_time": published,
                            "attributes": {}},
                "subscription": subscription}

    # -- HTTP -------------------------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        store = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                store._serve(self, "GET")

            def do_POST(self) -> None:
                store._serve(self, "POST")

        return Handler

    def _serve(self, request: BaseHTTPRequestHandler, method: str) -> None:
        url = urllib.parse.urlsplit(request.path)
        length = int(request.headers.get("content-length") or 0)
        body = request.rfile.read(length) if length else b""
        if url.path == "/token" and method == "POST":
            status, answer = self._token(body)
        else:
            with self._called:
                self.calls.append((method, url.path))
                self._called.notify_all()
            if self.delay_s:
                time.sleep(self.delay_s)
            if self.fail_status is not None:
                status, answer = self.fail_status, _error(self.fail_status, "backendError",
                                                          "the fake store is failing")
            elif request.headers.get("authorization", "").removeprefix("Bearer ") \
                    not in self._access_tokens:
                status, answer = 401, _error(401, "authError", "Invalid Credentials")
            else:
                status, answer = self._api(method, url.path,
                                           urllib.parse.parse_qs(url.query))
        data = json.dumps(answer).encode() if answer is not None else b""
        request.send_response(status)
        request.send_header("content-type", "application/json; charset=UTF-8")
        request.send_header("content-length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)

    def _token(self, body: bytes) -> tuple[int, Any]:
        form = urllib.parse.parse_qs(body.decode())
        try:
            # google-auth names Google's own token endpoint as the audience, wherever the
            # key's token_uri points: the signature and the issuer are what is checked here.
            claims = jwt.decode(form["assertion"][0], self._key.public_key(),
                                algorithms=["RS256"], options={"verify_aud": False})
            if claims.get("iss") != CLIENT_EMAIL:
                raise jwt.InvalidTokenError("another service account")
        except (KeyError, jwt.InvalidTokenError):
            return 400, {"error": "invalid_grant", "error_description": "bad assertion"}
        access = secrets.token_urlsafe(32)
        with self._lock:
            self._access_tokens.add(access)
        return 200, {"access_token": access, "token_type": "Bearer", "expires_in": 3600}

    def _api(self, method: str, path: str, query: dict[str, list[str]]) -> tuple[int, Any]:
        if match := _PRODUCT.match(path):
            package, product, token, consume = match.groups()
            token = urllib.parse.unquote(token)
            with self._lock:
                purchase = self._purchases.get(token)
                if purchase is None:
                    return 400, _error(400, "invalid", "Invalid Value")
                if purchase.package_name != package:
                    return 400, _error(400, "purchaseTokenDoesNotMatchPackageName",
                                       "The purchase token does not match the package name.")
                if purchase.product_id != product:
                    return 400, _error(400, "purchaseTokenDoesNotMatchProductId",
                                       "The purchase token does not match the product ID.")
                if consume:
                    if purchase.state != PURCHASED:
                        return 400, _error(400, "productNotOwnedByUser",
                                           "The product is not owned by the user.")
                    purchase.consumed = True
                    return 204, None
                return 200, _product_purchase(purchase)
        if (match := _VOIDED.match(path)) and method == "GET":
            start = int(query.get("startTime", ["0"])[0])
            end = int(query.get("endTime", [str(2**62)])[0])
            with self._lock:
                voided = [p for p in self._purchases.values()
                          if p.package_name == match.group(1) and p.voided_ms is not None
                          and start <= p.voided_ms <= end]
            voided.sort(key=lambda p: p.voided_ms or 0)
            return 200, {"voidedPurchases": [{
                "kind": "androidpublisher#voidedPurchase", "purchaseToken": p.token,
                "purchaseTimeMillis": str(p.purchased_ms), "voidedTimeMillis": str(p.voided_ms),
                "orderId": p.order_id, "voidedSource": 1, "voidedReason": p.voided_reason,
            } for p in voided]}
        return 404, _error(404, "notFound", "Not Found")


def _product_purchase(purchase: Purchase) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "kind": "androidpublisher#productPurchase",
        "purchaseTimeMillis": str(purchase.purchased_ms),
        "purchaseState": purchase.state,
        "consumptionState": 1 if purchase.consumed else 0,
        "developerPayload": "", "orderId": purchase.order_id,
        "acknowledgementState": 1 if purchase.consumed else 0,
        "productId": purchase.product_id, "quantity": 1, "regionCode": "KH",
    }
    if purchase.test:
        answer["purchaseType"] = 0  # a license tester's purchase: no money moved
    return answer


def _error(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message,
                      "errors": [{"message": message, "domain": "androidpublisher",
                                  "reason": reason}]}}
