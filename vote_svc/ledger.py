"""Group commit of admitted votes into the PostgreSQL ledger.

Admitted votes queue in-process; a batch is written when it holds `batch_max` votes or its
oldest vote has waited `interval`, in ONE statement (its own transaction): the rows into
`votes`, and the per-round tallies, free-vote usage and wallet spends summed from them (in key
order so concurrent batches of several replicas cannot deadlock). Only then are its callers
answered, and its Redis state settled (pending idempotency records become committed).

A request id already in the ledger (after a Redis loss or an ambiguous commit) is skipped and
its caller gets the ledger's original vote. If the statement fails on a constraint (a quota or
balance CHECK that the Redis cache got wrong), the batch is retried one vote per transaction so
that one bad vote does not fail the others. Any other
failure (PostgreSQL down, timeout) fails the whole batch: its admissions are undone in Redis
and its callers get UNAVAILABLE; a retry with the same request id can never count twice
because the ledger is unique on (user_id, request_id).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
import psycopg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from runtime.storage import RedisClient
from vote_svc import store
from vote_svc.admission import RATE_WINDOW_MS, Outcome, Scripts, VoteKeys

log = logging.getLogger(__name__)

#: How long a committed vote's settlement in Redis may wait for a pipeline to ride along with
#: (far under the admission lease, `vote_lease_ms`).
_SETTLE_WAIT_MS = 5.0


def batch_rows(votes: list[LedgerVote]) -> str:
    """WRITE_BATCH's parameter: the rows as one JSON array (orjson: the standard encoder took
    ~7 µs a vote, a tenth of vote_svc's CPU per vote of a gateway batch)."""
    return orjson.dumps([vote.record() for vote in votes]).decode()


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
    #: The keyed hash of the voter's IP (never the address).
    ip_hash: str
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
    #: The time the admission script judged the window by (`results_svc.rules.judged_ms`).
    received_ms: int | None = None
    #: Where the IP is (vote_svc.geo: "KH-12", "FR"), None if unknown.
    ip_geo: str | None = None

    def record(self) -> dict[str, Any]:
        """The ledger row (store.COLUMNS) as JSON values; bytea as PostgreSQL's hex text."""
        return {
            "vote_id": self.vote_id, "request_id": self.request_id, "user_id": self.user_id,
            "shard": self.keys.shard, "round_id": self.round_id, "episode_id": self.episode_id,
            "contestant_id": self.contestant_id, "vote_type": self.vote_type,
            "count": self.count, "channel": self.channel, "admitted_ms": self.admitted_ms,
            "fraud_action": self.fraud_action, "fraud_score": self.fraud_score,
            "fraud_decision_id": self.fraud_decision_id, "ip_hash": self.ip_hash,
            "device_id": self.device_id, "app_version": self.app_version,
            "latitude": self.latitude, "longitude": self.longitude,
            "received_at": None if self.received_at is None else self.received_at.isoformat(),
            "fingerprint": "\\x" + self.fingerprint, "leaf_data": "\\x" + self.leaf_data.hex(),
            "receipt_hash": "\\x" + self.receipt_hash.hex(), "received_ms": self.received_ms,
            "ip_geo": self.ip_geo}


