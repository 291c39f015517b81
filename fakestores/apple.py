"""A stand-in for the App Store's signing: StoreKit 2 transactions and Server Notifications V2.

Apple signs both as ES256 JWS whose `x5c` header carries leaf, intermediate and root; the App
Store Server Library checks the chain up to a configured root, Apple's marker OIDs on the leaf
(1.2.840.113635.100.6.11.1) and the intermediate (1.2.840.113635.100.6.2.1), then the
signature. This class makes a chain of its own with the same shape, so the real library
verifies what it signs once vote_svc is given `root_der` instead of Apple's root.

With online checks on, the library also asks the OCSP responder named in each certificate
(Authority Information Access) whether the leaf and the intermediate are still good, and
caches a verified chain for 15 minutes. The stand-in runs that responder too, on a free port
of 127.0.0.1 (`ocsp_down` / `ocsp_delay_s` make Apple unreachable or slow; `rotate_leaf()`
starts a chain the library has not cached).
"""

from __future__ import annotations

import base64
import datetime
import itertools
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, NameOID

LEAF_OID = x509.ObjectIdentifier("1.2.840.113635.100.6.11.1")
INTERMEDIATE_OID = x509.ObjectIdentifier("1.2.840.113635.100.6.2.1")
_ASN1_NULL = b"\x05\x00"

