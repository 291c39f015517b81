"""Faults under load: a replica killed with SIGKILL, PostgreSQL cut off, Redis flushed.

Whatever fails, an acknowledged vote is in the ledger, a request id is counted at most once,
no user ends above the quota, and the final tally equals the ledger (invariants 1, 2, 4).
The replicas are processes (for SIGKILL) or in this process, against the session stack's
PostgreSQL and Redis, or against a Redis of the test's own (for the flush).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import grpc
import pytest

from ops.infra import start_redis
from ops.processes import Child, free_port, wait_serving
from ops.stack import Stack, service_dir
from runtime import keys
from runtime.access import Role
from runtime.errors import error_info
from runtime.storage import Storage, create_pool, create_redis
from televote.vote.v1 import (
    vote_gateway_service_pb2,
    vote_gateway_service_pb2_grpc,
    vote_service_pb2,
    vote_service_pb2_grpc,
    vote_types_pb2,
)
from tests.proxy_support import Proxy
from tests.support_windows import TestRound, open_test_round
from tests.vote_support import (
    inside,
    ledger_rows,
    new_id,
    query,
    start_replica,
    stop_replica,
    vote_request,
)
from vote_svc.admission import Scripts
from vote_svc.reconcile import Reconciler

#: Refusals that are final: retrying the same request cannot change them.
FINAL = {"NO_FREE_VOTES", "VOTING_CLOSED", "IDEMPOTENCY_MISMATCH", "RATE_LIMITED"}


def _mesh_secrets(stack: Stack) -> dict[str, str]:
    """The mesh's own salt and IP hash key, so these replicas' receipts match the others'."""
    own = service_dir(stack.settings.state_dir, "vote_svc")
    return {"VOTE_PSEUDONYM_SALT": (own / "pseudonym-salt").read_text(),
            "VOTE_IP_HASH_KEY": (own / "ip-hash-key").read_text()}


