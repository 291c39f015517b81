"""The final result: judge the ledger by the round's rules, sign its Merkle digest, store it
once whatever the number of replicas, announce it, reconcile the live counters.

While a round is open its ledger is judged as it grows (`results_svc.checkpoint`), so at the
close only the last seconds of votes are judged; when there is no valid checkpoint the whole
ledger is recounted in SQL (`JUDGED_SQL`, the reference; both give the same result).

Any replica may checkpoint an open round or finalize a closed one. Work is not duplicated (a
session advisory lock per round: a checkpointer that does not get it moves on, a finalizer
waits for it, then sees the result another replica stored) and a result is never stored twice
(`round_results` is keyed by round; INSERT ... ON CONFLICT DO NOTHING). Announcing is retried
until sync_svc marks the round FINALIZED (PublishResultsReady is idempotent), so a replica that
dies between storing and announcing delays the announcement by one poll, never loses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc
from opentelemetry import metrics
from psycopg import AsyncConnection, IsolationLevel

from results_svc import checkpoint, rules, store
from results_svc.checkpoint import LEAVES_PER_CHUNK, judge_params
from results_svc.config import ResultsConfig
from results_svc.merkle import HASH_SIZE, MerkleTree, TopTree
from results_svc.rounds import RoundInfo, load_round
from results_svc.signing import Signer, tree_head
from runtime import keys, locks, mesh
from runtime.access import Principal, Role
from runtime.mesh import MeshTls
from runtime.storage import Storage, fetch_one
from televote.sync.v1 import show_internal_service_pb2 as internal
from televote.sync.v1 import show_internal_service_pb2_grpc as internal_grpc

log = logging.getLogger(__name__)
_meter = metrics.get_meter("results_svc")
_reconciliation = _meter.create_counter(
    "televote.results.reconciliation.difference", unit="{vote}",
    description="Votes by which the provisional live counters differed from the final result "
                "at close, by cause")
_finalized = _meter.create_counter("televote.results.finalized", unit="{round}",
                                   description="Final results stored by this replica, by path "
                                               "(checkpoint or full recount)")
_rebuilt = _meter.create_counter(
    "televote.results.checkpoint.rebuilt", unit="{checkpoint}",
    description="Round checkpoints found stale (a late ledger row, changed rules) and rebuilt")


@dataclass
class FinalResult:
    """A stored final result, as read back from PostgreSQL."""

    round_id: str
    ledger_votes: int
    invalidated_votes: int
    total_votes: int
    counts: dict[str, int]
    winner_ids: list[str]
    tree_size: int
    root_hash: bytes
    signed_tree_head: bytes
    signature: bytes
    key_id: str
    signed_at: datetime
    finalized_at: datetime
    reconciliation: dict[str, Any] = field(default_factory=dict)


async def read_final(connection: AsyncConnection[Any], round_id: str) -> FinalResult | None:
    row = await fetch_one(connection, store.FINAL_RESULT, (round_id,))
    if row is None:
        return None
    return FinalResult(
        row["round_id"], row["ledger_votes"], row["invalidated_votes"], row["total_votes"],
        {k: int(v) for k, v in row["counts"].items()}, list(row["winner_ids"]),
        row["tree_size"], bytes(row["root_hash"]), bytes(row["signed_tree_head"]),
        bytes(row["signature"]), row["key_id"], row["signed_at"], row["finalized_at"],
        row["reconciliation"])


async def provisional_counts(storage: Storage, round_id: str) -> dict[str, int]:
    """The live counters of a round, summed over the shards."""
    async with storage.redis.pipeline(transaction=False) as pipe:
        for shard in range(keys.SHARDS):
            pipe.hgetall(keys.live_key(shard, round_id))
        replies = await pipe.execute()
    totals: dict[str, int] = {}
    for reply in replies:
        for contestant, votes in reply.items():
            name = contestant.decode() if isinstance(contestant, bytes) else contestant
            totals[name] = totals.get(name, 0) + int(votes)
    return totals


class Finalizer:
    """Finds closed rounds and finalizes them (the proofs of a stored result: proofs.py)."""

    def __init__(self, storage: Storage, config: ResultsConfig, signer: Signer) -> None:
        self._storage = storage
        self._config = config
        self._signer = signer
        self._task: asyncio.Task[None] | None = None
        self._channel: grpc.aio.Channel | None = None
        #: round -> (failures, next attempt by the monotonic clock) of announcements
        self._announce_backoff: dict[str, tuple[int, float]] = {}
        #: round -> when (monotonic) its checkpoint is next extended
        self._checkpoint_due: dict[str, float] = {}
        #: when (monotonic) finished checkpoints and old log entries are next removed
        self._tidy_due = 0.0
        self.wake = asyncio.Event()

    async def start(self) -> None:
        await self.register_key()
        self._channel = mesh.channel(self._config.sync_target, "sync_svc",
                                     MeshTls.of(self._config.televote_tls_dir))
        self._task = asyncio.create_task(self._run(), name="finalizer")

    async def register_key(self) -> None:
        """Publish the signing key (results name the key that signed them)."""
        async with self._storage.pool.connection() as connection:
            await connection.execute(
                store.INSERT_LEDGER_KEY,
                (self._signer.key_id, self._signer.public_key, self._signer.created_at))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._channel is not None:
            await self._channel.close(None)

    async def _run(self) -> None:
        while True:
            try:
                await self.pass_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("finalizer pass failed")
            self.wake.clear()
            wait_ms = self._config.results_poll_ms
            if self._checkpoint_due and self._config.results_checkpoint_ms:
                wait_ms = min(wait_ms, self._config.results_checkpoint_ms)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), wait_ms / 1000)

    async def pass_once(self) -> None:
        """Finalize every closed round whose votes have settled; announce stored results;
        extend the checkpoints of the other rounds taking votes."""
        async with self._storage.pool.connection() as connection:
            cursor = await connection.execute(
                store.ROUNDS_TO_FINALIZE)
            rows: list[Any] = await cursor.fetchall()
        if not rows:
            return
        now_ms = await keys.server_time_ms(self._storage.redis)
        taking_votes = []
        for row in rows:
            if row["state"] == "OPEN":
                taking_votes.append(row["round_id"])
                continue
            if row["stored"]:
                _, due = self._announce_backoff.get(row["round_id"], (0, 0.0))
                if time.monotonic() >= due:
                    await self.announce(row["round_id"])
                continue
            # Votes the edge received before the close may still be admitted for the round's
            # receive lag after it (migrations/0018); then their batches commit (settle).
            age = now_ms - row["closed_ms"] - row["receive_lag_ms"]
            if age < self._config.results_settle_ms or (
                    age < self._config.results_settle_max_ms
                    and not await self._counters_settled(row["round_id"])):
                taking_votes.append(row["round_id"])  # its last batches are committing
                continue
            if await self.finalize(row["round_id"]):
                await self.announce(row["round_id"])
                self._tidy_due = 0.0
        if self._config.results_checkpoint_ms:
            for round_id in taking_votes:
                if time.monotonic() >= self._checkpoint_due.get(round_id, 0.0):
                    caught_up = await self.checkpoint(round_id)
                    self._checkpoint_due[round_id] = time.monotonic() + (
                        self._config.results_checkpoint_ms / 1000 if caught_up else 0)
            self._checkpoint_due = {r: due for r, due in self._checkpoint_due.items()
                                    if r in taking_votes}
        if time.monotonic() >= self._tidy_due:
            async with self._storage.pool.connection() as connection:
                await checkpoint.tidy(connection)
            self._tidy_due = time.monotonic() + 60

    async def checkpoint(self, round_id: str) -> bool:
        """Extend the round's checkpoint by one step towards the watermark (a stale one is
        rebuilt); True when it reached the watermark (or another replica is at it)."""
        watermark = await self._watermark()
        async with self._storage.pool.connection() as connection, locks.round_results_session(
                connection, round_id, wait=False) as mine:
            if not mine:
                return True
            await connection.set_isolation_level(IsolationLevel.REPEATABLE_READ)
            try:
                async with connection.transaction():
                    if await read_final(connection, round_id) is not None:
                        return True
                    info = await load_round(connection, round_id)
                    if (info is None or info.state not in ("OPEN", "CLOSED")
                            or info.opens_ms is None or info.closes_ms is None):
                        return True
                    state = await checkpoint.load(connection, round_id)
                    why = None if state is None else await checkpoint.staleness(
                        connection, info, state, self._config.results_checkpoint_rows)
                    if why is not None:
                        log.warning("round checkpoint rebuilt", extra={"fields": {
                            "round_id": round_id, "why": why}})
                        _rebuilt.add(1)
                        await checkpoint.discard(connection, round_id)
                    if state is None or why is not None:
                        state = checkpoint.Checkpoint(
                            round_id, self._config.results_receipt_block_leaves)
                    return await checkpoint.advance(connection, info, state, watermark,
                                                    self._config.results_checkpoint_rows)
            finally:
                await connection.set_isolation_level(None)

    async def _watermark(self) -> int:
        """A time (ms, Redis clock) below which every admitted vote has settled: before the
        oldest admission still waiting for its ledger commit (the shards' pending sets,
        runtime.keys.pending_key; every admission is listed there, atomically with its
        `admitted_ms`, until its batch committed or was undone), and before now. Read before
        the checkpoint's snapshot is taken, so a vote below it that is not in the snapshot
        committed after its admission was settled: a fault that staleness() detects."""
        redis = self._storage.redis
        # Now first, then the pending sets (a cluster pipeline cannot carry TIME, which
        # belongs to no slot).
        oldest = await keys.server_time_ms(redis)
        async with redis.pipeline(transaction=False) as pipe:
            for shard in range(keys.SHARDS):
                pipe.zrange(keys.pending_key(shard), 0, -1)
            pending = await pipe.execute()
        for members in pending:
            for member in members:
                with contextlib.suppress(ValueError):  # malformed: the reconciler's to drop
                    oldest = min(oldest, keys.parse_pending(member).admitted_ms)
        return oldest - self._config.results_checkpoint_lag_ms

    async def _counters_settled(self, round_id: str) -> bool:
        live = await provisional_counts(self._storage, round_id)
        async with self._storage.pool.connection() as connection:
            # vote_svc bumps round_tallies in the transaction that writes the ledger rows: the
            # ledger's totals without reading the ledger.
            cursor = await connection.execute(
                store.TALLIES, (round_id,))
            ledger = {r["contestant_id"]: r["n"] for r in await cursor.fetchall()}
        return {k: v for k, v in live.items() if v} == {k: v for k, v in ledger.items() if v}

    async def finalize(self, round_id: str) -> bool:
        """Judge the rest of the ledger (or recount it all), sign and store the round's
        result; False if another replica has it."""
        started = time.monotonic()
        provisional = await provisional_counts(self._storage, round_id)
        async with self._storage.pool.connection() as connection, locks.round_results_session(
                connection, round_id, wait=True):
            await connection.set_isolation_level(IsolationLevel.REPEATABLE_READ)
            try:
                async with connection.transaction():
                    stored = await self._finalize_in(connection, round_id, provisional)
            finally:
                await connection.set_isolation_level(None)
        if stored:
            log.info("final result committed", extra={"fields": {
                "round_id": round_id, "ms": round((time.monotonic() - started) * 1000)}})
        return stored

    async def _finalize_in(self, connection: AsyncConnection[Any], round_id: str,
                           provisional: dict[str, int]) -> bool:
        if await read_final(connection, round_id) is not None:
            return False
        info = await load_round(connection, round_id)
        if info is None or info.state != "CLOSED" or info.opens_ms is None:
            return False
        state = await checkpoint.load(connection, round_id)
        why = "no checkpoint" if state is None else await checkpoint.staleness(
            connection, info, state, self._config.results_checkpoint_rows)
        if state is not None and why is None:
            started, judged_from = time.monotonic(), state.tree_size
            while not await checkpoint.advance(connection, info, state, checkpoint.AFTER_ALL,
                                               self._config.results_checkpoint_rows):
                pass
            log.info("checkpoint extended to the end of the ledger", extra={"fields": {
                "round_id": round_id, "rows": state.tree_size - judged_from,
                "ms": round((time.monotonic() - started) * 1000)}})
            tree = await checkpoint.finish(connection, state)
            cursor = await connection.execute(
                store.INVALID_REASON_COUNTS, (round_id,))
            reasons = {row["reason"]: row["n"] for row in await cursor.fetchall()}
            if not await self._store(connection, info, provisional, state.ledger, state.counts,
                                     reasons, tree.size, tree.root):
                return False
            await connection.execute(
                store.INSERT_BLOCK_ROOTS,
                (round_id, state.block_leaves, b"".join(tree.block_roots)))
            await connection.execute(store.COPY_INVALID_VOTES, (round_id,))
            _finalized.add(1, {"path": "checkpoint"})  # its checkpoint goes later: tidy()
            return True
        log.warning("final result by full recount", extra={"fields": {
            "round_id": round_id, "why": why}})
        await checkpoint.discard(connection, round_id)
        return await self.recount_in(connection, info, provisional)

    async def _store(self, connection: AsyncConnection[Any], info: RoundInfo,
                     provisional: dict[str, int], ledger: dict[str, int],
                     counts: dict[str, int], reasons: dict[str, int], tree_size: int,
                     root: bytes) -> bool:
        """Sign and insert the result row; False if one is there already."""
        round_id = info.round_id
        counts = {c: counts.get(c, 0) for c in info.contestant_ids}
        ledger = {c: n for c, n in ledger.items() if n}
        ledger_votes = sum(ledger.values())
        total = sum(counts.values())
        now = datetime.now(UTC)
        signed_at = now.replace(microsecond=now.microsecond // 1000 * 1000)
        head = tree_head(round_id, tree_size, root, signed_at)
        reconciliation = reconcile(round_id, provisional, ledger, counts, reasons)
        cursor = await connection.execute(
            store.INSERT_RESULT,
            (round_id, ledger_votes, ledger_votes - total, total, json.dumps(counts),
             rules.winners(counts), tree_size, root, head, self._signer.sign(head),
             self._signer.key_id, signed_at, json.dumps(reconciliation),
             f"results_svc/{self._config.televote_replica}"))
        if await cursor.fetchone() is None:
            return False
        log.info("final result stored", extra={"fields": {
            "round_id": round_id, "total_votes": total, "ledger_votes": ledger_votes,
            "tree_size": tree_size, "root_hash": root.hex()}})
        return True

    async def recount_in(self, connection: AsyncConnection[Any], info: RoundInfo,
                          provisional: dict[str, int]) -> bool:
        """The reference path: judge the whole round's ledger at once (store.JUDGED_SQL)."""
        round_id = info.round_id
        params = judge_params(info)
        # The ledger is judged once, into a temporary table numbered in tree order; what the
        # result needs is then read from it by PostgreSQL (totals, reasons, the leaves as one
        # blob per chunk) instead of fetching every judged row into Python.
        await connection.execute(
            store.CREATE_JUDGED, params)
        cursor = await connection.execute(
            store.JUDGED_COUNTS)
        counts = dict.fromkeys(info.contestant_ids, 0)
        ledger_by_contestant: dict[str, int] = {}
        for row in await cursor.fetchall():
            ledger_by_contestant[row["contestant_id"]] = row["ledger"]
            if row["contestant_id"] in counts:
                counts[row["contestant_id"]] = row["counted"] or 0
        cursor = await connection.execute(
            store.JUDGED_REASON_COUNTS)
        reasons = {row["reason"]: row["n"] for row in await cursor.fetchall()}
        cursor = await connection.execute(
            store.JUDGED_LEAF_CHUNKS, (LEAVES_PER_CHUNK,))
        chunks = [bytes(row["leaves"]) for row in await cursor.fetchall()]
        blob = b"".join(chunks)
        leaves = [blob[i:i + HASH_SIZE] for i in range(0, len(blob), HASH_SIZE)]
        del blob
        tree = MerkleTree(leaves)
        if not await self._store(connection, info, provisional, ledger_by_contestant, counts,
                                 reasons, tree.size, tree.root):
            return False
        async with connection.cursor() as cur:
            await cur.executemany(
                store.INSERT_LEAF_CHUNK,
                [(round_id, n, chunk) for n, chunk in enumerate(chunks)])
            # Receipts find their leaf through these: the first leaf of every block of
            # leaves (by ledger order) and each block's subtree root (merkle.TopTree).
            block_leaves = self._config.results_receipt_block_leaves
            await cur.execute(
                store.INSERT_JUDGED_BLOCKS, (round_id, block_leaves, block_leaves))
            await cur.execute(
                store.INSERT_BLOCK_ROOTS,
                (round_id, block_leaves, b"".join(TopTree.block_roots_of(tree, block_leaves))))
            if reasons:  # a duplicate's first copy may be invalid too: its first reason
                await cur.execute(
                    store.INSERT_JUDGED_INVALID_VOTES, (round_id,))
        _finalized.add(1, {"path": "recount"})
        return True

    async def announce(self, round_id: str) -> None:
        assert self._channel is not None
        stub = internal_grpc.ShowInternalServiceStub(self._channel)
        try:
            await stub.PublishResultsReady(
                internal.PublishResultsReadyRequest(round_id=round_id),
                metadata=Principal(Role.INTERNAL, "results_svc").to_metadata(), timeout=5)
        except grpc.aio.AioRpcError as error:
            failures = self._announce_backoff.get(round_id, (0, 0.0))[0] + 1
            delay = min(60.0, 0.5 * 2 ** failures)
            self._announce_backoff[round_id] = (failures, time.monotonic() + delay)
            log.warning("PublishResultsReady(%s) failed, retrying in %.0f s: %s", round_id,
                        delay, error.code().name)
        else:
            self._announce_backoff.pop(round_id, None)


