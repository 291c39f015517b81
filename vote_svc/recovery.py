"""Recovery of vote admission's Redis state, from PostgreSQL (the record).

Redis holds what admission reads on every vote: the round's window, the live counters per
shard, pending admissions. When it loses them (a restart without persistence, a failover)
or a replica dies mid-vote, this puts back what the ledger and the rounds say: a shard's
counters once the votes admitted before the loss have settled (`rebuild_shard`, also noticed
ahead of votes by `watch_shards`), an OPEN round's window (`restore_window`), and a pending
admission whose lease ran out (`take_over`). See vote_svc/README.md, "Recovery after Redis
loses its data".
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import grpc

from runtime import keys
from runtime.errors import ApiError
from runtime.storage import Storage, fetch_one
from runtime.window import Window
from vote_svc import store
from vote_svc.admission import RATE_WINDOW_MS, Outcome, Scripts, VoteKeys
from vote_svc.config import VoteConfig

if TYPE_CHECKING:
    from vote_svc.ingest import VoteRequest

log = logging.getLogger(__name__)


class Recovery:
    """Rebuilds admission's Redis state of one vote_svc process from PostgreSQL."""

    def __init__(self, storage: Storage, scripts: Scripts, config: VoteConfig) -> None:
        self._storage = storage
        self._scripts = scripts
        self._config = config

    async def watch_shards(self, every_s: float = 1.0) -> None:
        """Notice a Redis loss before votes do: rebuild every shard whose marker is gone.

        Runs for the life of the process; at a first start it rebuilds all shards at once
        instead of one settle period per shard as votes arrive.
        """
        redis = self._storage.redis
        while True:
            try:
                async with redis.pipeline(transaction=False) as pipe:
                    for shard in range(keys.SHARDS):
                        pipe.exists(keys.shard_marker_key(shard))
                    present = await pipe.execute()
                missing = [shard for shard, exists in enumerate(present) if not exists]
                if missing:
                    await asyncio.gather(*(self.rebuild_shard(shard) for shard in missing))
            except Exception as error:  # Redis or PostgreSQL not there yet: try again
                log.debug("shard watch: %r", error)
            await asyncio.sleep(every_s)

    def _db(self) -> Any:
        """A pooled connection, waiting no longer than a commit may take (PostgreSQL down
        must turn into UNAVAILABLE quickly, not a hung vote)."""
        return self._storage.pool.connection(timeout=self._config.vote_commit_timeout_ms / 1000)

    async def restore_window(self, round_id: str, window_keys: set[str]) -> ApiError | None:
        """No window in Redis: the round does not exist, is not open, or Redis lost it (then
        the OPEN round's window, or a CLOSED one's within its receive lag, is rebuilt from
        PostgreSQL the way sync_svc writes it, into the shard copies that are missing;
        sync_svc's own writes win)."""
        async with self._db() as connection:
            row: dict[str, Any] | None = await fetch_one(connection, store.ROUND_WINDOW,
                                                         (round_id,))
        if row is None:
            return ApiError(grpc.StatusCode.NOT_FOUND, "ROUND_NOT_FOUND", "no such round")
        if row["state"] == "PENDING" or row["opens_at"] is None:
            return ApiError(grpc.StatusCode.FAILED_PRECONDITION, "VOTING_NOT_OPEN",
                            "voting has not opened for this round")
        # A closed round's window is rebuilt too while votes received before its close may
        # still arrive (the round's receive lag): admission judges them by that time.
        receiving = (row["state"] == "CLOSED" and row["closed_at"] is not None
                     and time.time() * 1000 < row["closed_at"].timestamp() * 1000
                     + int(row["receive_lag_ms"]))
        if (row["state"] != "OPEN" and not receiving) or row["closes_at"] is None:
            return ApiError(grpc.StatusCode.FAILED_PRECONDITION, "VOTING_CLOSED",
                            "voting has closed for this round")
        fields = Window.of_round(row, row).fields()
        args: list[str | int] = [part for pair in fields.items() for part in pair]
        await asyncio.gather(*(self._scripts.call(self._scripts.window_if_missing, [key], args)
                               for key in window_keys))
        log.info("restored window of round %s from PostgreSQL", round_id)
        return None

    async def rebuild_shard(self, shard: int) -> None:
        """Redis lost this shard's state (or never had it): rebuild its live counters from the
        ledger once the votes admitted before the loss have settled, then set the marker.

        Until the marker is back no vote of the shard is admitted, so the ledger sums read
        after the settle period are exact and user caches loaded afterwards are exact too.
        """
        redis = self._storage.redis
        marker = keys.shard_marker_key(shard)
        lock = f"tv:{keys.tag(shard)}:rebuilding"
        settle = self._config.vote_rebuild_settle_ms
        if not await redis.set(lock, self._config.televote_replica, nx=True, px=settle + 15_000):
            for _ in range(int((settle + 15_000) / 50)):
                if await redis.exists(marker):
                    return
                await asyncio.sleep(0.05)
            return
        try:
            await asyncio.sleep(settle / 1000)
            async with self._db() as connection:
                cursor = await connection.execute(
                    store.USER_ROUND_VOTES,
                    (RATE_WINDOW_MS, shard))
                rows: list[dict[str, Any]] = await cursor.fetchall()
            live: dict[str, dict[str, int]] = {}
            minutes: dict[str, dict[str, int]] = {}
            for row in rows:
                totals = live.setdefault(row["round_id"], {})
                totals[row["contestant"]] = totals.get(row["contestant"], 0) + int(row["n"])
                minutes.setdefault(row["round_id"], {})[
                    f"{row['minute']}:{row['contestant']}"] = int(row["n"])
            async with redis.pipeline(transaction=True) as pipe:
                for round_id, totals in live.items():
                    pipe.delete(keys.live_key(shard, round_id))
                    pipe.hset(keys.live_key(shard, round_id), mapping=totals)  # type: ignore[arg-type]
                    pipe.delete(keys.live_minutes_key(shard, round_id))
                    pipe.hset(keys.live_minutes_key(shard, round_id),
                              mapping=minutes[round_id])  # type: ignore[arg-type]
                pipe.set(marker, "1")
                await pipe.execute()
            log.info("rebuilt shard %d from the ledger (%d open rounds)", shard, len(live))
        finally:
            await redis.delete(lock)

    async def take_over(self, vote: VoteRequest, keyset: VoteKeys, stale: Outcome) -> None:
        """A pending admission outlived its lease (its replica died or lost PostgreSQL): the
        ledger says whether it was committed; if not, undo it so the retry can be admitted."""
        async with self._db() as connection:
            row: dict[str, Any] | None = await fetch_one(
                connection, store.VOTE_OF_REQUEST, (vote.user_id, vote.request_id))
        ttl = self._config.vote_idempotency_ttl_s * 1000
        if row is not None and row["vote_id"] == stale.vote_id:
            await self._scripts.call(self._scripts.done, [keyset.idempotency],
                                     [stale.vote_id, ttl, ""])
        else:  # not committed (or committed by another admission: the ledger will say so)
            await self._scripts.call(self._scripts.undo, keyset.undo_keys(), [
                stale.vote_id, vote.vote_type, vote.count, vote.contestant_id, stale.episode_id,
                stale.admitted_ms, RATE_WINDOW_MS, vote.round_id])