@dataclass
class Load:
    """Voters each casting their free votes, through whichever replica `pick` names."""

    test_round: TestRound
    users: int
    votes_per_user: int = 5
    acked: dict[str, str] = field(default_factory=dict)  # request_id -> vote_id
    unacked: dict[str, tuple[str, vote_service_pb2.SubmitVoteRequest]] = field(
        default_factory=dict)
    refused: Counter[str] = field(default_factory=Counter)
    _waiters: list[tuple[int, asyncio.Event]] = field(default_factory=list)

    async def until_acknowledged(self, count: int) -> None:
        """Returns once `count` votes have been acknowledged (to strike mid-load)."""
        reached = asyncio.Event()
        self._waiters.append((count, reached))
        self._wake()
        await reached.wait()

    def _wake(self) -> None:
        for count, event in self._waiters:
            if len(self.acked) >= count:
                event.set()

    def plan(self) -> list[tuple[str, vote_service_pb2.SubmitVoteRequest]]:
        return [(f"u{number}", vote_request(self.test_round, contestant=number % 3))
                for _ in range(self.votes_per_user) for number in range(self.users)]

    async def run(self, pick: Callable[[int], vote_service_pb2_grpc.VoteServiceStub],
                  workers: int = 24) -> None:
        queue = self.plan()

        async def worker(number: int) -> None:
            while queue:
                user, request = queue.pop()
                await self.send(pick(number), user, request)
        await asyncio.gather(*(worker(number) for number in range(workers)))

    async def send(self, stub: vote_service_pb2_grpc.VoteServiceStub, user: str,
                   request: vote_service_pb2.SubmitVoteRequest) -> bool:
        """True when the outcome is final (accepted or refused for good)."""
        try:
            reply = await stub.SubmitVote(request, metadata=inside(Role.VOTER, user),
                                          timeout=8)
        except grpc.aio.AioRpcError as error:
            info = error_info(error)
            reason = info.reason if info is not None else error.code().name
            if reason in FINAL:
                self.refused[reason] += 1
                self.unacked.pop(request.request_id, None)
                return True
            # UNAVAILABLE, a dead replica, a timeout: not acknowledged, to be retried.
            self.unacked[request.request_id] = (user, request)
            return False
        self.acked[request.request_id] = reply.vote_id
        self.unacked.pop(request.request_id, None)
        self._wake()
        return True

    async def retry_unacknowledged(self, stub: vote_service_pb2_grpc.VoteServiceStub,
                                   deadline_s: float = 30) -> None:
        """What a client does: retry with the same request id until it has an answer."""
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline_s
        while self.unacked and loop.time() < end:
            pending = list(self.unacked.values())
            await asyncio.gather(*(self.send(stub, user, request) for user, request in pending))
            if self.unacked:
                await asyncio.sleep(0.3)
        assert not self.unacked, f"{len(self.unacked)} votes never got an answer"

    async def check_ledger(self, database_url: str) -> list[dict[str, Any]]:
        rows = await ledger_rows(database_url, self.test_round.round_id)
        by_request = Counter(row["request_id"] for row in rows)
        assert max(by_request.values()) == 1  # counted at most once
        vote_ids = {row["request_id"]: str(row["vote_id"]) for row in rows}
        for request_id, vote_id in self.acked.items():  # every acknowledged vote is there
            assert vote_ids.get(request_id) == vote_id, request_id
        assert set(vote_ids) == set(self.acked)  # and nothing nobody was told about
        per_user = Counter(row["user_id"] for row in rows)
        assert max(per_user.values()) <= 5  # never above the free quota
        tallies = await query(database_url, "SELECT contestant_id::text AS c, sum(votes) AS"
                              " votes FROM round_tallies WHERE round_id = %s GROUP BY 1",
                              self.test_round.round_id)
        counted = Counter(str(row["contestant_id"]) for row in rows)
        assert {row["c"]: row["votes"] for row in tallies} == dict(counted)
        return rows


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
async def test_a_replica_killed_under_load_loses_no_acknowledged_vote(
        stack: Stack, tmp_path: Path, signum: signal.Signals) -> None:
    """SIGKILL: nothing acknowledged is lost, retries count once. SIGTERM: the same, and the
    replica drains: it answers what it admitted after flushing its last batch."""
    test_round = await open_test_round(stack.database_url, stack.redis_url)
    children, targets = [], []
    for name in ("k0", "k1"):
        port = free_port()
        children.append(await Child.spawn(f"vote-{name}", [sys.executable, "-m", "vote_svc"],
                                          tmp_path, env={
            "DATABASE_URL": stack.database_url, "REDIS_URL": stack.redis_url,
            "TELEVOTE_PORT": str(port), "TELEVOTE_REPLICA": name, "FRAUD_TARGET": "",
            "VOTE_LEASE_MS": "1500", "TELEVOTE_DRAIN_ANNOUNCE_SECONDS": "0",
            **_mesh_secrets(stack)}))
        targets.append(f"127.0.0.1:{port}")
    channels = [grpc.aio.insecure_channel(target) for target in targets]
    try:
        await asyncio.gather(*(wait_serving(target, timeout=30) for target in targets))
        stubs = [vote_service_pb2_grpc.VoteServiceStub(channel) for channel in channels]
        load = Load(test_round, users=200)

        async def killer() -> None:
            await load.until_acknowledged(150)
            os.killpg(children[0].process.pid, signum)
        await asyncio.gather(load.run(lambda number: stubs[number % 2]), killer())
        assert children[0].process.returncode is not None or await asyncio.wait_for(
            children[0].process.wait(), 5) is not None
        if signum == signal.SIGKILL:
            assert load.unacked, "the kill should have caught some votes in flight"
        else:
            assert await children[0].process.wait() == 0  # a clean, drained exit
        await load.retry_unacknowledged(stubs[1])
        rows = await load.check_ledger(stack.database_url)
        assert len(rows) == 1000 and not load.refused
    finally:
        for channel in channels:
            await channel.close()
        for child in children:
            await child.stop()


async def test_postgresql_cut_off_mid_load_gives_unavailable_and_undoes_admissions(
        stack: Stack) -> None:
    test_round = await open_test_round(stack.database_url, stack.redis_url)
    database = urlparse(stack.database_url)
    proxy = Proxy(database.hostname or "127.0.0.1", database.port or 5432)
    await proxy.start()
    proxied = stack.database_url.replace(f":{database.port}/", f":{proxy.port}/")
    replica = await start_replica(proxied, stack.redis_url, "pgcut", vote_lease_ms=1500,
                                  vote_commit_timeout_ms=800, database_pool_max=4)
    load = Load(test_round, users=120)
    stub = replica.votes
    try:
        async def outage() -> None:
            await load.until_acknowledged(120)
            await proxy.cut()
            await asyncio.sleep(1.5)  # the outage: past the commit timeout, as long as a lease
            await proxy.start()
        await asyncio.gather(load.run(lambda _: stub, workers=16), outage())
        assert load.unacked, "votes during the outage must not be acknowledged"
        await load.retry_unacknowledged(stub)
        rows = await load.check_ledger(stack.database_url)
        assert len(rows) == 600
        # Undone admissions left nothing behind: the Redis cache is never looser than the
        # ledger (it can only be stricter, by votes whose commit outcome was ambiguous).
        redis = create_redis(stack.redis_url)
        try:
            per_user = Counter(row["user_id"] for row in rows)
            for user, counted in per_user.items():
                cached = await redis.hget(keys.user_key(keys.shard_of(user), user),
                                          f"free:{test_round.episode_id}")
                assert cached is not None and int(cached) >= counted
        finally:
            await redis.aclose()
    finally:
        await stop_replica(replica)
        await proxy.cut()


