"""Final results from a round checkpoint equal the full recount (invariant 5), whatever changed
behind the checkpoint: every invalidation reason, fraud rejections and credits that arrive
after rows were judged, a row committed below the watermark (the close falls back to the full
recount; the checkpointer rebuilds), rules changed under it, chunk and block edges.

The finalizer runs in this process against a database of its own (created on the stack's
PostgreSQL server), so the stack's results_svc does not checkpoint or finalize these rounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest_asyncio
from psycopg.rows import dict_row, tuple_row

from ops.migrate import migrate
from ops.stack import Stack
from results_svc import checkpoint
from results_svc.config import ResultsConfig
from results_svc.final import Finalizer
from results_svc.merkle import verify_inclusion
from results_svc.proofs import Proofs
from results_svc.rounds import load_round
from results_svc.signing import Signer
from runtime import keys
from runtime.storage import Storage, create_redis
from tests.support_windows import TestRound, open_test_round

COLUMNS = ("vote_id, request_id, user_id, shard, round_id, episode_id, contestant_id, vote_type,"
           " count, channel, admitted_ms, admitted_at, fraud_action, fingerprint, leaf_data,"
           " receipt_hash")


@pytest_asyncio.fixture(scope="module")
async def database(stack: Stack) -> AsyncIterator[str]:
    """A migrated database of this module's own on the stack's PostgreSQL server."""
    name = f"checkpoint_{uuid.uuid4().hex[:12]}"
    admin = stack.database_url.rsplit("/", 1)[0] + "/postgres"
    async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as connection:
        await connection.execute(f'CREATE DATABASE "{name}"')
    url = stack.database_url.rsplit("/", 1)[0] + f"/{name}"
    migrate(url)
    yield url
    async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as connection:
        await connection.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@contextlib.asynccontextmanager
async def _replica(stack: Stack, database: str, state_dir: Path) -> AsyncIterator[Finalizer]:
    """A results_svc replica's finalizer that checkpoints up to the pending votes (no lag) in
    steps of 1,000 rows, with 4-leaf receipt blocks; driven by the test, not by its loop."""
    config = ResultsConfig(database_url=database, redis_url=stack.redis_url,
                           sync_target=stack.target("sync_svc"), televote_state_dir=state_dir,
                           televote_replica=state_dir.name, results_checkpoint_lag_ms=0,
                           results_checkpoint_rows=1000, results_receipt_block_leaves=4)
    storage = Storage.from_config(config)
    await storage.connect()
    finalizer = Finalizer(storage, config, Signer.load_or_create(state_dir))
    await finalizer.register_key()
    try:
        yield finalizer
    finally:
        await storage.close()


@pytest_asyncio.fixture
async def finalizer(stack: Stack, database: str, tmp_path: Path) -> AsyncIterator[Finalizer]:
    async with _replica(stack, database, tmp_path / "a") as replica:
        yield replica


class Ledger:
    """Writes ledger rows of a round (as vote_svc's group commit would) and the inputs that
    judge them, each write its own transaction."""

    def __init__(self, url: str, test_round: TestRound) -> None:
        self.url = url
        self.round = test_round
        self.requests = 0

    async def now(self, stack: Stack) -> int:
        redis = create_redis(stack.redis_url)
        try:
            return await keys.server_time_ms(redis)
        finally:
            await redis.aclose()

    def row(self, user: str, admitted_ms: int, *, vote_type: str = "FREE", contestant: int = 0,
            count: int = 1, vote_id: str | None = None, round_id: str | None = None,
            episode_id: str | None = None, channel: str = "APP",
            contestant_id: str | None = None) -> tuple[Any, ...]:
        self.requests += 1
        vote_id = vote_id or str(uuid.uuid4())
        round_id = round_id or self.round.round_id
        contestant_id = contestant_id or self.round.contestants[contestant]
        leaf = json.dumps({"vote_id": vote_id, "n": self.requests, "round_id": round_id},
                          sort_keys=True).encode()
        return (vote_id, f"req-{self.requests}", user, keys.shard_of(user), round_id,
                episode_id or self.round.episode_id, contestant_id, vote_type, count, channel,
                admitted_ms, datetime.fromtimestamp(admitted_ms / 1000, UTC), "ALLOW", b"f", leaf,
                hashlib.sha256(b"\x00" + leaf).digest())

    async def write(self, rows: list[tuple[Any, ...]]) -> None:
        async with await psycopg.AsyncConnection.connect(self.url) as connection:
            async with connection.cursor() as cursor, cursor.copy(
                    f"COPY votes ({COLUMNS}) FROM STDIN") as copy:
                for row in rows:
                    await copy.write_row(row)

    async def sql(self, query: str, *args: Any) -> list[Any]:
        async with await psycopg.AsyncConnection.connect(self.url) as connection:
            cursor = await connection.execute(query, args)
            return await cursor.fetchall() if cursor.description else []

    async def credit(self, user: str, votes: int) -> None:
        await self.sql("INSERT INTO wallets (user_id, credited) VALUES (%s, %s) ON CONFLICT"
                       " (user_id) DO UPDATE SET credited = wallets.credited + excluded.credited",
                       user, votes)

    async def reject(self, user: str, vote_ref: str | None = None) -> None:
        review = str(uuid.uuid4())
        await self.sql(
            "INSERT INTO fraud_reviews (review_id, vote_ref, decision_id, user_id, round_id,"
            " score, signals, state) VALUES (%s, %s, 'd', %s, %s, 0.9, '{}', 'REJECTED')",
            review, vote_ref or f"all-{review}", user, self.round.round_id)
        await self.sql(
            "INSERT INTO fraud_rejections (rejection_id, round_id, user_id, vote_ref, review_id,"
            " rejected_by) VALUES (%s, %s, %s, %s, %s, 'test')",
            str(uuid.uuid4()), self.round.round_id, user, vote_ref, review)

    async def close(self, closed_ms: int) -> None:
        await self.sql("UPDATE rounds SET state = 'CLOSED', closed_at = to_timestamp(%s / 1000.0)"
                       " WHERE round_id = %s", closed_ms, self.round.round_id)


async def _round(stack: Stack, url: str, **options: Any) -> Ledger:
    test_round = await open_test_round(url, stack.redis_url, opens_in_ms=-600_000,
                                       duration_ms=3_600_000, contestants=3, **options)
    return Ledger(url, test_round)


async def _stored(connection: psycopg.AsyncConnection[Any], round_id: str) -> dict[str, Any]:
    """Everything of a round's stored result that the recount determines (not the signature,
    its time and who computed it)."""
    out: dict[str, Any] = {}
    for name, query in {
        "result": "SELECT ledger_votes, invalidated_votes, total_votes, counts, winner_ids,"
                  " tree_size, root_hash, reconciliation->'invalidated_rows_by_reason',"
                  " reconciliation->'ledger' FROM round_results WHERE round_id = %s",
        "invalid": "SELECT vote_id, reason FROM round_result_invalid_votes WHERE round_id = %s"
                   " ORDER BY vote_id",
        "leaves": "SELECT chunk, leaves FROM round_result_leaves WHERE round_id = %s"
                  " ORDER BY chunk",
        "blocks": "SELECT block, admitted_ms, vote_id, receipt_hash FROM round_result_blocks"
                  " WHERE round_id = %s ORDER BY block",
        "roots": "SELECT block_leaves, roots FROM round_result_block_roots WHERE round_id = %s",
    }.items():
        async with connection.cursor(row_factory=tuple_row) as cursor:
            await cursor.execute(query, (round_id,))
            out[name] = await cursor.fetchall()
    return out


async def _full_recount(finalizer: Finalizer, url: str, round_id: str) -> dict[str, Any]:
    """What the reference path (the whole ledger judged at once) would store now."""
    async with await psycopg.AsyncConnection.connect(url, row_factory=dict_row) as connection:
        async with connection.transaction(force_rollback=True):
            await connection.execute("UPDATE rounds SET state = 'CLOSED' WHERE round_id = %s"
                                     " AND state = 'OPEN'", (round_id,))
            info = await load_round(connection, round_id)
            assert info is not None
            await checkpoint.discard(connection, round_id)
            assert await finalizer.recount_in(connection, info, {})
            return await _stored(connection, round_id)


async def _staleness(url: str, round_id: str, rejudge_limit: int = 1000) -> str | None:
    async with await psycopg.AsyncConnection.connect(url, row_factory=dict_row) as connection:
        info = await load_round(connection, round_id)
        state = await checkpoint.load(connection, round_id)
        assert info is not None and state is not None
        return await checkpoint.staleness(connection, info, state, rejudge_limit)


async def _catch_up(finalizer: Finalizer, round_id: str) -> None:
    while not await finalizer.checkpoint(round_id):
        pass


async def _finalize_and_compare(finalizer: Finalizer, ledger: Ledger, closed_ms: int) -> None:
    """Close, take the reference recount, finalize; the stored result must equal it."""
    round_id = ledger.round.round_id
    await ledger.close(closed_ms)
    expected = await _full_recount(finalizer, ledger.url, round_id)
    assert await finalizer.finalize(round_id)
    async with await psycopg.AsyncConnection.connect(ledger.url) as connection:
        got = await _stored(connection, round_id)
    assert got == expected
    async with await psycopg.AsyncConnection.connect(ledger.url) as connection:
        await checkpoint.tidy(connection)
    assert await ledger.sql("SELECT count(*) FROM round_checkpoints WHERE round_id = %s",
                            round_id) == [(0,)]


async def test_a_checkpointed_result_equals_the_recount_with_every_reason_and_late_inputs(
        stack: Stack, database: str, finalizer: Finalizer) -> None:
    ledger = await _round(stack, database, free_quota=3, free_cap=2)
    test_round = ledger.round
    other_round = str(uuid.uuid4())  # an earlier round of the episode: shares the free quota
    await ledger.sql(
        "INSERT INTO rounds (round_id, episode_id, name, contestant_ids, window_ms, visibility,"
        " state, opens_at, closes_at, closed_at, lines_close_at) SELECT %s, episode_id,"
        " 'Earlier', contestant_ids, window_ms, visibility, 'FINALIZED', opens_at, opens_at,"
        " opens_at, opens_at FROM rounds WHERE round_id = %s", other_round, test_round.round_id)
    other_episode = await _round(stack, database)  # paid votes count across episodes
    t = test_round.opens_at_ms
    dup = str(uuid.uuid4())
    await ledger.credit("paid-a", 2)
    await ledger.credit("paid-late", 1)
    await ledger.credit("paid-other", 2)
    await ledger.reject("fraud-early")
    await ledger.write([
        ledger.row("early", t - 5000),  # OUTSIDE_WINDOW
        ledger.row("quota", t - 100_000, round_id=other_round),
        ledger.row("quota", t - 90_000, round_id=other_round),
        ledger.row("quota", t + 1000, contestant=1),
        ledger.row("quota", t + 1001, contestant=1),  # OVER_FREE_QUOTA (2 + 2 > 3)
        ledger.row("cap", t + 1002), ledger.row("cap", t + 1003),
        ledger.row("cap", t + 1004),  # OVER_ROUND_FREE_CAP (3 > 2)
        ledger.row("paid-a", t + 1005, vote_type="PAID", count=2, contestant=2),
        ledger.row("paid-a", t + 1006, vote_type="PAID"),  # NO_BALANCE
        ledger.row("stranger", t + 1007, contestant_id=str(uuid.uuid4())),  # NOT_A_CONTESTANT
        ledger.row("dup", t + 1008, vote_id=dup),
        ledger.row("dup", t + 1009, vote_id=dup),  # DUPLICATE
        ledger.row("fraud-early", t + 1010),  # FRAUD_REJECTED
        ledger.row("fraud-late", t + 1011, contestant=2),
        ledger.row("fraud-late", t + 1012, contestant=2),
        ledger.row("paid-late", t + 1013, vote_type="PAID", count=3),  # NO_BALANCE, then not
        other_episode.row("paid-other", t + 900, vote_type="PAID", count=2),
        ledger.row("paid-other", t + 1014, vote_type="PAID", contestant=1),  # NO_BALANCE
    ] + [ledger.row(f"crowd-{n}", t + 2000 + n, contestant=n % 3) for n in range(2500)])
    await _catch_up(finalizer, test_round.round_id)
    assert await _staleness(database, test_round.round_id) is None

    # Judged already: a fraud rejection and a credit arrive, and more votes.
    await ledger.reject("fraud-late")
    await ledger.credit("paid-late", 2)
    now = await ledger.now(stack)
    await ledger.write([ledger.row(f"crowd-{n}", now + n, contestant=1) for n in range(300)]
                       + [ledger.row("quota", now + 400)])
    await _catch_up(finalizer, test_round.round_id)
    # After the last checkpoint, before the close: one vote's rejection, a credit, the last
    # votes, and one after the close.
    await ledger.reject("cap", vote_ref="req-6")
    await ledger.credit("paid-a", 5)
    now = await ledger.now(stack)
    await ledger.write([ledger.row(f"last-{n}", now + 500 + n, contestant=2) for n in range(50)]
                       + [ledger.row("after-close", now + 10_000)])
    assert await _staleness(database, test_round.round_id) is None
    await _finalize_and_compare(finalizer, ledger, now + 5000)

    rows = await ledger.sql("SELECT reason, count(*) FROM round_result_invalid_votes"
                            " WHERE round_id = %s GROUP BY 1", test_round.round_id)
    assert dict(rows) == {"OUTSIDE_WINDOW": 2, "OVER_FREE_QUOTA": 2, "OVER_ROUND_FREE_CAP": 1,
                          "NO_BALANCE": 1, "NOT_A_CONTESTANT": 1, "DUPLICATE": 1,
                          "FRAUD_REJECTED": 4}
    # A receipt of the checkpointed tree proves its inclusion in the signed root.
    proofs = Proofs(finalizer._storage, finalizer._config)  # the replica's own connections
    for vote_id, admitted_ms, receipt in await ledger.sql(
            "SELECT vote_id::text, admitted_ms, receipt_hash FROM votes WHERE round_id = %s"
            " ORDER BY random() LIMIT 5", test_round.round_id):
        found = await proofs.inclusion(test_round.round_id, admitted_ms, vote_id, receipt)
        assert found is not None
        index, size, path, root = found
        assert verify_inclusion(receipt, index, size, path, root)


async def test_a_row_committed_behind_the_watermark_rebuilds_or_falls_back_to_the_recount(
        stack: Stack, database: str, finalizer: Finalizer) -> None:
    ledger = await _round(stack, database)
    round_id = ledger.round.round_id
    t = ledger.round.opens_at_ms
    await ledger.write([ledger.row(f"v-{n}", t + n, contestant=n % 3) for n in range(1500)])
    await _catch_up(finalizer, round_id)
    await ledger.write([ledger.row("late-1", t + 700, contestant=2)])
    assert await _staleness(database, round_id) == (
        "ledger rows committed below the watermark after it was taken")
    await _catch_up(finalizer, round_id)  # rebuilt from the start
    assert await _staleness(database, round_id) is None
    # A window cut below the watermark changes how judged rows count.
    await ledger.sql("UPDATE rounds SET closes_at = to_timestamp(%s / 1000.0) WHERE"
                     " round_id = %s", t + 1000, round_id)
    assert await _staleness(database, round_id) == (
        "the round's rules changed below the watermark")
    await ledger.sql("UPDATE rounds SET closes_at = to_timestamp(%s / 1000.0) WHERE"
                     " round_id = %s", ledger.round.closes_at_ms, round_id)
    assert await _staleness(database, round_id) is None
    # A late row that no checkpoint step sees before the close: the close recounts.
    await ledger.write([ledger.row("late-2", t + 3, contestant=1)])
    now = await ledger.now(stack)
    await _finalize_and_compare(finalizer, ledger, now)
    assert (await ledger.sql("SELECT total_votes FROM round_results WHERE round_id = %s",
                             round_id)) == [(1502,)]
    # With no checkpoint left to need them, the change logs are emptied.
    async with await psycopg.AsyncConnection.connect(database) as connection:
        await checkpoint.tidy(connection)
    assert await ledger.sql("SELECT count(*) FROM ledger_appends") == [(0,)]


async def test_a_checkpoint_across_chunks_and_steps_equals_the_recount(
        stack: Stack, database: str, finalizer: Finalizer) -> None:
    """More than one 65,536-leaf chunk, judged in steps of 1,000 rows with a paid voter whose
    credit changes between steps; several votes per ms."""
    ledger = await _round(stack, database)
    round_id = ledger.round.round_id
    t = ledger.round.opens_at_ms
    rng = random.Random(6)
    await ledger.credit("whale", 50)
    rows = [ledger.row(f"u-{rng.randrange(20_000)}", t + n // 3, contestant=rng.randrange(3))
            for n in range(66_000)]
    rows += [ledger.row("whale", t + 3 * n, vote_type="PAID", contestant=0) for n in range(100)]
    await ledger.write(rows)
    for _ in range(20):
        await finalizer.checkpoint(round_id)
    await ledger.credit("whale", 10)
    await _catch_up(finalizer, round_id)
    now = await ledger.now(stack)
    await ledger.write([ledger.row(f"u-{n}", now + n // 3) for n in range(1000)])
    await _finalize_and_compare(finalizer, ledger, now + 1000)
    chunks = await ledger.sql("SELECT count(*) FROM round_result_leaves WHERE round_id = %s",
                              round_id)
    assert chunks == [(2,)]


async def test_replicas_checkpointing_and_finalizing_at_once_store_one_equal_result(
        stack: Stack, database: str, finalizer: Finalizer, tmp_path: Path) -> None:
    """Three replicas extend one round's checkpoint at once while votes come, then all
    finalize it at once: one result, equal to the recount."""
    ledger = await _round(stack, database)
    round_id = ledger.round.round_id
    async with _replica(stack, database, tmp_path / "b") as second, _replica(
            stack, database, tmp_path / "c") as third:
        replicas = [finalizer, second, third]
        for wave in range(6):
            now = await ledger.now(stack)
            await ledger.write([ledger.row(f"w{wave}-{n}", now + n // 4, contestant=n % 3)
                                for n in range(700)])
            await asyncio.gather(*(replica.checkpoint(round_id) for replica in replicas))
        assert await _staleness(database, round_id) is None
        now = await ledger.now(stack)
        await ledger.close(now + 1000)
        expected = await _full_recount(finalizer, database, round_id)
        stored = await asyncio.gather(*(replica.finalize(round_id) for replica in replicas))
        assert sorted(stored) == [False, False, True]
    async with await psycopg.AsyncConnection.connect(database) as connection:
        assert await _stored(connection, round_id) == expected


async def test_credits_granted_to_more_voters_than_a_step_judges_rebuild_the_checkpoint(
        stack: Stack, database: str, finalizer: Finalizer) -> None:
    """A promotion crediting every voter at once: judging each one's rows again would put
    millions of voters in one statement; past a step's worth (RESULTS_CHECKPOINT_ROWS, 1,000
    here) the checkpoint is judged anew instead, and the result still equals the recount."""
    ledger = await _round(stack, database)
    round_id = ledger.round.round_id
    t = ledger.round.opens_at_ms
    await ledger.write([ledger.row(f"grant-{n}", t + n, contestant=n % 3, vote_type="PAID")
                        for n in range(1500)])
    await _catch_up(finalizer, round_id)
    await ledger.sql("INSERT INTO wallets (user_id, credited) SELECT 'grant-' || n, 1"
                     " FROM generate_series(0, 1199) AS n ON CONFLICT (user_id) DO UPDATE"
                     " SET credited = wallets.credited + 1")
    assert await _staleness(database, round_id) == (
        "credits or fraud rejections of over 1000 voters changed")
    assert await _staleness(database, round_id, rejudge_limit=1200) is None
    await _catch_up(finalizer, round_id)  # rebuilt, with the credits
    assert await _staleness(database, round_id) is None
    now = await ledger.now(stack)
    await _finalize_and_compare(finalizer, ledger, now + 1000)
    assert (await ledger.sql("SELECT total_votes FROM round_results WHERE round_id = %s",
                             round_id)) == [(1200,)]
