"""Group commit of admitted votes into the PostgreSQL ledger.

Admitted votes queue in-process; a batch is written when it holds `batch_max` votes or its
oldest vote has waited `interval`, in ONE transaction: COPY into `votes`, then the per-round
tallies, free-vote usage and wallet spends (aggregated, in key order so concurrent batches of
several replicas cannot deadlock). Only then is the batch's Redis state settled (pending
idempotency records become committed) and its callers answered.

If the transaction fails on a constraint (a request id already in the ledger after a Redis
loss or an ambiguous commit; a quota or balance CHECK that the Redis cache got wrong), the batch
is retried one vote per transaction so that one bad vote does not fail the others. Any other
failure (PostgreSQL down, timeout) fails the whole batch: its admissions are undone in Redis
and its callers get UNAVAILABLE; a retry with the same request id can never count twice
because the ledger is unique on (user_id, request_id).
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from runtime.storage import RedisClient
from vote_svc.admission import RATE_WINDOW_MS, Outcome, Scripts, VoteKeys

log = logging.getLogger(__name__)

COLUMNS = ("vote_id", "request_id", "user_id", "shard", "round_id", "episode_id",
           "contestant_id", "vote_type", "count", "channel", "admitted_ms", "admitted_at",
           "fraud_action", "fraud_score", "fraud_decision_id", "ip", "device_id", "app_version",
           "latitude", "longitude", "received_at", "fingerprint", "leaf_data", "receipt_hash")
_COPY = f"COPY votes ({', '.join(COLUMNS)}) FROM STDIN"
_INSERT_ONE = (f"INSERT INTO votes ({', '.join(COLUMNS)}) VALUES "
               f"({', '.join(['%s'] * len(COLUMNS))}) "
               "ON CONFLICT (user_id, request_id) DO NOTHING RETURNING vote_id")
_TALLIES = """
INSERT INTO round_tallies (round_id, contestant_id, vote_type, channel, votes)
SELECT * FROM unnest(%s::uuid[], %s::uuid[], %s::text[], %s::text[], %s::bigint[])
ORDER BY 1, 2, 3, 4
ON CONFLICT (round_id, contestant_id, vote_type, channel)
DO UPDATE SET votes = round_tallies.votes + excluded.votes
"""
_FREE = """
INSERT INTO free_vote_usage (user_id, episode_id, used, quota)
SELECT u.user_id, u.episode_id, u.used, e.free_vote_quota
  FROM unnest(%s::text[], %s::uuid[], %s::int[]) AS u(user_id, episode_id, used)
  JOIN episodes e USING (episode_id)
ORDER BY 1, 2
ON CONFLICT (user_id, episode_id) DO UPDATE SET used = free_vote_usage.used + excluded.used
"""
# Lock the wallets in key order first (no deadlock between batches), then spend. A user with
# no wallet row has no credits: that is an overspend too.
_LOCK_WALLETS = "SELECT user_id FROM wallets WHERE user_id = ANY(%s) ORDER BY user_id FOR UPDATE"
_SPENT = """
UPDATE wallets w SET spent = w.spent + s.spent
  FROM unnest(%s::text[], %s::bigint[]) AS s(user_id, spent)
 WHERE w.user_id = s.user_id
