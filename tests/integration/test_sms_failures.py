"""sms_svc when things fail: PostgreSQL cut off under a carrier's batch, a reply's lease ended
while its replica waited, a subscriber's number purged before the reply went out.

sms_svc's parts run in this process (two "replicas" are two stores, each with its own lease
token) against the session stack's PostgreSQL, Redis and vote_svc, or against PostgreSQL
behind a proxy the test cuts.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from urllib.parse import urlparse

import grpc
import pytest
import pytest_asyncio

from ops.stack import Stack
from runtime import ids
from runtime.errors import ApiError
from runtime.storage import Storage, create_pool, create_redis
from sms_svc.inbound import InboundProcessor, InboundSms
from sms_svc.outbox import ReplyOutbox
from sms_svc.settlement import purge_msisdns
from sms_svc.store import ClaimRow, OutcomeRow, PendingReply, SmsStore
from sms_svc.votes import VoteSender
from tests.proxy_support import Proxy
from tests.sms_support import SHORT_CODE, sms_round
from tests.vote_support import query

pytestmark = pytest.mark.stack


async def _storage(database_url: str, redis_url: str) -> Storage:
    storage = Storage(create_pool(database_url, max_size=4, autocommit=True),
                      create_redis(redis_url))
    await storage.connect()
    return storage


@pytest_asyncio.fixture
async def storage(stack: Stack) -> AsyncIterator[Storage]:
    storage = await _storage(stack.database_url, stack.redis_url)
    yield storage
    await storage.close()


def _message(number: int) -> InboundSms:
    return InboundSms(carrier="SMART", carrier_message_id=f"outage-{uuid.uuid4()}",
                      msisdn=f"+8551{number:07d}", short_code=SHORT_CODE, text="V1",
                      received_at=datetime.now(UTC))


def _processor(storage: Storage, vote_channel: grpc.aio.Channel, *,
               vote_deadline_ms: int = 5_000) -> InboundProcessor:
    """sms_svc's inbound processing in this process, on `storage`, voting on `vote_channel`."""
    return InboundProcessor(
        SmsStore(storage), storage.redis,
        VoteSender(vote_channel, wait_ms=1, max_batch=500, deadline_ms=vote_deadline_ms),
        secret=b"test-secret", default_language="en", lease_ms=10_000, max_age_ms=120_000,
        deadline_ms=5_000)


async def test_a_storage_failure_answers_each_message_unavailable_and_its_redelivery_counts_once(
        stack: Stack, edge_channel: grpc.aio.Channel) -> None:
    """PostgreSQL gone under a carrier's batch: every message is answered UNAVAILABLE with
    STORAGE_UNAVAILABLE and a retry delay (the carrier redelivers it), never INTERNAL, and
    nothing of it is recorded; the redelivery is counted and charged once."""
    test_round = await sms_round(stack, edge_channel)
    database = urlparse(stack.database_url)
    proxy = Proxy(database.hostname or "127.0.0.1", database.port or 5432)
    await proxy.start()
    storage = await _storage(
        stack.database_url.replace(f":{database.port}/", f":{proxy.port}/"), stack.redis_url)
    storage.pool.timeout = 2.0  # a connection that cannot be had fails fast
    vote_channel = stack.channel("vote_svc", as_holder="sms_svc")
    inbound = _processor(storage, vote_channel)
    try:
        # Lines open and the short code known (the binding is cached from here on).
        (warm,) = await inbound.receive_many([_message(1)])
        assert not isinstance(warm, ApiError) and warm.outcome == "COUNTED", warm
        await proxy.cut()
        batch = [_message(number) for number in range(2, 5)]
        results = await inbound.receive_many(batch)
        for result in results:
            assert isinstance(result, ApiError), result
            assert result.code == grpc.StatusCode.UNAVAILABLE
            assert result.reason == "STORAGE_UNAVAILABLE"
            assert result.retry_after_seconds is not None
        ids_sent = [sms.carrier_message_id for sms in batch]
        assert await query(stack.database_url, "SELECT * FROM sms_messages"
                           " WHERE carrier_message_id = ANY(%s)", ids_sent) == []

        await proxy.start()
        # The carrier redelivers what was answered UNAVAILABLE until it has outcomes (the
        # pool reconnects in the background meanwhile).
        redelivered: list[object] = []
        for _ in range(30):
            redelivered = list(await inbound.receive_many(batch))
            if not any(isinstance(result, ApiError) for result in redelivered):
                break
            await asyncio.sleep(0.5)
        assert all(getattr(result, "outcome", None) == "COUNTED" for result in redelivered), \
            redelivered
        records = await query(stack.database_url, "SELECT * FROM sms_records"
                              " WHERE carrier_message_id = ANY(%s)", ids_sent)
        assert len(records) == 3 and all(record["charged"] for record in records)
        votes = await query(stack.database_url,
                            "SELECT vote_id FROM votes WHERE round_id = %s AND channel = 'SMS'",
                            test_round.round_id)
        assert len(votes) == 4  # the warm-up's and one each, none twice
    finally:
        await proxy.cut()
        await vote_channel.close(None)
        await storage.close()