def reconcile(round_id: str, provisional: dict[str, int], ledger: dict[str, int],
              counted: dict[str, int], reasons: dict[str, int]) -> dict[str, Any]:
    """Compare the live counters at close with the ledger and the final result; log and
    measure every difference with its cause.

    Causes: `counter_drift` (live counters against ledger rows: an admission undone in the
    ledger but not in Redis, a Redis loss or rebuild) and `invalidated` (ledger rows the rules
    did not count: fraud rejections, window, caps), broken down by reason in the log."""
    differences = []
    for contestant in sorted(set(provisional) | set(ledger) | set(counted)):
        live = provisional.get(contestant, 0)
        in_ledger = ledger.get(contestant, 0)
        final = counted.get(contestant, 0)
        if live == final:
            continue
        entry = {"contestant_id": contestant, "provisional": live, "ledger": in_ledger,
                 "final": final, "counter_drift": live - in_ledger,
                 "invalidated": in_ledger - final}
        differences.append(entry)
        if live != in_ledger:
            _reconciliation.add(abs(live - in_ledger), {"cause": "counter_drift"})
        if in_ledger != final:
            _reconciliation.add(in_ledger - final, {"cause": "invalidated"})
    if differences:
        log.warning("live counters differ from the final result", extra={"fields": {
            "round_id": round_id, "differences": differences,
            "invalidated_rows_by_reason": reasons}})
    return {"provisional": provisional, "ledger": ledger, "final": counted,
            "differences": differences, "invalidated_rows_by_reason": reasons}