async def test_a_redis_flush_mid_round_keeps_the_tally_exact(
        stack: Stack, tmp_path: Path) -> None:
    child, redis_url = await start_redis(tmp_path)
    replicas = []
    try:
        test_round = await open_test_round(stack.database_url, redis_url)
        replicas = [await start_replica(stack.database_url, redis_url, name,
                                        vote_rebuild_settle_ms=1200, vote_commit_timeout_ms=800)
                    for name in ("f0", "f1")]
        stubs = [replica.votes for replica in replicas]
        load = Load(test_round, users=150)
        redis = create_redis(redis_url)

        async def flush() -> None:
            await load.until_acknowledged(250)
            await redis.flushall()
        await asyncio.gather(load.run(lambda number: stubs[number % 2]), flush())
        await load.retry_unacknowledged(stubs[0])
        rows = await load.check_ledger(stack.database_url)
        assert len(rows) == 750
        # The provisional live counters were rebuilt from the ledger: they match it too.
        live: Counter[str] = Counter()
        for shard in range(keys.SHARDS):
            for contestant, votes in (await redis.hgetall(
                    keys.live_key(shard, test_round.round_id))).items():
                live[contestant.decode()] += int(votes)
        assert live == Counter(str(row["contestant_id"]) for row in rows)
        await redis.aclose()
    finally:
        for replica in replicas:
            await stop_replica(replica)
        await child.stop()


async def test_a_dead_replicas_uncommitted_admissions_are_given_back_exactly_once(
        stack: Stack, tmp_path: Path) -> None:
    """A replica admits votes (quota charged in Redis), is killed -9 before its batch
    commits, and the clients never retry: once the leases end, reconcilers (two here, plus the
    mesh's own) undo each admission exactly once, and the voters have their quota back."""
    test_round = await open_test_round(stack.database_url, stack.redis_url)
    port = free_port()
    doomed = await Child.spawn("vote-doomed", [sys.executable, "-m", "vote_svc"], tmp_path, env={
        "DATABASE_URL": stack.database_url, "REDIS_URL": stack.redis_url,
        "TELEVOTE_PORT": str(port), "TELEVOTE_REPLICA": "doomed", "FRAUD_TARGET": "",
        "VOTE_LEASE_MS": "1000", "VOTE_BATCH_INTERVAL_MS": "600000", "VOTE_BATCH_MAX": "100000",
        "VOTE_RECONCILE_INTERVAL_MS": "600000",
        **_mesh_secrets(stack)})
    users = [f"stranded-{new_id()[:8]}-{n}" for n in range(6)]
    episode = test_round.episode_id
    redis = create_redis(stack.redis_url)
    storages = [Storage(create_pool(stack.database_url), create_redis(stack.redis_url))
                for _ in range(2)]
    calls: list[Any] = []
    try:
        await wait_serving(f"127.0.0.1:{port}", doomed, timeout=30)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            votes = vote_service_pb2_grpc.VoteServiceStub(channel)
            calls = [asyncio.ensure_future(votes.SubmitVote(
                vote_request(test_round, contestant=n % 3), metadata=inside(Role.VOTER, user),
                timeout=30)) for user in users for n in range(2)]

            async def charged(user: str) -> int:
                value = await redis.hget(keys.user_key(keys.shard_of(user), user),
                                         f"free:{episode}")
                return int(value or 0)
            async with asyncio.timeout(20):  # admitted, waiting in the replica's batch
                for _ in range(1000):
                    if [await charged(user) for user in users] == [2] * len(users):
                        break
                    await asyncio.sleep(0.05)
            os.killpg(doomed.process.pid, signal.SIGKILL)
            await asyncio.gather(*calls, return_exceptions=True)
        assert not await ledger_rows(stack.database_url, test_round.round_id)

        for storage in storages:
            await storage.connect()
        reconcilers = [Reconciler(storage, Scripts(storage.redis), interval_ms=100,
                                  idempotency_ttl_ms=60_000) for storage in storages]
        async with asyncio.timeout(20):
            for _ in range(100):
                if not any([await charged(user) for user in users]):
                    break
                # Both at once, again and again, racing the mesh's reconciler as well.
                await asyncio.gather(*(r.pass_once() for r in reconcilers for _ in range(3)))
                await asyncio.sleep(0.2)
        # What is checked is that nothing more happens: time for passes of the mesh's own
        # reconciler, then ours again, any of which would undo a second time if it could.
        await asyncio.sleep(1)
        await asyncio.gather(*(r.pass_once() for r in reconcilers))
        # Exactly once: each charge given back, nothing more (a second undo would go below 0).
        assert [await charged(user) for user in users] == [0] * len(users)
        live = await asyncio.gather(*(redis.hgetall(keys.live_key(shard, test_round.round_id))
                                      for shard in range(keys.SHARDS)))
        assert all(int(votes) == 0 for counters in live for votes in counters.values())
        for user in users:
            shard = keys.shard_of(user)
            assert not await redis.keys(f"tv:{keys.tag(shard)}:idem:{user}:*")
            members = await redis.zrange(keys.pending_key(shard), 0, -1)
            assert not [m for m in members if f":idem:{user}:".encode() in m]

        # The voters have their quota back: all 5 free votes.
        replica = await start_replica(stack.database_url, stack.redis_url, "after-the-kill")
        try:
            reply = await replica.votes.SubmitVote(
                vote_request(test_round), metadata=inside(Role.VOTER, users[0]), timeout=10)
            assert reply.free_votes_left == 4
        finally:
            await stop_replica(replica)
    finally:
        for call in calls:
            call.cancel()
        await doomed.stop()
        for storage in storages:
            await storage.close()
        await redis.aclose()


