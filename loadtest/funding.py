"""Paid voters' money: vote packages bought in the stand-in stores, and some of them refunded
while the votes are being cast.

Each paid voter buys, as an app would, the packages that cover the paid votes the plan gives
them (PurchaseVotePackage through the edge, as that voter, half of them in the App Store and
half in Google Play; vote_svc verifies each receipt with the stores' real libraries against
fakestores/). A share of the voters buys one package more, which the store refunds in the
middle of voting: Apple's signed REFUND notification, or Google voiding the purchase and its
real-time notification pushed the way Pub/Sub pushes it. Those voters never need the refunded
votes, so the claw-back takes the whole package however fast they vote, and the verifier can
reconcile purchases, credits, spends and refunds vote for vote (loadtest/verify.py).
"""

from __future__ import annotations

import asyncio
import json
import uuid
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc

from fakestores import FakeAppStore, FakePlayStore
from ops import tokens
from runtime.access import Role
from runtime.errors import error_info
from televote.vote.v1 import vote_service_pb2, vote_service_pb2_grpc

#: Share of paid voters who buy one package more and are refunded during voting.
REFUND_SHARE = 0.1


@dataclass(frozen=True)
class Package:
    package_id: str
    votes: int  # votes + bonus
    apple_product_id: str
    google_product_id: str


@dataclass
class Bought:
    """One purchase the simulator made."""

    user: str
    store: str  # APPLE or GOOGLE
    package: Package
    refund: bool
    receipt: str
    #: Apple: the decoded transaction (its refund notification is signed from it).
    transaction: dict[str, Any] = field(default_factory=dict)
    transaction_id: str = ""


@dataclass
class Funding:
    purchases: list[Bought]

    def credited(self) -> Counter[str]:
        credited: Counter[str] = Counter()
        for bought in self.purchases:
            credited[bought.user] += bought.package.votes
        return credited

    def clawed(self) -> Counter[str]:
        clawed: Counter[str] = Counter()
        for bought in self.purchases:
            if bought.refund:
                clawed[bought.user] += bought.package.votes
        return clawed


def packages_for(need: int, packages: list[Package]) -> list[Package]:
    """Packages whose votes cover `need`: the smallest that covers what is left, else the
    largest (and again)."""
    chosen: list[Package] = []
    by_size = sorted(packages, key=lambda p: p.votes)
    while need > 0:
        package = next((p for p in by_size if p.votes >= need), by_size[-1])
        chosen.append(package)
        need -= package.votes
    return chosen


class StoreFunding:
    """Buys through the stand-in stores the mesh was configured with (fakestores)."""

    def __init__(self, apple: FakeAppStore, google: FakePlayStore,
                 refund_share: float = REFUND_SHARE) -> None:
        self.apple = apple
        self.google = google
        self.refund_share = refund_share

    async def buy(self, edge_target: str, state_dir: Path, needs: dict[str, int],
                  concurrency: int = 32) -> Funding:
        async with grpc.aio.insecure_channel(edge_target) as channel:
            votes = vote_service_pb2_grpc.VoteServiceStub(channel)
            reply = await votes.ListVotePackages(
                vote_service_pb2.ListVotePackagesRequest(),
                metadata=_voter(state_dir, "loadtest-shopper"), timeout=30)
            packages = [Package(p.package_id, p.total_votes, p.apple_product_id,
                                p.google_product_id) for p in reply.packages]
            smallest = min(packages, key=lambda p: p.votes)
            purchases: list[Bought] = []
            for user, need in sorted(needs.items()):
                digest = zlib.crc32(user.encode())
                store = "APPLE" if digest % 2 else "GOOGLE"
                chosen = [(p, False) for p in packages_for(need, packages)]
                if (digest >> 1) % 1000 < self.refund_share * 1000:
                    chosen.append((smallest, True))
                for package, refund in chosen:
                    purchases.append(self._receipt(user, store, package, refund))
            gate = asyncio.Semaphore(concurrency)

            async def one(bought: Bought) -> None:
                async with gate:
                    bought.transaction_id = await _purchase(votes, state_dir, bought)

            await asyncio.gather(*(one(bought) for bought in purchases))
        return Funding(purchases)

    def _receipt(self, user: str, store: str, package: Package, refund: bool) -> Bought:
        if store == "APPLE":
            transaction = self.apple.transaction(package.apple_product_id)
            return Bought(user, store, package, refund, self.apple.sign_payload(transaction),
                          transaction)
        return Bought(user, store, package, refund, self.google.buy(package.google_product_id))

    async def refund(self, edge_url: str, funding: Funding, concurrency: int = 16) -> int:
        """The stores refund what the plan refunds and tell vote_svc, through the edge."""
        gate = asyncio.Semaphore(concurrency)
        google_url = f"{edge_url}/v1/store-notifications/google?token={self.google.push_token}"

        async def one(session: aiohttp.ClientSession, bought: Bought) -> None:
            if bought.store == "APPLE":
                url, body = (f"{edge_url}/v1/store-notifications/apple",
                             {"signedPayload": self.apple.refund(bought.transaction)})
            else:
                self.google.void(bought.receipt)
                url, body = google_url, self.google.rtdn_push(bought.receipt)
            async with gate:
                for _ in range(10):  # the stores redeliver until they see a 2xx
                    async with session.post(url, data=json.dumps(body), headers={
                            "content-type": "application/json"}) as response:
                        if response.status == 200:
                            return
                        await response.read()
                    await asyncio.sleep(0.5)
                raise RuntimeError(f"refund notification for {bought.transaction_id} refused")

        refunds = [bought for bought in funding.purchases if bought.refund]
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(one(session, bought) for bought in refunds))
        return len(refunds)


def _voter(state_dir: Path, user: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {tokens.mint(state_dir, Role.VOTER, user)}"),)


async def _purchase(votes: Any, state_dir: Path, bought: Bought) -> str:
    """PurchaseVotePackage as the voter, retried with its request id while the store (or
    the replica) is unavailable, as an app retries an unfinished transaction."""
    request = vote_service_pb2.PurchaseVotePackageRequest(
        request_id=str(uuid.uuid4()),
        store=(vote_service_pb2.STORE_APPLE if bought.store == "APPLE"
               else vote_service_pb2.STORE_GOOGLE),
        package_id=bought.package.package_id, store_receipt=bought.receipt)
    metadata = _voter(state_dir, bought.user)
    for attempt in range(20):
        try:
            reply = await votes.PurchaseVotePackage(request, metadata=metadata, timeout=30)
            return str(reply.store_transaction_id)
        except grpc.aio.AioRpcError as error:
            if error.code() not in (grpc.StatusCode.UNAVAILABLE,
                                    grpc.StatusCode.DEADLINE_EXCEEDED) or attempt == 19:
                info = error_info(error)
                raise RuntimeError(f"purchase refused: {info.reason if info else error}"
                                   ) from None
            await asyncio.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")