async def test_an_undecided_message_frees_its_lease_and_a_decided_one_leaves_it_to_end(
        stack: Stack, edge_channel: grpc.aio.Channel, storage: Storage) -> None:
    """vote_svc out of reach: the message is answered UNAVAILABLE and its lease released at
    once, so the carrier's redelivery decides it without waiting for the lease to end. A
    counted message's lease is left to end by itself (its outcome answers every copy)."""
    await sms_round(stack, edge_channel)
    nowhere = grpc.aio.insecure_channel("127.0.0.1:1")
    vote_channel = stack.channel("vote_svc", as_holder="sms_svc")
    unreachable = _processor(storage, nowhere, vote_deadline_ms=300)
    reachable = _processor(storage, vote_channel)
    try:
        sms = _message(7)
        lease = f"tv:sms:lease:{{SMART}}:{sms.carrier_message_id}"
        (refused,) = await unreachable.receive_many([sms])
        assert isinstance(refused, ApiError) and refused.reason == "UNAVAILABLE", refused
        for _ in range(50):  # the release leaves with the next round trip
            if not await storage.redis.exists(lease):
                break
            await asyncio.sleep(0.02)
        assert not await storage.redis.exists(lease)
        (counted,) = await reachable.receive_many([sms])  # not held up by a lease
        assert not isinstance(counted, ApiError) and counted.outcome == "COUNTED", counted
        assert 0 < await storage.redis.pttl(lease) <= 10_000  # left to end by itself
        (again,) = await reachable.receive_many([sms])
        assert again == counted
    finally:
        await nowhere.close(None)
        await vote_channel.close(None)


async def _recorded(store: SmsStore, received_at: datetime | None = None) -> PendingReply:
    """A message's receipt and outcome as `store` records them: its reply joins the outbox
    under `store`'s lease."""
    carrier_message_id = f"outbox-{uuid.uuid4()}"
    (claim,) = await store.claim([ClaimRow(
        ids.new_id(), "SMART", carrier_message_id, "00" * 32, "pseudonym", SHORT_CODE, "hello",
        "en", (received_at or datetime.now(UTC)).isoformat(), None, "+85512345678")])
    assert not isinstance(claim, BaseException)
    ((answer, mine),) = await store.record([OutcomeRow(  # type: ignore[misc]
        claim.message_id, "INVALID_FORMAT", 0, None, None, None, None, False, 0, "USD",
        "To vote, send the contestant's number", "en")])
    assert mine
    return PendingReply(claim.message_id, "SMART", carrier_message_id, "+85512345678",
                        SHORT_CODE, answer.reply_text, 0)


