"""Undo the Redis charge of admissions whose replica died before committing them.

An admitted vote holds its voter's free quota or paid balance (and the rate window and live
counters) in Redis from the admission until its ledger batch settles. If the replica is
killed in between and the client never retries, nothing else would ever give that charge
back: the cache stays stricter than the ledger for good.

The admission script lists each admission in its shard's pending set
(`runtime.keys.pending_key`) with everything needed to undo it, scored by the end of its
lease, and the script that settles it after the commit (done or undo) takes it off again, so
in normal operation the set holds only votes in flight and this reconciler finds nothing.
Every replica runs it: once a member's lease has ended (by the Redis clock), its idempotency
record says what happened:

- gone, committed (`D|`), or another admission's record: settled; the member is dropped;
- still this admission's pending record: its replica is gone (the lease is far longer than a
  commit may take). The ledger decides: committed -> the record is marked committed (the
  charge stands for the vote); not in the ledger -> the admission is undone.

Exactly once, whatever the number of replicas reconciling: the undo script only acts while
the pending record of that very admission is there and deletes it in the same step, so a
second replica's undo (or a client retry's takeover, which uses the same script) is a no-op.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from runtime import keys
from runtime.storage import Storage
from vote_svc import store
from vote_svc.admission import RATE_WINDOW_MS, Scripts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PendingAdmission:
    """One member of a shard's pending set."""

    shard: int
    member: bytes
    vote_id: str
    round_id: str
    contestant_id: str
    vote_type: str
    count: int
    admitted_ms: int
    episode_id: str
    idempotency_key: str
    user_id: str
    request_id: str

    @classmethod
    def parse(cls, shard: int, member: bytes) -> PendingAdmission:
        fields = keys.parse_pending(member)
        prefix = keys.idempotency_key(shard, "", "")[:-1]  # "tv:{sN}:idem:"
        if not fields.idempotency_key.startswith(prefix):
            raise ValueError(
                f"not an idempotency key of shard {shard}: {fields.idempotency_key}")
        user_id, request_id = fields.idempotency_key[len(prefix):].rsplit(":", 1)
        return cls(shard, member, fields.vote_id, fields.round_id, fields.contestant_id,
                   fields.vote_type, fields.count, fields.admitted_ms, fields.episode_id,
                   fields.idempotency_key, user_id, request_id)

    def undo_args(self) -> list[str | int]:
        return [self.vote_id, self.vote_type, self.count, self.contestant_id, self.episode_id,
                self.admitted_ms, RATE_WINDOW_MS, self.round_id]

    def undo_keys(self) -> list[str]:
        return [keys.user_key(self.shard, self.user_id), self.idempotency_key,
                keys.rate_key(self.shard, self.user_id),
                keys.live_key(self.shard, self.round_id),
                keys.live_minutes_key(self.shard, self.round_id)]


@dataclass
class ReconcileStats:
    """What one pass did."""

    settled: int = 0  # committed or undone by their own replica: only the member went
    committed: int = 0  # a dead replica's vote that did reach the ledger: marked committed
    undone: int = 0  # a dead replica's vote not in the ledger: its admission undone


class Reconciler:
    """Gives back what dead replicas' uncommitted admissions still hold in Redis."""

    def __init__(self, storage: Storage, scripts: Scripts, *, interval_ms: float,
                 idempotency_ttl_ms: int, batch: int = 500, db_timeout_s: float = 5.0) -> None:
        self._storage = storage
        self._scripts = scripts
        self._interval = interval_ms / 1000
        self._ttl_ms = idempotency_ttl_ms
        self._batch = batch
        self._db_timeout = db_timeout_s

    async def run(self) -> None:
        """Reconcile every `interval` for the life of the process."""
        while True:
            try:
                while (stats := await self.pass_once()) and (
                        stats.settled + stats.committed + stats.undone >= self._batch):
                    pass  # a backlog: keep going without waiting
            except asyncio.CancelledError:
                raise
            except Exception as error:  # Redis or PostgreSQL away: the next pass retries
                log.warning("reconciler pass failed: %r", error)
            await asyncio.sleep(self._interval)

    async def pass_once(self) -> ReconcileStats:
        """One look at every shard's expired leases (up to `batch` per shard)."""
        redis = self._storage.redis
        now = await keys.server_time_ms(redis)
        async with redis.pipeline(transaction=False) as pipe:
            for shard in range(keys.SHARDS):
                pipe.zrangebyscore(keys.pending_key(shard), "-inf", now, start=0,
                                   num=self._batch)
            expired: list[list[bytes]] = await pipe.execute()
        stats = ReconcileStats()
        entries: list[PendingAdmission] = []
        broken: list[tuple[int, bytes]] = []
        for shard, members in enumerate(expired):
            for member in members:
                try:
                    entries.append(PendingAdmission.parse(shard, member))
                except ValueError:
                    log.error("malformed pending admission %r", member)
                    broken.append((shard, member))
        if not entries and not broken:
            return stats
        async with redis.pipeline(transaction=False) as pipe:
            for entry in entries:
                pipe.get(entry.idempotency_key)
            records: list[Any] = await pipe.execute()
        stranded = [entry for entry, record in zip(entries, records, strict=True)
                    if _pending_of(record, entry.vote_id)]
        stats.settled = len(entries) - len(stranded)
        if stranded:
            committed = await self._committed(stranded)
            calls = []
            for entry in stranded:
                if committed.get((entry.user_id, entry.request_id)) == entry.vote_id:
                    stats.committed += 1
                    calls.append(self._scripts.call(self._scripts.done,
                                                    [entry.idempotency_key],
                                                    [entry.vote_id, self._ttl_ms, ""]))
                else:  # not in the ledger (or another admission of the request is)
                    calls.append(self._scripts.call(self._scripts.undo, entry.undo_keys(),
                                                    entry.undo_args()))
            outcomes = await asyncio.gather(*calls)
            stats.undone = sum(
                1 for entry, acted in zip(stranded, outcomes, strict=True)
                if committed.get((entry.user_id, entry.request_id)) != entry.vote_id
                and int(acted) == 1)
            if stats.committed or stats.undone:
                log.info("reconciled dead replicas' admissions", extra={"fields": {
                    "committed": stats.committed, "undone": stats.undone}})
        async with redis.pipeline(transaction=False) as pipe:
            for entry in entries:
                pipe.zrem(keys.pending_key(entry.shard), entry.member)
            for shard, member in broken:
                pipe.zrem(keys.pending_key(shard), member)
            await pipe.execute()
        return stats

    async def _committed(self, entries: list[PendingAdmission]) -> dict[tuple[str, str], str]:
        """(user_id, request_id) -> vote_id of those in the ledger."""
        async with self._storage.pool.connection(timeout=self._db_timeout) as connection:
            cursor = await connection.execute(
                store.COMMITTED_ADMISSIONS,
                ([e.user_id for e in entries], [e.request_id for e in entries]))
            rows: list[dict[str, Any]] = await cursor.fetchall()
        return {(row["user_id"], row["request_id"]): row["vote_id"] for row in rows}


def _pending_of(record: bytes | str | None, vote_id: str) -> bool:
    """Whether an idempotency record is still the pending record of admission `vote_id`."""
    if record is None:
        return False
    text = record.decode() if isinstance(record, bytes) else record
    parts = text.split("|", 3)
    return len(parts) >= 3 and parts[0] == "P" and parts[2] == vote_id
