"""Vote packages bought in the stores, through the edge (native gRPC and JSON): verified by
the stores' real libraries against the stand-ins of fakestores/, credited once, refunds
clawed back; bad input refused with its reason and nothing credited."""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Awaitable
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from fakestores import FakeAppStore
from fakestores.google import CANCELLED, PENDING
from ops.stack import Stack
from runtime import keys
from runtime.access import Role
from runtime.errors import error_info
from runtime.storage import Storage, create_pool, create_redis
from televote.vote.v1 import vote_service_pb2, vote_service_pb2_grpc
from tests.conftest import FakeStores
from tests.support_windows import open_test_round
from tests.vote_support import (
    PAID,
    http,
    json_reason,
    new_id,
    query,
    refusal,
    stub,
    token,
    vote_request,
    voter,
)
from vote_svc.admission import Scripts
from vote_svc.config import VoteConfig
from vote_svc.packages import PackageCatalogue
from vote_svc.purchases import Purchases, refund_report
from vote_svc.stores import Stores

APPLE = vote_service_pb2.STORE_APPLE
GOOGLE = vote_service_pb2.STORE_GOOGLE
STORE_JSON = {APPLE: "STORE_APPLE", GOOGLE: "STORE_GOOGLE"}


async def _package(channel: grpc.aio.Channel, stack: Stack, votes: int,
                   ) -> vote_service_pb2.VotePackage:
    reply = await stub(channel).ListVotePackages(vote_service_pb2.ListVotePackagesRequest(),
                                                 metadata=voter(stack, "catalogue-reader"))
    return next(p for p in reply.packages if p.votes == votes)


def _grpc_buy(stack: Stack, channel: grpc.aio.Channel, user: str, store: int, package_id: str,
              receipt: str, request_id: str | None = None,
              ) -> Awaitable[vote_service_pb2.PurchaseVotePackageResponse]:
    return stub(channel).PurchaseVotePackage(vote_service_pb2.PurchaseVotePackageRequest(
        request_id=request_id or new_id(), store=store,  # type: ignore[arg-type]
        package_id=package_id, store_receipt=receipt), metadata=voter(stack, user))


async def _json_buy(stack: Stack, user: str, store: int, package_id: str, receipt: str,
                    request_id: str | None = None) -> tuple[int, dict[str, Any]]:
    return await asyncio.to_thread(
        http, stack, "POST", "/v1/purchases", token(stack, Role.VOTER, user),
        {"requestId": request_id or new_id(), "store": STORE_JSON[store],
         "packageId": package_id, "storeReceipt": receipt})


async def _credited(stack: Stack, user: str) -> int:
    rows = await query(stack.database_url, "SELECT credited FROM wallets WHERE user_id = %s",
                       user)
    return int(rows[0]["credited"]) if rows else 0