"""


class OverspentError(Exception):
    """A paid vote of a user without any wallet credits."""
_EXISTING = ("SELECT vote_id::text, fingerprint, admitted_ms, leaf_data, receipt_hash,"
             "       episode_id::text FROM votes WHERE user_id = %s AND request_id = %s")


@dataclass
class LedgerVote:
    """One admitted vote on its way to the ledger."""

    vote_id: str
    request_id: str
    user_id: str
    round_id: str
    episode_id: str
    contestant_id: str
    vote_type: str
    count: int
    channel: str
    admitted_ms: int
    fraud_action: str
    fraud_score: float | None
    fraud_decision_id: str
    ip: str
    device_id: str
    app_version: str
    latitude: float | None
    longitude: float | None
    received_at: datetime | None
    fingerprint: str
    leaf_data: bytes
    receipt_hash: bytes
    keys: VoteKeys
    outcome: Outcome
    #: This admission's entry in its shard's pending set, removed when it is settled.
    pending_member: str = ""

    def row(self) -> tuple[Any, ...]:
        return (self.vote_id, self.request_id, self.user_id, self.keys.shard, self.round_id,
                self.episode_id, self.contestant_id, self.vote_type, self.count, self.channel,
                self.admitted_ms, datetime.fromtimestamp(self.admitted_ms / 1000, UTC),
                self.fraud_action, self.fraud_score, self.fraud_decision_id, self.ip,
                self.device_id, self.app_version, self.latitude, self.longitude,
                self.received_at, bytes.fromhex(self.fingerprint), self.leaf_data,
                self.receipt_hash)


@dataclass(frozen=True)
class ExistingVote:
    """A vote already in the ledger under the same (user_id, request_id)."""

    vote_id: str
    fingerprint: str
    admitted_ms: int
    receipt_hash: bytes
    episode_id: str


@dataclass
class CommitResult:
    """committed | existing (already in the ledger) | quota (a CHECK refused it) | failed."""

    kind: str
    existing: ExistingVote | None = None
    constraint: str = ""


@dataclass
class _Queued:
    vote: LedgerVote
    future: asyncio.Future[CommitResult]
    enqueued: float = field(default=0.0)


class Ledger:
    """The group-commit writer of one vote_svc process."""

    def __init__(self, pool: AsyncConnectionPool[AsyncConnection[dict[str, Any]]],
                 redis: RedisClient, scripts: Scripts, *, batch_max: int, interval_ms: float,
                 inflight: int, timeout_ms: float, idempotency_ttl_ms: int) -> None:
        self._pool = pool
        self._redis = redis
        self._scripts = scripts
        self._batch_max = batch_max
        self._interval = interval_ms / 1000
        self._timeout = timeout_ms / 1000
        self._ttl_ms = idempotency_ttl_ms
        self._slots = asyncio.Semaphore(inflight)
        self._queue: list[_Queued] = []
        self._wake = asyncio.Event()
        self._full = asyncio.Event()
        self._closing = False
        self._runner: asyncio.Task[None] | None = None
        self._writers: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._runner = asyncio.get_running_loop().create_task(self._run())

    def submit(self, vote: LedgerVote) -> asyncio.Future[CommitResult]:
        """Queue an admitted vote; the future resolves once its batch is settled."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[CommitResult] = loop.create_future()
        if self._closing or self._runner is None:
            future.set_result(CommitResult("failed"))
            return future
        self._queue.append(_Queued(vote, future, loop.time()))
        if len(self._queue) >= self._batch_max:
            self._full.set()
        self._wake.set()
        return future

    async def close(self) -> None:
        """Write everything queued, wait for batches in flight, stop (SIGTERM path)."""
        self._closing = True
        self._wake.set()
        self._full.set()
        if self._runner is not None:
            await self._runner
        if self._writers:
            await asyncio.gather(*self._writers, return_exceptions=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            delay = self._queue[0].enqueued + self._interval - loop.time()
            if len(self._queue) < self._batch_max and delay > 0 and not self._closing:
                self._full.clear()
                try:
                    await asyncio.wait_for(self._full.wait(), delay)
                except TimeoutError:
                    pass
            await self._slots.acquire()
            batch = self._queue[:self._batch_max]
            del self._queue[:self._batch_max]
            task = loop.create_task(self._write(batch))
            self._writers.add(task)
            task.add_done_callback(self._writers.discard)

    async def _write(self, batch: list[_Queued]) -> None:
        try:
            votes = [queued.vote for queued in batch]
            try:
                await asyncio.wait_for(self._commit_batch(votes), self._timeout)
                results = [CommitResult("committed")] * len(votes)
            except (psycopg.errors.IntegrityError, psycopg.errors.DeadlockDetected,
                    psycopg.errors.SerializationFailure, OverspentError):
                results = await self._commit_one_by_one(votes)
            except Exception as error:  # PostgreSQL down, timeout, pool exhausted ...
                log.warning("ledger batch of %d failed: %r", len(votes), error)
                results = [CommitResult("failed")] * len(votes)
            await self._settle_redis(votes, results)
            for queued, result in zip(batch, results, strict=True):
                if not queued.future.done():
                    queued.future.set_result(result)
        except BaseException:
            for queued in batch:
                if not queued.future.done():
                    queued.future.set_result(CommitResult("failed"))
            raise
        finally:
            self._slots.release()

    async def _commit_batch(self, votes: list[LedgerVote]) -> None:
        async with self._pool.connection(timeout=self._timeout) as connection:
            async with connection.transaction():
                async with connection.cursor() as cursor:
                    async with cursor.copy(_COPY) as copy:
                        for vote in votes:
                            await copy.write_row(vote.row())
                    await _apply_totals(cursor, votes)

    async def _commit_one_by_one(self, votes: list[LedgerVote]) -> list[CommitResult]:
        results = []
        for vote in votes:
            try:
                results.append(await asyncio.wait_for(self._commit_single(vote), self._timeout))
            except Exception as error:
                log.warning("ledger write of vote %s failed: %r", vote.vote_id, error)
                results.append(CommitResult("failed"))
        return results

    async def _commit_single(self, vote: LedgerVote) -> CommitResult:
        async with self._pool.connection(timeout=self._timeout) as connection:
            try:
                async with connection.transaction():
                    async with connection.cursor() as cursor:
                        await cursor.execute(_INSERT_ONE, vote.row())
                        if await cursor.fetchone() is None:
                            await cursor.execute(_EXISTING, (vote.user_id, vote.request_id))
                            row = await cursor.fetchone()
                            assert row is not None
                            return CommitResult("existing", ExistingVote(
                                row["vote_id"], bytes(row["fingerprint"]).hex(),
                                row["admitted_ms"], bytes(row["receipt_hash"]),
                                row["episode_id"]))
                        await _apply_totals(cursor, [vote])
            except psycopg.errors.CheckViolation as error:
                return CommitResult("quota", constraint=error.diag.constraint_name or "")
            except OverspentError:
                return CommitResult("quota", constraint="wallet_not_overspent")
        return CommitResult("committed")

    async def _settle_redis(self, votes: list[LedgerVote], results: list[CommitResult]) -> None:
        """Committed: pending record -> committed. Anything else: undo the admission."""
        calls = []
        for vote, result in zip(votes, results, strict=True):
            done_keys = [vote.keys.idempotency, vote.keys.pending]
            if result.kind == "committed":
                calls.append(self._scripts.call(self._scripts.done, done_keys,
                                                [vote.vote_id, self._ttl_ms, "",
                                                 vote.pending_member]))
                continue
            first = result.existing
            if first is not None:
                record = Outcome("D", first.fingerprint, first.vote_id, first.admitted_ms, 0,
                                 vote.outcome.free_left, vote.outcome.paid_balance,
                                 first.episode_id).encode()
                if first.fingerprint == vote.fingerprint:
                    # The same vote is already in the ledger (its first commit looked failed
                    # and was undone, or Redis lost it): this admission's charge stands for it,
                    # so Redis is exact (or, after a Redis loss, stricter by one), never looser.
                    calls.append(self._scripts.call(self._scripts.done, done_keys,
                                                    [vote.vote_id, self._ttl_ms, record,
                                                     vote.pending_member]))
                    continue
            calls.append(self._scripts.call(
                self._scripts.undo, [*vote.keys.undo_keys(), vote.keys.pending], [
                    vote.vote_id, vote.vote_type, vote.count, vote.contestant_id,
                    vote.episode_id, vote.admitted_ms, RATE_WINDOW_MS, vote.round_id,
                    vote.pending_member]))
            if first is not None:  # another vote under this request id: remember that one
                calls.append(self._scripts.call(self._scripts.done, [vote.keys.idempotency],
                                                ["", self._ttl_ms, record]))
        try:
            # One shared pipeline, in order: an undo runs before the record that replaces it.
            await asyncio.gather(*calls)
        except Exception as error:
            # Committed votes stay acknowledged (the ledger is the truth; a pending record
            # whose lease runs out is resolved from the ledger). An undo that did not happen
            # leaves Redis stricter than the ledger, never looser.
            log.warning("settling %d votes in Redis failed: %r", len(votes), error)


async def _apply_totals(cursor: psycopg.AsyncCursor[Any], votes: list[LedgerVote]) -> None:
    tallies: dict[tuple[str, str, str, str], int] = defaultdict(int)
    free: dict[tuple[str, str], int] = defaultdict(int)
    spent: dict[str, int] = defaultdict(int)
    for vote in votes:
        tallies[(vote.round_id, vote.contestant_id, vote.vote_type, vote.channel)] += vote.count
        if vote.vote_type == "FREE":
            free[(vote.user_id, vote.episode_id)] += vote.count
        elif vote.vote_type == "PAID":
            spent[vote.user_id] += vote.count
    keys = sorted(tallies)
    await cursor.execute(_TALLIES, ([k[0] for k in keys], [k[1] for k in keys],
                                    [k[2] for k in keys], [k[3] for k in keys],
                                    [tallies[k] for k in keys]))
    if free:
        pairs = sorted(free)
        await cursor.execute(_FREE, ([p[0] for p in pairs], [p[1] for p in pairs],
                                     [free[p] for p in pairs]))
    if spent:
        users = sorted(spent)
        await cursor.execute(_LOCK_WALLETS, (users,))
        if len(await cursor.fetchall()) != len(users):
            raise OverspentError()
        await cursor.execute(_SPENT, (users, [spent[u] for u in users]))
