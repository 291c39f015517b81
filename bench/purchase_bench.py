"""Purchase benchmark: vote packages verified and credited per second, and CPU per purchase,
for each store path.

    python -m bench.purchase_bench [--purchases 300] [--concurrency 16]

Starts its own mesh (one vote_svc replica, so its CPU is one process's) selling through the
stand-in stores of fakestores/, then for each store buys `--purchases` packages with
PurchaseVotePackage through the edge (native gRPC, `--concurrency` in flight, each as its own
voter) and prints:
- purchases/s verified and credited (the answer comes after the credit's commit);
- CPU time per purchase of vote_svc (verification with the store's library, the credit's
  statement, the Redis cache, and for Google the consume call), of PostgreSQL, Envoy and
  Redis, less what each spends idle for as long (measured just before the run); the
  stand-in store runs in this process and is not counted (Google's servers are not ours
  either);
- the store library's own CPU per call in this process, without the mesh: Apple's
  SignedDataVerifier on a signed transaction (online checks on, as in production: the
  stand-in answers OCSP, and the library caches a verified chain for 15 minutes); Google's
  purchases.products.get + consume through google-api-python-client (the calling thread's
  CPU: the stand-in's server threads are not counted).
The target is at most 5 ms of CPU per verified purchase (vote_svc's figure). No assertions:
it prints figures, the last of them as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import psutil

from fakestores import FakeAppStore, FakePlayStore, stack_environment
from ops import tokens
from ops.stack import Stack, StackSettings
from runtime.access import Role
from televote.vote.v1 import vote_service_pb2, vote_service_pb2_grpc
from vote_svc.config import VoteConfig
from vote_svc.stores import Stores


def _cpu_by_role() -> dict[str, float]:
    """CPU seconds so far of the mesh's processes, by role."""
    totals: dict[str, float] = {}
    for process in psutil.Process().children(recursive=True):
        try:
            command = process.cmdline()
            times = process.cpu_times()
        except psutil.Error:
            continue
        if "-m" in command:
            role = command[command.index("-m") + 1]
        elif command and command[0].startswith("postgres"):
            role = "postgres"
        else:
            role = process.name().split()[0]
        totals[role] = totals.get(role, 0.0) + times.user + times.system
    return totals


async def _idle_rate(seconds: float = 3.0) -> dict[str, float]:
    """CPU seconds per second the mesh spends with nothing to do (its periodic work: the
    reconciler, the show clock, health checks), to take out of a run's figures."""
    before, started = _cpu_by_role(), time.perf_counter()
    await asyncio.sleep(seconds)
    after, took = _cpu_by_role(), time.perf_counter() - started
    return {role: max(after[role] - before.get(role, 0.0), 0.0) / took for role in after}


def _per_purchase(before: dict[str, float], after: dict[str, float], purchases: int,
                  idle: dict[str, float], seconds: float) -> dict[str, float]:
    """Milliseconds of CPU per purchase by role (vote_svc, postgres, envoy, redis), less what
    the mesh would have spent idle for as long."""
    used = {role: max(after[role] - before.get(role, 0.0) - idle.get(role, 0.0) * seconds,
                      0.0) for role in after}
    wanted = {role: used.get(role, 0.0) for role in ("vote_svc", "postgres", "envoy")}
    wanted["redis"] = sum(seconds for role, seconds in used.items() if role.startswith("redis"))
    return {role: round(seconds * 1000 / max(purchases, 1), 2)
            for role, seconds in wanted.items()}


async def _buy_all(stack: Stack, store: str, receipts: list[tuple[str, str]],
                   package_id: str, concurrency: int) -> float:
    """Buy every (user, receipt) through the edge; returns the wall seconds."""
    gate = asyncio.Semaphore(concurrency)
    kind = vote_service_pb2.STORE_APPLE if store == "apple" else vote_service_pb2.STORE_GOOGLE
    state_dir = stack.settings.state_dir
    metadata = {user: (("authorization", f"Bearer {tokens.mint(state_dir, Role.VOTER, user)}"),)
                for user, _ in receipts}
    async with grpc.aio.insecure_channel(stack.edge_target) as channel:
        votes: Any = vote_service_pb2_grpc.VoteServiceStub(channel)

        async def one(user: str, receipt: str) -> None:
            async with gate:
                await votes.PurchaseVotePackage(vote_service_pb2.PurchaseVotePackageRequest(
                    request_id=str(uuid.uuid4()), store=kind, package_id=package_id,
                    store_receipt=receipt), metadata=metadata[user], timeout=30)

        started = time.perf_counter()
        await asyncio.gather(*(one(user, receipt) for user, receipt in receipts))
        return time.perf_counter() - started