def _post_anonymous(stack: Stack, path: str, body: Any) -> tuple[int, dict[str, Any]]:
    """A store's push: JSON, no televote token."""
    request = urllib.request.Request(f"{stack.edge_url}{path}", data=json.dumps(body).encode(),
                                     method="POST",
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


# -- buying --------------------------------------------------------------------------------


async def test_apple_purchase_over_grpc_credits_votes_and_bonus_once(
        stack: Stack, edge_channel: grpc.aio.Channel, fake_stores: FakeStores) -> None:
    user = f"apple-{new_id()}"
    package = await _package(edge_channel, stack, 50)
    receipt = fake_stores.apple.sign_transaction(package.apple_product_id,
                                                 price_micros=3_990_000)
    request_id = new_id()
    first = await _grpc_buy(stack, edge_channel, user, APPLE, package.package_id, receipt,
                            request_id)
    assert first.votes_credited == package.total_votes == 60
    assert first.paid_balance == 60
    assert first.price.amount_micros == 3_990_000
    again = await _grpc_buy(stack, edge_channel, user, APPLE, package.package_id, receipt,
                            request_id)
    assert again == first  # the first answer, credited once
    assert await _credited(stack, user) == 60
    rows = await query(stack.database_url, "SELECT * FROM purchases WHERE user_id = %s", user)
    assert len(rows) == 1
    assert rows[0]["store"] == "APPLE" and rows[0]["environment"] == "Sandbox"
    assert rows[0]["store_transaction_id"] == first.store_transaction_id
    assert rows[0]["store_price_micros"] == 3_990_000
    audit = await query(stack.database_url, "SELECT details FROM audit_log"
                        " WHERE action = 'purchase.credit' AND target = %s", f"user:{user}")
    assert [a["details"]["purchase_id"] for a in audit] == [first.purchase_id]
    # The same request id with another receipt is a different purchase.
    code, reason, _ = await refusal(_grpc_buy(
        stack, edge_channel, user, APPLE, package.package_id,
        fake_stores.apple.sign_transaction(package.apple_product_id), request_id))
    assert (code, reason) == (grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_MISMATCH")


async def test_google_purchase_over_json_is_credited_then_consumed(
        stack: Stack, edge_channel: grpc.aio.Channel, fake_stores: FakeStores) -> None:
    user = f"google-{new_id()}"
    package = await _package(edge_channel, stack, 10)
    purchase_token = fake_stores.google.buy(package.google_product_id)
    request_id = new_id()
    status, body = await _json_buy(stack, user, GOOGLE, package.package_id, purchase_token,
                                   request_id)
    assert status == 200, body
    assert body["votesCredited"] == 10 and body["paidBalance"] == "10"
    assert body["storeTransactionId"] == fake_stores.google.purchase(purchase_token).order_id
    assert fake_stores.google.purchase(purchase_token).consumed
    rows = await query(stack.database_url, "SELECT c.purchase_id FROM purchase_consumptions c"
                       " JOIN purchases p USING (purchase_id) WHERE p.user_id = %s", user)
    assert len(rows) == 1
    status, again = await _json_buy(stack, user, GOOGLE, package.package_id, purchase_token,
                                    request_id)
    assert (status, again) == (200, body)
    assert await _credited(stack, user) == 10


@pytest.mark.parametrize("path", ["grpc", "json"])
async def test_a_receipt_from_another_user_is_already_used(
        stack: Stack, edge_channel: grpc.aio.Channel, fake_stores: FakeStores,
        path: str) -> None:
    package = await _package(edge_channel, stack, 10)
    owner, other = f"owner-{new_id()}", f"other-{new_id()}"
    for store, receipt in ((APPLE, fake_stores.apple.sign_transaction(package.apple_product_id)),
                           (GOOGLE, fake_stores.google.buy(package.google_product_id))):
        await _grpc_buy(stack, edge_channel, owner, store, package.package_id, receipt)
        if path == "grpc":
            code, reason, _ = await refusal(_grpc_buy(stack, edge_channel, other, store,
                                                      package.package_id, receipt))
            assert (code, reason) == (grpc.StatusCode.ALREADY_EXISTS, "RECEIPT_ALREADY_USED")
        else:
            status, body = await _json_buy(stack, other, store, package.package_id, receipt)
            assert (status, json_reason(body)) == (409, "RECEIPT_ALREADY_USED")
    assert await _credited(stack, other) == 0
    assert await _credited(stack, owner) == 20
    audit = await query(stack.database_url, "SELECT 1 FROM audit_log"
                        " WHERE action = 'purchase.receipt_reused' AND target = %s",
                        f"user:{other}")
    assert len(audit) == 2


async def test_100_concurrent_submissions_of_one_receipt_by_two_users_credit_once(
        stack: Stack, edge_channel: grpc.aio.Channel, fake_stores: FakeStores) -> None:
    package = await _package(edge_channel, stack, 200)
    users = [f"race-a-{new_id()}", f"race-b-{new_id()}"]
    receipt = fake_stores.apple.sign_transaction(package.apple_product_id)
    # Each user taps five times, and each tap is retried ten times with its request id.
    calls = [(users[n % 2], request_id) for n in range(10) for request_id in [new_id()]
             for _ in range(10)]

    async def one(user: str, request_id: str) -> tuple[str, str, str]:
        try:
            reply = await _grpc_buy(stack, edge_channel, user, APPLE, package.package_id,
                                    receipt, request_id)
            return user, request_id, reply.purchase_id
        except grpc.aio.AioRpcError as error:
            info = error_info(error)
            return user, request_id, info.reason if info else error.code().name

    outcomes = await asyncio.gather(*(one(user, rid) for user, rid in calls))
    credited = {(user, rid, outcome) for user, rid, outcome in outcomes
                if outcome != "RECEIPT_ALREADY_USED"}
    assert len(credited) == 1, Counter(outcome for _, _, outcome in outcomes)
    ((winner, winning_request, purchase_id),) = credited
    assert all(outcome == purchase_id for user, rid, outcome in outcomes
               if rid == winning_request)  # every retry of the winner got the first answer
    loser = next(user for user in users if user != winner)
    assert await _credited(stack, winner) == package.total_votes
    assert await _credited(stack, loser) == 0
    rows = await query(stack.database_url, "SELECT user_id FROM purchases"
                       " WHERE user_id = ANY(%s)", users)
    assert [row["user_id"] for row in rows] == [winner]


# -- bad input -----------------------------------------------------------------------------

def _bad_receipts(stores: FakeStores, package: vote_service_pb2.VotePackage,
                  other_package: vote_service_pb2.VotePackage,
                  ) -> dict[str, tuple[int, str, str, str]]:
    """name -> (store, package id, receipt, reason[:ErrorInfo cause])."""
    apple = stores.apple
    good = apple.sign_transaction(package.apple_product_id)
    header, payload, signature = good.split(".")
    forged_payload = json.loads(base64.urlsafe_b64decode(payload + "=="))
    forged_payload["productId"] = other_package.apple_product_id
    forged = ".".join([header, base64.urlsafe_b64encode(json.dumps(forged_payload).encode())
                       .decode().rstrip("="), signature])
    stranger = FakeAppStore()  # a chain to a root the deployment does not trust
    production = FakeAppStore(environment="Production")
    google = stores.google
    pid, apple_product, google_product = (package.package_id, package.apple_product_id,
                                          package.google_product_id)
    return {
        "forged JWS": (APPLE, pid, forged, "RECEIPT_INVALID:SIGNATURE"),
        "truncated JWS": (APPLE, pid, good[: len(good) // 2], "RECEIPT_INVALID:SIGNATURE"),
        "not a JWS": (APPLE, pid, "hello", "RECEIPT_INVALID:SIGNATURE"),
        "chain to another root": (APPLE, pid, stranger.sign_transaction(apple_product),
                                  "RECEIPT_INVALID:SIGNATURE"),
        "another app's bundle id": (
            APPLE, pid, apple.sign_payload(apple.transaction(apple_product,
                                                             bundleId="com.other.app")),
            "RECEIPT_INVALID:OTHER_APP"),
        "a production transaction in sandbox": (
            APPLE, pid, apple.sign_payload(apple.transaction(apple_product,
                                                             environment="Production")),
            "RECEIPT_INVALID:OTHER_ENVIRONMENT"),
        "a production store's chain": (APPLE, pid, production.sign_transaction(apple_product),
                                       "RECEIPT_INVALID:SIGNATURE"),
        "an unknown product": (APPLE, pid, apple.sign_transaction("com.hangmeas.votes.7"),
                               "RECEIPT_INVALID:OTHER_PRODUCT"),
        "another package's product": (
            APPLE, pid, apple.sign_transaction(other_package.apple_product_id),
            "RECEIPT_INVALID:OTHER_PRODUCT"),
        "a revoked transaction": (
            APPLE, pid, apple.sign_payload(apple.transaction(apple_product,
                                                             revocationDate=1, revocationReason=0)),
            "RECEIPT_INVALID:REVOKED"),
        "a receipt over 64 KiB": (APPLE, pid, "x" * (64 * 1024 + 1), "INVALID_REQUEST"),
        "an unknown package": (APPLE, "votes_7", good, "PACKAGE_NOT_FOUND"),
        "a Google token for another package": (
            GOOGLE, pid, google.buy(google_product, package_name="com.other.app"),
            "RECEIPT_INVALID:OTHER_APP"),
        "a Google token for another product": (
            GOOGLE, pid, google.buy(other_package.google_product_id),
            "RECEIPT_INVALID:OTHER_PRODUCT"),
        "a pending Google purchase": (GOOGLE, pid, google.buy(google_product, state=PENDING),
                                      "RECEIPT_INVALID:PENDING"),
        "a cancelled Google purchase": (
            GOOGLE, pid, google.buy(google_product, state=CANCELLED),
            "RECEIPT_INVALID:CANCELLED"),
        "a test purchase in production": (GOOGLE, pid, google.buy(google_product, test=True),
                                          "RECEIPT_INVALID:OTHER_ENVIRONMENT"),
        "an unknown Google token": (GOOGLE, pid, "not-a-token",
                                    "RECEIPT_INVALID:UNKNOWN_PURCHASE"),
    }


def _with_cause(reason: str, cause: str | None) -> str:
    return f"{reason}:{cause}" if cause else reason


def _json_cause(body: dict[str, Any]) -> str | None:
    for detail in body.get("details", []):
        if detail.get("@type", "").endswith("google.rpc.ErrorInfo"):
            return detail.get("metadata", {}).get("cause")
    return None


@pytest.mark.parametrize("path", ["grpc", "json"])
async def test_bad_receipts_are_refused_with_their_reason_and_credit_nothing(
        stack: Stack, edge_channel: grpc.aio.Channel, fake_stores: FakeStores,
        path: str) -> None:
    package = await _package(edge_channel, stack, 10)
    other_package = await _package(edge_channel, stack, 50)
    user = f"bad-{path}-{new_id()}"
    refused: dict[str, str] = {}
    for name, (store, package_id, receipt, _) in _bad_receipts(
            fake_stores, package, other_package).items():
        if path == "grpc":
            try:
                await _grpc_buy(stack, edge_channel, user, store, package_id, receipt)
                refused[name] = "OK"
            except grpc.aio.AioRpcError as error:
                assert error.code() != grpc.StatusCode.INTERNAL, (name, error)
                info = error_info(error)
                assert info is not None, (name, error)
                refused[name] = _with_cause(info.reason, info.metadata.get("cause"))
        else:
            status, body = await _json_buy(stack, user, store, package_id, receipt)
            assert 400 <= status < 500, (name, status, body)
            refused[name] = _with_cause(json_reason(body), _json_cause(body))
    expected = {name: reason for name, (_, _, _, reason)
                in _bad_receipts(fake_stores, package, other_package).items()}
    assert refused == expected
    assert await _credited(stack, user) == 0
    assert await query(stack.database_url, "SELECT 1 FROM purchases WHERE user_id = %s",
                       user) == []


async def test_malformed_requests_are_invalid_over_both_paths(
        stack: Stack, edge_channel: grpc.aio.Channel) -> None:
    user = f"malformed-{new_id()}"
    for request in (
        vote_service_pb2.PurchaseVotePackageRequest(store=APPLE, package_id="votes_10",
                                                    store_receipt="x"),
        vote_service_pb2.PurchaseVotePackageRequest(request_id=new_id(), package_id="votes_10",
                                                    store_receipt="x"),
        vote_service_pb2.PurchaseVotePackageRequest(request_id=new_id(), store=GOOGLE,
                                                    package_id="votes_10"),
    ):
        code, reason, _ = await refusal(stub(edge_channel).PurchaseVotePackage(
            request, metadata=voter(stack, user)))
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
    status, body = await asyncio.to_thread(
        http, stack, "POST", "/v1/purchases", token(stack, Role.VOTER, user),
        {"requestId": "nope", "store": "STORE_UNSPECIFIED", "packageId": "", "storeReceipt": ""})
    assert (status, json_reason(body)) == (400, "INVALID_REQUEST")
    assert await _credited(stack, user) == 0


# -- store trouble -------------------------------------------------------------------------


@pytest.mark.parametrize("trouble", ["slow", "failing"])
async def test_an_unavailable_store_credits_nothing_and_the_retry_succeeds(
        stack: Stack, edge_channel: grpc.aio.Channel, fake_stores: FakeStores,
        trouble: str) -> None:
    google = fake_stores.google
    package = await _package(edge_channel, stack, 10)
    user = f"trouble-{new_id()}"
    purchase_token = google.buy(package.google_product_id)
    request_id = new_id()
    if trouble == "slow":
        google.delay_s = 2.5  # beyond VOTE_STORE_TIMEOUT_MS (1.5 s)
    else:
        google.fail_status = 503
    try:
        code, reason, _ = await refusal(_grpc_buy(stack, edge_channel, user, GOOGLE,
                                                  package.package_id, purchase_token,
                                                  request_id))
        assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE")
        assert await _credited(stack, user) == 0
    finally:
        google.delay_s, google.fail_status = 0.0, None
    reply = await _grpc_buy(stack, edge_channel, user, GOOGLE, package.package_id,
                            purchase_token, request_id)
    assert reply.votes_credited == 10
    assert await _credited(stack, user) == 10


@pytest.mark.parametrize("trouble", ["down", "slow"])
async def test_apple_unreachable_for_certificate_status_credits_nothing_until_it_answers(
        stack: Stack, edge_channel: grpc.aio.Channel, fake_stores: FakeStores,
        trouble: str) -> None:
    """With online checks on, verifying a chain asks Apple's OCSP responders; the library
    caches a verified chain, so the store signs with a new leaf to make it ask."""
    apple = fake_stores.apple
    package = await _package(edge_channel, stack, 10)
    user = f"apple-{trouble}-{new_id()}"
    apple.rotate_leaf()
    receipt = apple.sign_transaction(package.apple_product_id)
    request_id = new_id()
    asked = apple.ocsp_requests
    if trouble == "down":
        apple.ocsp_down = True
    else:
        apple.ocsp_delay_s = 2.5  # beyond VOTE_STORE_TIMEOUT_MS (1.5 s)
    try:
        code, reason, _ = await refusal(_grpc_buy(stack, edge_channel, user, APPLE,
                                                  package.package_id, receipt, request_id))
        assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE")
        assert apple.ocsp_requests > asked
        assert await _credited(stack, user) == 0
    finally:
        apple.ocsp_down, apple.ocsp_delay_s = False, 0.0
    reply = await _grpc_buy(stack, edge_channel, user, APPLE, package.package_id, receipt,
                            request_id)
    assert reply.votes_credited == 10
    assert await _credited(stack, user) == 10


async def test_a_slow_store_does_not_hold_up_votes(
        stack: Stack, edge_channel: grpc.aio.Channel, fake_stores: FakeStores) -> None:
    google = fake_stores.google
    package = await _package(edge_channel, stack, 10)
    test_round = await open_test_round(stack.database_url, stack.redis_url)
    buyer = f"slow-buyer-{new_id()}"
    purchase_token = google.buy(package.google_product_id)
    asked = len(google.calls)
    google.delay_s = 2.5
    try:
        buying = asyncio.ensure_future(_grpc_buy(stack, edge_channel, buyer, GOOGLE,
                                                 package.package_id, purchase_token))
        # The store is now holding the purchase.
        assert await asyncio.to_thread(google.wait_for_calls, asked + 1)
        votes = [stub(edge_channel).SubmitVote(vote_request(test_round),
                                               metadata=voter(stack, f"v-{n}-{new_id()}"))
                 for n in range(5)]
        await asyncio.gather(*votes)
        assert not buying.done()  # every vote was answered while the store still stalled
        code, reason, _ = await refusal(buying)
        assert reason == "STORE_UNAVAILABLE", code
    finally:
        google.delay_s = 0.0


# -- refunds -------------------------------------------------------------------------------


async def _spend(stack: Stack, channel: grpc.aio.Channel, user: str, count: int) -> str:
    test_round = await open_test_round(stack.database_url, stack.redis_url)
    await stub(channel).SubmitVote(vote_request(test_round, vote_type=PAID, count=count),
                                   metadata=voter(stack, user))
    return test_round.round_id


async def _wallet(stack: Stack, user: str) -> dict[str, int]:
    (row,) = await query(stack.database_url, "SELECT credited, spent, clawed_back"
                         " FROM wallets WHERE user_id = %s", user)
    return {key: int(value) for key, value in row.items()}


@pytest.mark.parametrize("path", ["grpc", "json"])
async def test_an_apple_refund_after_some_votes_were_spent_claws_back_the_rest(
        stack: Stack, edge_channel: grpc.aio.Channel, fake_stores: FakeStores,
        path: str) -> None:
    apple = fake_stores.apple
    package = await _package(edge_channel, stack, 10)
    user = f"refund-{path}-{new_id()}"
    transaction = apple.transaction(package.apple_product_id)
    await _grpc_buy(stack, edge_channel, user, APPLE, package.package_id,
                    apple.sign_payload(transaction))
    round_id = await _spend(stack, edge_channel, user, 4)
    notification = apple.refund(transaction)

    async def post(signed: str) -> tuple[str, str]:
        if path == "json":
            status, body = await asyncio.to_thread(
                _post_anonymous, stack, "/v1/store-notifications/apple",
                {"signedPayload": signed})
            return str(status), json_reason(body)
        notifications = vote_service_pb2_grpc.StoreNotificationServiceStub(edge_channel)
        try:
            await notifications.ReceiveAppleNotification(
                vote_service_pb2.ReceiveAppleNotificationRequest(signed_payload=signed))
            return "200", ""
        except grpc.aio.AioRpcError as error:
            info = error_info(error)
            return error.code().name, info.reason if info else ""

    assert await post(notification) == ("200", "")
    assert await _wallet(stack, user) == {"credited": 10, "spent": 4, "clawed_back": 6}
    (refund,) = await query(stack.database_url, "SELECT r.* FROM purchase_refunds r"
                            " WHERE r.user_id = %s", user)
    assert (refund["clawed_back"], refund["already_spent"], refund["flagged_for_review"],
            refund["source"]) == (6, 4, True, "APPLE_NOTIFICATION")
    # The spent votes stay in the ledger; nothing is left to spend.
    assert len(await query(stack.database_url, "SELECT 1 FROM votes WHERE user_id = %s"
                           " AND round_id = %s", user, round_id)) == 1
    test_round = await open_test_round(stack.database_url, stack.redis_url)
    code, reason, _ = await refusal(stub(edge_channel).SubmitVote(
        vote_request(test_round, vote_type=PAID), metadata=voter(stack, user)))
    assert reason == "INSUFFICIENT_BALANCE", code
    balance = await stub(edge_channel).GetBalance(vote_service_pb2.GetBalanceRequest(
        episode_id=test_round.episode_id), metadata=voter(stack, user))
    assert balance.paid_balance == 0
    # Redis forgets the voter: the cache is filled again from PostgreSQL, claw-back included.
    redis = create_redis(stack.redis_url)
    try:
        await redis.delete(keys.user_key(keys.shard_of(user), user))
    finally:
        await redis.aclose()
    code, reason, metadata = await refusal(stub(edge_channel).SubmitVote(
        vote_request(test_round, vote_type=PAID), metadata=voter(stack, user)))
    assert (reason, metadata.get("paid_balance")) == ("INSUFFICIENT_BALANCE", "0"), code
    balance = await stub(edge_channel).GetBalance(vote_service_pb2.GetBalanceRequest(
        episode_id=test_round.episode_id), metadata=voter(stack, user))
    assert balance.paid_balance == 0
    # Apple retries a notification: applied once.
    assert await post(notification) == ("200", "")
    assert await _wallet(stack, user) == {"credited": 10, "spent": 4, "clawed_back": 6}
    flagged = await query(stack.database_url, "SELECT details FROM audit_log"
                          " WHERE action = 'purchase.flag_for_review' AND target = %s",
                          f"user:{user}")
    assert [f["details"]["already_spent"] for f in flagged] == [4]
    # ... and reported: the refunded votes already cast stay counted, the voter is listed.
    report = await refund_report(stack.database_url)
    (mine,) = [r for r in report["refunds"] if r["user_id"] == user]
    assert (mine["clawed_back"], mine["already_spent"]) == (6, 4)
    assert user in report["voters_flagged_for_review"]
    assert report["votes_already_cast_and_counted"] >= 4
    # A notification not signed by the trusted chain changes nothing.
    forged = FakeAppStore().refund(transaction, "REVOKE")
    expected = ("400" if path == "json" else "INVALID_ARGUMENT", "NOTIFICATION_INVALID")
    assert await post(forged) == expected


async def test_an_unspent_purchase_refunded_by_google_push_is_clawed_back_whole(
        stack: Stack, edge_channel: grpc.aio.Channel, fake_stores: FakeStores) -> None:
    google = fake_stores.google
    package = await _package(edge_channel, stack, 10)
    user = f"rtdn-{new_id()}"
    purchase_token = google.buy(package.google_product_id)
    await _grpc_buy(stack, edge_channel, user, GOOGLE, package.package_id, purchase_token)
    # A push for a purchase Google has not voided (forged past the token, or early) is
    # acknowledged and changes nothing.
    push = google.rtdn_push(purchase_token)
    url = f"/v1/store-notifications/google?token={google.push_token}"
    assert (await asyncio.to_thread(_post_anonymous, stack, url, push))[0] == 200
    assert await _wallet(stack, user) == {"credited": 10, "spent": 0, "clawed_back": 0}
    google.void(purchase_token)
    push = google.rtdn_push(purchase_token)
    status, body = await asyncio.to_thread(
        _post_anonymous, stack, "/v1/store-notifications/google?token=wrong", push)
    assert (status, json_reason(body)) == (403, "NOTIFICATION_UNAUTHENTICATED")
    assert await _wallet(stack, user) == {"credited": 10, "spent": 0, "clawed_back": 0}
    status, body = await asyncio.to_thread(_post_anonymous, stack, url, push)
    assert status == 200, body
    assert await _wallet(stack, user) == {"credited": 10, "spent": 0, "clawed_back": 10}
    (refund,) = await query(stack.database_url, "SELECT * FROM purchase_refunds"
                            " WHERE user_id = %s", user)
    assert (refund["source"], refund["flagged_for_review"]) == ("GOOGLE_RTDN", False)
    status, body = await asyncio.to_thread(_post_anonymous, stack, url, {
        "message": {"data": "%%%"}, "subscription": "s"})
    assert (status, json_reason(body)) == (400, "NOTIFICATION_INVALID")
    # The same service over native gRPC through the edge.
    message = struct_pb2.Struct()
    message.update(push["message"])
    notifications = vote_service_pb2_grpc.StoreNotificationServiceStub(edge_channel)
    code, reason, _ = await refusal(notifications.ReceiveGoogleNotification(
        vote_service_pb2.ReceiveGoogleNotificationRequest(message=message, token="wrong")))
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "NOTIFICATION_UNAUTHENTICATED")
    await notifications.ReceiveGoogleNotification(
        vote_service_pb2.ReceiveGoogleNotificationRequest(
            message=message, token=google.push_token, subscription="s"))
    assert await _wallet(stack, user) == {"credited": 10, "spent": 0, "clawed_back": 10}


async def test_the_voided_purchases_poll_finds_a_refund_no_push_announced(
        stack: Stack, edge_channel: grpc.aio.Channel, fake_stores: FakeStores) -> None:
    google = fake_stores.google
    package = await _package(edge_channel, stack, 10)
    user = f"poll-{new_id()}"
    purchase_token = google.buy(package.google_product_id)
    await _grpc_buy(stack, edge_channel, user, GOOGLE, package.package_id, purchase_token)
    await _spend(stack, edge_channel, user, 3)
    google.void(purchase_token)
    # The poller of a vote_svc replica, run here on demand: the same code, the same stores.
    storage = Storage(pool=create_pool(stack.database_url), redis=create_redis(stack.redis_url))
    await storage.connect()
    stores = Stores.from_config(_vote_config(stack))
    try:
        purchases = Purchases(storage, Scripts(storage.redis), stores, PackageCatalogue(storage))
        while not await _refunded(stack, user):
            await purchases.poll_once()  # 0 while a replica's own poll holds the turn
            await asyncio.sleep(0.05)
    finally:
        stores.close()
        await storage.close()
    assert await _wallet(stack, user) == {"credited": 10, "spent": 3, "clawed_back": 7}
    (refund,) = await query(stack.database_url, "SELECT * FROM purchase_refunds"
                            " WHERE user_id = %s", user)
    assert (refund["source"], refund["already_spent"]) == ("GOOGLE_VOIDED_POLL", 3)


async def _refunded(stack: Stack, user: str) -> bool:
    return bool(await query(stack.database_url, "SELECT 1 FROM purchase_refunds"
                            " WHERE user_id = %s", user))


def _vote_config(stack: Stack) -> VoteConfig:
    """vote_svc's configuration as the mesh gave it (its VOTE_* environment)."""
    settings = {key.lower(): value for key, value in stack.settings.service_env.items()
                if key.startswith("VOTE_")}
    return VoteConfig(database_url=stack.database_url, redis_url=stack.redis_url,
                      vote_pseudonym_salt="unused", vote_ip_hash_key="unused", **settings)
