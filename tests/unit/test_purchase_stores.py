"""The store side of purchases without a mesh: the stores' real libraries against the
stand-ins (fakestores/), the thread pool that keeps them off the event loop, and the
loadtest's choice of packages."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from fakestores import FakeAppStore, FakePlayStore
from loadtest.funding import Package, packages_for
from runtime.errors import ApiError
from vote_svc.stores import AppleStore, GooglePlay, StoreCalls


@pytest.fixture(scope="module")
def apple_store() -> FakeAppStore:
    return FakeAppStore()


@pytest.fixture(scope="module")
def play_store() -> Iterator[FakePlayStore]:
    store = FakePlayStore()
    yield store
    store.close()


def _apple(store: FakeAppStore, tmp_path: Path, environment: str = "Sandbox") -> AppleStore:
    root = tmp_path / "root.der"
    root.write_bytes(store.root_der)
    return AppleStore([root], store.bundle_id, environment, store.app_apple_id, False)


def _cause(error: pytest.ExceptionInfo[ApiError]) -> tuple[str, str | None]:
    return error.value.reason, error.value.metadata.get("cause")


def test_apple_transaction_verifies_with_the_configured_root(apple_store: FakeAppStore,
                                                             tmp_path: Path) -> None:
    verified = _apple(apple_store, tmp_path).verify_transaction(
        apple_store.sign_transaction("com.hangmeas.votes.10", price_micros=990_000))
    assert (verified.store, verified.product_id, verified.environment) == (
        "APPLE", "com.hangmeas.votes.10", "Sandbox")
    assert (verified.store_price_micros, verified.store_currency) == (990_000, "USD")


def test_apple_refusals_name_their_cause(apple_store: FakeAppStore, tmp_path: Path) -> None:
    store = _apple(apple_store, tmp_path)
    cases = {
        "SIGNATURE": FakeAppStore().sign_transaction("com.hangmeas.votes.10"),
        "OTHER_APP": apple_store.sign_payload(apple_store.transaction(
            "com.hangmeas.votes.10", bundleId="com.other")),
        "OTHER_ENVIRONMENT": apple_store.sign_payload(apple_store.transaction(
            "com.hangmeas.votes.10", environment="Production")),
        "REVOKED": apple_store.sign_payload(apple_store.transaction(
            "com.hangmeas.votes.10", revocationDate=1)),
        "QUANTITY": apple_store.sign_payload(apple_store.transaction(
            "com.hangmeas.votes.10", quantity=3)),
    }
    for cause, receipt in cases.items():
        with pytest.raises(ApiError) as refused:
            store.verify_transaction(receipt)
        assert _cause(refused) == ("RECEIPT_INVALID", cause)


def test_a_forged_apple_notification_is_notification_invalid(apple_store: FakeAppStore,
                                                             tmp_path: Path) -> None:
    store = _apple(apple_store, tmp_path)
    transaction = apple_store.transaction("com.hangmeas.votes.10")
    notification, decoded = store.verify_notification(apple_store.refund(transaction))
    assert notification.rawNotificationType == "REFUND"
    assert decoded.transactionId == transaction["transactionId"]
    with pytest.raises(ApiError) as refused:
        store.verify_notification(FakeAppStore().refund(transaction))
    assert refused.value.reason == "NOTIFICATION_INVALID"
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT


def _play(store: FakePlayStore, tmp_path: Path, key: str | None = None) -> GooglePlay:
    path = tmp_path / "key.json"
    path.write_text(key or store.service_account_json())
    return GooglePlay(path, store.package_name, store.url, "Production", 2.0)


def test_google_purchase_is_verified_consumed_and_listed_when_voided(
        play_store: FakePlayStore, tmp_path: Path) -> None:
    play = _play(play_store, tmp_path)
    token = play_store.buy("votes_10")
    verified = play.verify("votes_10", token)
    assert verified.transaction_id == play_store.purchase(token).order_id
    assert verified.reference == token
    play.consume("votes_10", token)
    assert play_store.purchase(token).consumed
    play_store.void(token)
    voided = play.voided(0, 2**62)
    assert token in [v["purchaseToken"] for v in voided]
    with pytest.raises(ApiError) as refused:
        play.verify("votes_10", token)
    assert _cause(refused) == ("RECEIPT_INVALID", "CANCELLED")


def test_google_credentials_the_store_refuses_are_store_unavailable(
        play_store: FakePlayStore, tmp_path: Path) -> None:
    other = FakePlayStore(play_store.package_name)
    stranger = json.loads(other.service_account_json())
    other.close()
    stranger["token_uri"] = play_store.url + "token"  # another key, at this store's endpoint
    play = _play(play_store, tmp_path, json.dumps(stranger))
    with pytest.raises(ApiError) as refused:
        play.verify("votes_10", play_store.buy("votes_10"))
    assert refused.value.reason == "STORE_UNAVAILABLE"


async def test_store_calls_refuse_at_once_when_full_and_time_out_without_piling_up() -> None:
    calls = StoreCalls(threads=2, max_inflight=2, timeout_s=0.2)
    release = threading.Event()
    try:
        stuck = [asyncio.ensure_future(calls.run(release.wait, 5)) for _ in range(2)]
        await asyncio.sleep(0)  # both submitted
        with pytest.raises(ApiError) as full:
            await calls.run(lambda: None)
        assert full.value.reason == "STORE_UNAVAILABLE"
        for call in stuck:
            with pytest.raises(ApiError) as slow:
                await call
            assert slow.value.reason == "STORE_UNAVAILABLE"
        # Timed out, but the threads still run: their slots are still taken.
        with pytest.raises(ApiError):
            await calls.run(lambda: None)
        release.set()
        for _ in range(100):
            try:
                assert await calls.run(lambda: 42) == 42
                break
            except ApiError:
                await asyncio.sleep(0.01)
        else:
            raise AssertionError("the slots were never given back")
    finally:
        release.set()
        calls.close()


def test_loadtest_buys_packages_that_cover_the_paid_votes() -> None:
    packages = [Package("p10", 10, "a10", "g10"), Package("p60", 60, "a60", "g60"),
                Package("p250", 250, "a250", "g250")]
    assert [p.votes for p in packages_for(7, packages)] == [10]
    assert [p.votes for p in packages_for(60, packages)] == [60]
    assert [p.votes for p in packages_for(300, packages)] == [250, 60]
    assert packages_for(0, packages) == []