async def test_an_overloaded_replica_sheds_new_votes_at_once_and_changes_nothing(
        stack: Stack) -> None:
    """Past its in-flight limit a replica refuses new calls with UNAVAILABLE `OVERLOADED`
    and a retry delay instead of queueing them; the refused votes leave no trace, the
    admitted ones are all recorded, and a retry once the load is gone is accepted."""
    test_round = await open_test_round(stack.database_url, stack.redis_url)
    replica = await start_replica(stack.database_url, stack.redis_url, "shed",
                                  vote_max_inflight_votes=3, vote_batch_interval_ms=300)
    users = [f"shed-{new_id()[:8]}-{n}" for n in range(12)]
    requests = {user: vote_request(test_round) for user in users}
    votes = vote_service_pb2_grpc.VoteServiceStub(replica.channel)
    gateway = vote_gateway_service_pb2_grpc.VoteGatewayServiceStub(replica.channel)

    answered, full = 0, asyncio.Event()

    async def vote(user: str) -> vote_service_pb2.SubmitVoteResponse:
        nonlocal answered
        try:
            return await votes.SubmitVote(  # type: ignore[no-any-return]
                requests[user], metadata=inside(Role.VOTER, user), timeout=15)
        finally:
            answered += 1
            if answered == len(users) - 3:
                full.set()

    async def gateway_batch() -> vote_gateway_service_pb2.SubmitVotesResponse:
        # Sent once the replica is full: the nine votes past its limit were shed at once,
        # and the three it admitted wait for their 300 ms batch.
        await asyncio.wait_for(full.wait(), 10)
        sms = vote_gateway_service_pb2.GatewayVote(
            request_id=new_id(), user_id=f"shed-sms-{new_id()[:8]}",
            round_id=test_round.round_id, contestant_id=test_round.contestants[0],
            vote_type=vote_types_pb2.VOTE_TYPE_PREMIUM_SMS, count=1,
            channel=vote_types_pb2.CHANNEL_SMS)
        malformed = vote_gateway_service_pb2.GatewayVote(request_id="not-a-uuid")
        return await gateway.SubmitVotes(  # type: ignore[no-any-return]
            vote_gateway_service_pb2.SubmitVotesRequest(votes=[sms, malformed]),
            metadata=inside(Role.INTERNAL, "sms_svc"), timeout=15)
    try:
        *answers, batch = await asyncio.gather(*(vote(user) for user in users),
                                               gateway_batch(), return_exceptions=True)
        # A gateway batch is refused as a whole before its votes are even validated.
        assert isinstance(batch, vote_gateway_service_pb2.SubmitVotesResponse), batch
        assert [(r.ok, r.error.reason) for r in batch.results] == [(False, "OVERLOADED")] * 2
        accepted = {user for user, answer in zip(users, answers, strict=True)
                    if isinstance(answer, vote_service_pb2.SubmitVoteResponse)}
        shed = [answer for answer in answers if isinstance(answer, grpc.aio.AioRpcError)]
        assert len(accepted) == 3 and len(shed) == 9
        for error in shed:
            info = error_info(error)
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert info is not None and info.reason == "OVERLOADED"
        rows = await ledger_rows(stack.database_url, test_round.round_id)
        assert {row["user_id"] for row in rows} == accepted
        redis = create_redis(stack.redis_url)
        try:
            for user in set(users) - accepted:  # nothing charged for a shed vote
                used = await redis.hget(keys.user_key(keys.shard_of(user), user),
                                        f"free:{test_round.episode_id}")
                assert used in (None, b"0"), (user, used)
        finally:
            await redis.aclose()
        retry = next(user for user in users if user not in accepted)
        await votes.SubmitVote(requests[retry], metadata=inside(Role.VOTER, retry), timeout=15)
        assert len(await ledger_rows(stack.database_url, test_round.round_id)) == 4
    finally:
        await stop_replica(replica)