_serial = itertools.count(int(time.time() * 1000))


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "televote test stores")])


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey,
                 issuer: x509.Certificate | None, issuer_key: ec.EllipticCurvePrivateKey,
                 ca: bool, marker: x509.ObjectIdentifier | None,
                 ocsp_url: str | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    public = key.public_key()
    builder = (x509.CertificateBuilder()
               .subject_name(_name(subject))
               .issuer_name(issuer.subject if issuer else _name(subject))
               .public_key(public)
               .serial_number(next(_serial))
               .not_valid_before(now - datetime.timedelta(days=1))
               .not_valid_after(now + datetime.timedelta(days=3650))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(
                   digital_signature=not ca, content_commitment=False, key_encipherment=False,
                   data_encipherment=False, key_agreement=False, key_cert_sign=ca,
                   crl_sign=ca, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(public),
                              critical=False))
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(
                issuer_key.public_key()), critical=False)
    if marker is not None:
        builder = builder.add_extension(x509.UnrecognizedExtension(marker, _ASN1_NULL),
                                        critical=False)
    if ocsp_url is not None:
        builder = builder.add_extension(x509.AuthorityInformationAccess([
            x509.AccessDescription(AuthorityInformationAccessOID.OCSP,
                                   x509.UniformResourceIdentifier(ocsp_url))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


class FakeAppStore:
    """Signs transactions and notifications for one app (bundle id) in one environment."""

    def __init__(self, bundle_id: str = "com.hangmeas.xfactor", environment: str = "Sandbox",
                 app_apple_id: int = 1234567890, ocsp: bool = False) -> None:
        self.bundle_id = bundle_id
        self.environment = environment
        self.app_apple_id = app_apple_id
        self.ocsp_down = False
        self.ocsp_delay_s = 0.0
        self.ocsp_requests = 0
        self._server: ThreadingHTTPServer | None = None
        self.ocsp_url: str | None = None
        if ocsp:
            self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._ocsp_handler())
            self._server.daemon_threads = True
            self.ocsp_url = f"http://127.0.0.1:{self._server.server_address[1]}/ocsp"
            threading.Thread(target=self._server.serve_forever, name="fake-apple-ocsp",
                             daemon=True).start()
        root_key = ec.generate_private_key(ec.SECP256R1())
        self._intermediate_key = ec.generate_private_key(ec.SECP256R1())
        self._root = _certificate("Fake Apple Root CA", root_key, None, root_key, True, None)
        self._intermediate = _certificate("Fake Apple WWDR CA", self._intermediate_key,
                                          self._root, root_key, True, INTERMEDIATE_OID,
                                          self.ocsp_url)
        #: serial -> (certificate, its issuer, the issuer's key): what the responder vouches.
        self._issued: dict[int, tuple[x509.Certificate, x509.Certificate,
                                      ec.EllipticCurvePrivateKey]] = {
            self._intermediate.serial_number: (self._intermediate, self._root, root_key)}
        self.root_der = self._root.public_bytes(serialization.Encoding.DER)
        self.rotate_leaf()
        self._transactions = itertools.count(2_000_000_000_000_000 + next(_serial) % 10**9)

    def rotate_leaf(self) -> None:
        """Sign from now on with a new leaf certificate (a chain the verifier has not seen)."""
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        leaf = _certificate("Fake Mac App Store Receipt Signing", self._leaf_key,
                            self._intermediate, self._intermediate_key, False, LEAF_OID,
                            self.ocsp_url)
        self._issued[leaf.serial_number] = (leaf, self._intermediate, self._intermediate_key)
        self._x5c = [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
                     for cert in (leaf, self._intermediate, self._root)]

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def _ocsp_answer(self, body: bytes) -> bytes:
        """A signed OCSP response: GOOD for every certificate of this chain, signed by its
        issuer (which the library trusts as the responder without more)."""
        request = ocsp.load_der_ocsp_request(body)
        certificate, issuer, issuer_key = self._issued[request.serial_number]
        now = datetime.datetime.now(datetime.UTC)
        response = (ocsp.OCSPResponseBuilder()
                    .add_response(cert=certificate, issuer=issuer, algorithm=hashes.SHA256(),
                                  cert_status=ocsp.OCSPCertStatus.GOOD,
                                  this_update=now - datetime.timedelta(minutes=1),
                                  next_update=now + datetime.timedelta(hours=1),
                                  revocation_time=None, revocation_reason=None)
                    .responder_id(ocsp.OCSPResponderEncoding.HASH, issuer)
                    .sign(issuer_key, hashes.SHA256()))
        return response.public_bytes(serialization.Encoding.DER)

    def _ocsp_handler(self) -> type[BaseHTTPRequestHandler]:
        store = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                store.ocsp_requests += 1
                if store.ocsp_delay_s:
                    time.sleep(store.ocsp_delay_s)
                if store.ocsp_down:
                    status, answer = 503, b""
                else:
                    status, answer = 200, store._ocsp_answer(body)
                self.send_response(status)
                self.send_header("content-type", "application/ocsp-response")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        return Handler

    def _sign(self, payload: dict[str, Any]) -> str:
        return jwt.encode(payload, self._leaf_key, algorithm="ES256",
                          headers={"x5c": self._x5c})

    def transaction(self, product_id: str, *, transaction_id: str | None = None,
                    price_micros: int = 990_000, currency: str = "USD",
                    **overrides: Any) -> dict[str, Any]:
        """A consumable's JWSTransactionDecodedPayload, as Apple fills it in."""
        now_ms = int(time.time() * 1000)
        transaction_id = transaction_id or str(next(self._transactions))
        payload = {
            "transactionId": transaction_id, "originalTransactionId": transaction_id,
            "bundleId": self.bundle_id, "productId": product_id,
            "purchaseDate": now_ms, "originalPurchaseDate": now_ms, "quantity": 1,
            "type": "Consumable", "inAppOwnershipType": "PURCHASED", "signedDate": now_ms,
            "environment": self.environment, "transactionReason": "PURCHASE",
            "storefront": "KHM", "storefrontId": "143598",
            # Apple's price is in milliunits of the currency.
            "price": price_micros // 1000, "currency": currency,
        }
        payload.update(overrides)
        return payload

    def sign_transaction(self, product_id: str, **fields: Any) -> str:
        """A signed transaction (what StoreKit 2 gives the app after a purchase)."""
        return self._sign(self.transaction(product_id, **fields))

    def sign_payload(self, payload: dict[str, Any]) -> str:
        """Any payload signed by this store's chain (for tests that bend a field)."""
        return self._sign(payload)

    def sign_notification(self, notification_type: str, transaction: dict[str, Any], *,
                          subtype: str | None = None, **data: Any) -> str:
        """An App Store Server Notification V2 `signedPayload` about one transaction."""
        now_ms = int(time.time() * 1000)
        body: dict[str, Any] = {
            "notificationType": notification_type, "notificationUUID": str(uuid.uuid4()),
            "version": "2.0", "signedDate": now_ms,
            "data": {"appAppleId": self.app_apple_id, "bundleId": self.bundle_id,
                     "bundleVersion": "1", "environment": self.environment,
                     "signedTransactionInfo": self._sign(transaction), **data},
        }
        if subtype:
            body["subtype"] = subtype
        return self._sign(body)

    def refund(self, transaction: dict[str, Any], notification_type: str = "REFUND",
               reason: int = 0) -> str:
        """The notification Apple sends when it refunds (REFUND) or revokes (REVOKE)."""
        revoked = dict(transaction, revocationDate=int(time.time() * 1000),
                       revocationReason=reason, signedDate=int(time.time() * 1000))
        return self.sign_notification(notification_type, revoked)