def _library_cpu(env: dict[str, str], apple: FakeAppStore, google: FakePlayStore,
                 product: tuple[str, str], calls: int) -> dict[str, float]:
    """CPU ms per call of each store library alone, in this thread."""
    config = VoteConfig(database_url="unused", redis_url="unused",
                        vote_pseudonym_salt="unused", vote_ip_hash_key="unused",
                        **{key.lower(): value for key, value in env.items()})
    stores = Stores.from_config(config)
    assert stores.apple is not None and stores.google is not None
    signed = [apple.sign_transaction(product[0]) for _ in range(calls)]
    tokens_ = [google.buy(product[1]) for _ in range(calls)]
    stores.google.verify(product[1], google.buy(product[1]))  # the OAuth token, once
    started = time.thread_time()
    for receipt in signed:
        stores.apple.verify_transaction(receipt)
    apple_ms = (time.thread_time() - started) * 1000 / calls
    started = time.thread_time()
    for token in tokens_:
        stores.google.verify(product[1], token)
        stores.google.consume(product[1], token)
    google_ms = (time.thread_time() - started) * 1000 / calls
    stores.close()
    return {"apple_verify": round(apple_ms, 2), "google_get_and_consume": round(google_ms, 2)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--purchases", type=int, default=300, help="per store")
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    apple, google = FakeAppStore(ocsp=True), FakePlayStore()
    state_dir = Path(tempfile.mkdtemp(prefix="purchase-bench-"))
    env = stack_environment(apple, google, state_dir / "stores")
    stack = Stack(StackSettings(state_dir=state_dir, edge_port=0, service_env={
        "TELEVOTE_LOG_LEVEL": "WARNING", **env}))
    await stack.start()
    figures: dict[str, Any] = {"purchases_per_store": args.purchases,
                               "concurrency": args.concurrency}
    try:
        async with grpc.aio.insecure_channel(stack.edge_target) as channel:
            reply = await vote_service_pb2_grpc.VoteServiceStub(channel).ListVotePackages(
                vote_service_pb2.ListVotePackagesRequest(), metadata=((
                    "authorization",
                    f"Bearer {tokens.mint(state_dir, Role.VOTER, 'bench')}"),))
        package = min(reply.packages, key=lambda p: p.votes)
        run = uuid.uuid4().hex[:6]
        for store in ("apple", "google"):
            # Warm up: the OAuth token, connections, the catalogue cache.
            warm = [(f"warm-{store}-{run}-{n}",
                     apple.sign_transaction(package.apple_product_id) if store == "apple"
                     else google.buy(package.google_product_id)) for n in range(10)]
            await _buy_all(stack, store, warm, package.package_id, args.concurrency)
            receipts = [(f"bench-{store}-{run}-{n}",
                         apple.sign_transaction(package.apple_product_id) if store == "apple"
                         else google.buy(package.google_product_id))
                        for n in range(args.purchases)]
            idle = await _idle_rate()
            before = _cpu_by_role()
            seconds = await _buy_all(stack, store, receipts, package.package_id,
                                     args.concurrency)
            cpu = _per_purchase(before, _cpu_by_role(), args.purchases, idle, seconds)
            figures[store] = {"purchases_per_s": round(args.purchases / seconds, 1),
                              "cpu_ms_per_purchase": cpu}
            print(f"{store:>6}: {args.purchases / seconds:7.1f} purchases/s verified and"
                  f" credited; CPU ms per purchase: {cpu}")
    finally:
        await stack.stop()
    figures["library_cpu_ms_per_call"] = await asyncio.to_thread(
        _library_cpu, env, apple, google,
        (package.apple_product_id, package.google_product_id), 200)
    apple.close()
    google.close()
    print(f"store libraries alone, CPU ms per call: {figures['library_cpu_ms_per_call']}")
    print(f"load average: {psutil.getloadavg()}")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