@dataclass(frozen=True)
class ExistingVote:
    """A vote already in the ledger under the same (user_id, request_id)."""

    vote_id: str
    fingerprint: str
    admitted_ms: int
    receipt_hash: bytes
    episode_id: str
    #: The judged time its leaf records (None for a leaf older than that field).
    judged_ms: int | None = None


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
                    async with asyncio.timeout(delay):  # no task per wait, as wait_for makes
                        await self._full.wait()
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
                results = await asyncio.wait_for(self._commit(votes), self._timeout)
            except (psycopg.errors.IntegrityError, psycopg.errors.DeadlockDetected,
                    psycopg.errors.SerializationFailure):
                results = await self._commit_one_by_one(votes)
            except Exception as error:  # PostgreSQL down, timeout, pool exhausted ...
                log.warning("ledger batch of %d failed: %r", len(votes), error)
                results = [CommitResult("failed")] * len(votes)
            finally:
                # The slot is for the statement (its connection is back in the pool): the
                # next batch need not wait for this one's settlement in Redis, which waits
                # for an admissions' pipeline to ride along with.
                self._slots.release()
            # A committed vote is answered now: its pending record in Redis only has to
            # become committed before its lease runs out (until then a retry of it waits;
            # after, it is resolved from the ledger), so its settlement rides along with
            # the next admissions' pipeline instead of costing a round trip of its own. Any
            # other vote is answered once its admission is undone (its retry is admitted).
            for queued, result in zip(batch, results, strict=True):
                if result.kind == "committed" and not queued.future.done():
                    queued.future.set_result(result)
            await self._settle_redis(votes, results)
            for queued, result in zip(batch, results, strict=True):
                if not queued.future.done():
                    queued.future.set_result(result)
        except BaseException:
            for queued in batch:
                if not queued.future.done():
                    queued.future.set_result(CommitResult("failed"))
            raise

    async def _commit(self, votes: list[LedgerVote]) -> list[CommitResult]:
        """Write `votes` in one transaction: committed, or (request id already in the
        ledger) existing. Raises what PostgreSQL raised, and then nothing was written."""
        rows = batch_rows(votes)  # before taking a connection, which others may be waiting for
        async with self._pool.connection(timeout=self._timeout) as connection:
            await connection.set_autocommit(True)  # the statement is its own transaction
            try:
                cursor = await connection.execute(store.WRITE_BATCH, (rows,))
                row = await cursor.fetchone()
                assert row is not None
                # Some request ids were in the ledger already: which ones, and their votes.
                ledger = (await _ledger_votes(connection, votes)
                          if row["inserted"] < len(votes) else None)
            finally:
                if not connection.broken:
                    await connection.set_autocommit(False)
        committed = CommitResult("committed")
        if ledger is None:
            return [committed] * len(votes)
        results = []
        for vote in votes:
            found = ledger.get((vote.user_id, vote.request_id))
            results.append(CommitResult("failed") if found is None else
                           committed if found.vote_id == vote.vote_id else
                           CommitResult("existing", found))
        return results

    async def _commit_one_by_one(self, votes: list[LedgerVote]) -> list[CommitResult]:
        """After a batch failed on a constraint: one transaction per vote, so that only the
        vote a quota or balance CHECK refuses is refused."""
        results = []
        for vote in votes:
            try:
                (result,) = await asyncio.wait_for(self._commit([vote]), self._timeout)
            except psycopg.errors.CheckViolation as error:
                result = CommitResult("quota", constraint=error.diag.constraint_name or "")
            except Exception as error:
                log.warning("ledger write of vote %s failed: %r", vote.vote_id, error)
                result = CommitResult("failed")
            results.append(result)
        return results

    async def _settle_redis(self, votes: list[LedgerVote], results: list[CommitResult]) -> None:
        """Committed: pending record -> committed. Anything else: undo the admission."""
        calls = []
        for vote, result in zip(votes, results, strict=True):
            done_keys = [vote.keys.idempotency, vote.keys.pending]
            if result.kind == "committed":
                calls.append(self._scripts.call(self._scripts.done, done_keys,
                                                [vote.vote_id, self._ttl_ms, "",
                                                 vote.pending_member], wait_ms=_SETTLE_WAIT_MS))
                continue
            first = result.existing
            if first is not None:
                record = Outcome("D", first.fingerprint, first.vote_id, first.admitted_ms, 0,
                                 vote.outcome.free_left, vote.outcome.paid_balance,
                                 first.episode_id, first.judged_ms).encode()
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


async def _ledger_votes(connection: AsyncConnection[Any], votes: list[LedgerVote],
                        ) -> dict[tuple[str, str], ExistingVote]:
    """The ledger's votes under the (user_id, request_id) of `votes`."""
    cursor = await connection.execute(store.EXISTING_VOTES, ([vote.user_id for vote in votes],
                                                  [vote.request_id for vote in votes]))
    # The judged time is read from the leaf, not the column: a leaf written before leaves
    # carried it has none, and a replayed receipt must hash to the leaf as it was signed.
    return {(row["user_id"], row["request_id"]): ExistingVote(
        row["vote_id"], bytes(row["fingerprint"]).hex(), row["admitted_ms"],
        bytes(row["receipt_hash"]), row["episode_id"],
        json.loads(bytes(row["leaf_data"])).get("received_ms"))
        for row in await cursor.fetchall()}
