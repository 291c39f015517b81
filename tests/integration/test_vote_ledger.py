"""The group-commit writer on its own, against the real PostgreSQL and Redis: one statement per
batch writes the new rows, and every total is summed from the rows it actually inserted."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import psycopg
import pytest_asyncio

from ops.stack import Stack
from runtime.receipts import leaf_hash as receipt_hash
from runtime.storage import Storage, create_pool, create_redis
from tests.support_windows import TestRound, open_test_round
from tests.vote_support import new_id, query
from vote_svc.admission import Outcome, Scripts, VoteKeys
from vote_svc.ledger import CommitResult, Ledger, LedgerVote, batch_rows
from vote_svc.store import WRITE_BATCH


@pytest_asyncio.fixture
async def ledger(stack: Stack) -> AsyncIterator[Ledger]:
    storage = Storage(create_pool(stack.database_url), create_redis(stack.redis_url))
    await storage.connect()
    writer = Ledger(storage.pool, storage.redis, Scripts(storage.redis), batch_max=100,
                    interval_ms=20, inflight=2, timeout_ms=5000, idempotency_ttl_ms=60_000)
    writer.start()
    try:
        yield writer
    finally:
        await writer.close()
        await storage.close()


def _vote(test_round: TestRound, user_id: str, *, request_id: str = "",
          vote_type: str = "FREE", contestant: int = 0) -> LedgerVote:
    vote_id, request_id = new_id(), request_id or new_id()
    now = int(time.time() * 1000)
    leaf = f'{{"vote_id":"{vote_id}"}}'.encode()
    keyset = VoteKeys.of(user_id, test_round.round_id, request_id)
    return LedgerVote(
        vote_id=vote_id, request_id=request_id, user_id=user_id, round_id=test_round.round_id,
        episode_id=test_round.episode_id, contestant_id=test_round.contestants[contestant],
        vote_type=vote_type, count=1, channel="APP", admitted_ms=now, fraud_action="ALLOW",
        fraud_score=0.1, fraud_decision_id="", ip_hash="3f1c", device_id="d", app_version="1",
        latitude=11.5, longitude=104.9, received_at=None, fingerprint="ab" * 16,
        leaf_data=leaf, receipt_hash=receipt_hash(leaf), keys=keyset,
        outcome=Outcome("P", "ab" * 16, vote_id, now, now + 10_000, 4, 0,
                        test_round.episode_id))


async def _tallies(database_url: str, round_id: str) -> int:
    rows = await query(database_url, "SELECT coalesce(sum(votes), 0)::int AS n"
                       " FROM round_tallies WHERE round_id = %s", round_id)
    return int(rows[0]["n"])


async def test_a_request_id_already_in_the_ledger_is_answered_with_its_vote_and_not_counted(
        stack: Stack, ledger: Ledger) -> None:
    test_round = await open_test_round(stack.database_url, stack.redis_url)
    user, other = f"ledger-{new_id()[:8]}", f"ledger-{new_id()[:8]}"
    first = _vote(test_round, user)
    assert (await ledger.submit(first)).kind == "committed"
    # The same request again (its first commit looked failed, say) with a new vote id, in a
    # batch with a new vote: the new one commits, the repeat gets the ledger's original.
    again = _vote(test_round, user, request_id=first.request_id, contestant=1)
    fresh = _vote(test_round, other, contestant=2)
    repeat, new = await asyncio.gather(ledger.submit(again), ledger.submit(fresh))
    assert new == CommitResult("committed")
    assert repeat.kind == "existing" and repeat.existing is not None
    assert (repeat.existing.vote_id, repeat.existing.receipt_hash) == (
        first.vote_id, first.receipt_hash)
    rows = await query(stack.database_url, "SELECT vote_id::text, user_id, leaf_data,"
                       " admitted_at = timestamptz 'epoch' + admitted_ms * interval '1 ms' AS"
                       " exact FROM votes WHERE round_id = %s ORDER BY admitted_ms",
                       test_round.round_id)
    assert [(row["vote_id"], row["user_id"]) for row in rows] == [
        (first.vote_id, user), (fresh.vote_id, other)]
    assert bytes(rows[0]["leaf_data"]) == first.leaf_data and all(r["exact"] for r in rows)
    # Totals count the rows written, not the votes submitted.
    assert await _tallies(stack.database_url, test_round.round_id) == 2
    usage = await query(stack.database_url, "SELECT used FROM free_vote_usage"
                        " WHERE user_id = %s AND episode_id = %s", user, test_round.episode_id)
    assert [row["used"] for row in usage] == [1]


async def test_a_paid_vote_without_credits_is_refused_and_the_rest_of_its_batch_commits(
        stack: Stack, ledger: Ledger) -> None:
    test_round = await open_test_round(stack.database_url, stack.redis_url)
    broke, funded = f"ledger-broke-{new_id()[:8]}", f"ledger-funded-{new_id()[:8]}"
    await query(stack.database_url, "INSERT INTO wallets (user_id, credited, spent)"
                " VALUES (%s, 1, 0) RETURNING user_id", funded)
    results = await asyncio.gather(
        ledger.submit(_vote(test_round, broke, vote_type="PAID")),
        ledger.submit(_vote(test_round, funded, vote_type="PAID")),
        ledger.submit(_vote(test_round, broke)))
    assert list(results) == [CommitResult("quota", constraint="wallet_not_overspent"),
                             CommitResult("committed"), CommitResult("committed")]
    wallets = await query(stack.database_url, "SELECT user_id, credited, spent FROM wallets"
                          " WHERE user_id IN (%s, %s) ORDER BY user_id", broke, funded)
    assert [(row["user_id"], row["credited"], row["spent"]) for row in wallets] == [
        (funded, 1, 1)]
    assert await _tallies(stack.database_url, test_round.round_id) == 2


async def test_a_batch_commits_while_another_writers_batch_of_the_same_contestant_is_open(
        stack: Stack, ledger: Ledger) -> None:
    """Replicas' batches are in flight at once; one that is slow to commit (its connection
    descheduled, say) must not hold up the others: they share no tally row (migrations/0012).
    With one row per contestant, the second batch would wait for the first one's commit."""
    test_round = await open_test_round(stack.database_url, stack.redis_url)
    held = _vote(test_round, f"ledger-{new_id()[:8]}")
    async with await psycopg.AsyncConnection.connect(stack.database_url) as other_writer:
        async with other_writer.transaction(force_rollback=True):
            await other_writer.execute(WRITE_BATCH, (batch_rows([held]),))
            # The other writer's batch is written and not yet committed.
            result = await asyncio.wait_for(
                ledger.submit(_vote(test_round, f"ledger-{new_id()[:8]}")), 3)
    assert result == CommitResult("committed")
    assert await _tallies(stack.database_url, test_round.round_id) == 1