async def test_a_reply_whose_lease_ended_while_it_waited_is_sent_by_the_replica_holding_it(
        storage: Storage, stack: Stack) -> None:
    """Replica A recorded two replies; the first holds A's only sending slot (a slow gateway)
    while the second waits past its lease, and replica B takes both. The second goes out once,
    by B: A sends only replies its own token still holds."""
    store_a = SmsStore(storage, replies_queued=True, reply_lease_ms=400)
    store_b = SmsStore(storage, replies_queued=True, reply_lease_ms=10_000)
    assert store_a.lease_token != store_b.lease_token
    slow, waiting = await _recorded(store_a), await _recorded(store_a)
    delivered: list[tuple[str, str]] = []
    gateway_free = asyncio.Event()

    async def gateway_a(reply: PendingReply) -> str | None:
        delivered.append(("A", reply.message_id))
        if reply.message_id == slow.message_id:
            await gateway_free.wait()
        return None

    async def gateway_b(reply: PendingReply) -> str | None:
        delivered.append(("B", reply.message_id))
        return None

    outbox_a = ReplyOutbox(store_a, gateway_a, poll_ms=60_000, retry_ms=1_000, concurrency=1)
    outbox_b = ReplyOutbox(store_b, gateway_b, poll_ms=50, retry_ms=1_000)
    outbox_a.recorded([slow])
    outbox_a.recorded([waiting])
    await asyncio.sleep(0.6)  # both leases of A end
    outbox_b.start()
    try:
        for _ in range(100):
            rows = await query(stack.database_url, "SELECT * FROM sms_reply_outbox"
                               " WHERE message_id = ANY(%s::uuid[])",
                               [slow.message_id, waiting.message_id])
            if all(row["sent_at"] is not None for row in rows):
                break
            await asyncio.sleep(0.05)
        assert all(row["sent_at"] is not None for row in rows)
    finally:
        gateway_free.set()
        await outbox_b.stop()
        await outbox_a.stop()
    # The slow one was with A's gateway already when its lease ended (at least once); the
    # waiting one went out once, by the replica that held it: B (or the stack's own replica,
    # whose poll may have taken it first), never A.
    assert [who for who, message in delivered if message == waiting.message_id] in (["B"], [])


async def test_a_reply_whose_number_was_purged_ends_dropped_with_its_reason(
        storage: Storage, stack: Stack) -> None:
    """`televote sms purge` drops the replies it makes unsendable; a poll drops one whose
    number went another way (a purge before this rule): none stays pending for ever."""
    # Leased long to this store, which never sends: no replica's poll takes them meanwhile.
    store = SmsStore(storage, replies_queued=True, reply_lease_ms=600_000)
    long_ago = datetime(2001, 1, 1, tzinfo=UTC)
    purged, orphaned = await _recorded(store, long_ago), await _recorded(store, long_ago)
    await query(stack.database_url, "DELETE FROM sms_reply_addresses WHERE message_id = %s"
                " RETURNING message_id", orphaned.message_id)
    assert await purge_msisdns(stack.database_url, datetime(2001, 1, 2, tzinfo=UTC)) == 1
    # The orphan's lease ends: the next poll, this one's or the stack replica's, drops it.
    await query(stack.database_url, "UPDATE sms_reply_outbox SET due_at = clock_timestamp()"
                " WHERE message_id = %s RETURNING message_id", orphaned.message_id)
    poller = SmsStore(storage, replies_queued=True, reply_lease_ms=1)
    taken = await poller.take_due_replies(1000)
    assert {reply.message_id for reply in taken}.isdisjoint(
        {purged.message_id, orphaned.message_id})
    rows = await query(stack.database_url, "SELECT * FROM sms_reply_outbox"
                       " WHERE message_id = ANY(%s::uuid[])",
                       [purged.message_id, orphaned.message_id])
    assert len(rows) == 2
    for row in rows:
        assert row["sent_at"] is None and row["dropped_at"] is not None
        assert row["drop_reason"] == "MSISDN_PURGED"
