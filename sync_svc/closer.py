"""Closes rounds by the clock, exactly once, on time, whichever replicas are alive.

The record of when a round closes is its `lines_close_at` in PostgreSQL, never a timer in one
process: every replica runs this loop, sleeps until the earliest close (waking early when a
window opens or moves anywhere), and then races the others to close it with a conditional
UPDATE that only one of them can win. A replica that was killed, or all of them restarted,
changes nothing: whoever runs next finds the due round and closes it.

Votes never depend on this loop being on time: the admission script already refuses a vote
after the window's close times by the Redis clock. The loop makes the close durable and
announces VOTING_CLOSED.

The same loop publishes show events left unpublished in the outbox (`show_events` rows whose
replica died between the commit and the publish): a VOTING_CLOSED committed by a replica that
crashed right after still reaches every watcher, within a poll.

And it repairs Redis: every `sync_window_repair_ms` (and at start) it re-applies the committed
window of every open or recently closed round (`ShowStore.repair_windows`), so a window write
lost between a commit and its Redis write (an open, an extension) is back within a period,
instead of votes being refused until the round closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from runtime import keys
from runtime.storage import Storage
from sync_svc.config import SyncConfig
from sync_svc.show import ShowStore

log = logging.getLogger(__name__)


class Closer:
    def __init__(self, storage: Storage, store: ShowStore, config: SyncConfig) -> None:
        self._storage = storage
        self._store = store
        self._poll_ms = config.sync_close_poll_ms
        self._outbox_after_ms = config.sync_outbox_replay_after_ms
        self._repair_every_ms = config.sync_window_repair_ms
        self._next_repair_ms = 0  # Redis clock; 0: at start
        self.poke = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="closer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                await self._close_when_due()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("closing rounds failed; retrying")
                await asyncio.sleep(0.2)

    async def _close_when_due(self) -> None:
        self.poke.clear()
        # Events whose replica died between commit and publish (show.py's outbox).
        replayed = await self._store.publish_outbox(self._outbox_after_ms)
        if replayed:
            log.warning("published show events another replica left unpublished",
                        extra={"fields": {"count": replayed}})
        due_ms = await self._store.next_close_ms()
        now_ms = await keys.server_time_ms(self._storage.redis)
        if due_ms is not None and due_ms <= now_ms:
            closed = await self._store.close_due_rounds(now_ms)
            if closed:
                log.info("closed rounds", extra={"fields": {
                    "count": closed, "late_ms": now_ms - due_ms}})
            return
        if now_ms >= self._next_repair_ms:  # after the close: it never delays one
            self._next_repair_ms = now_ms + self._repair_every_ms
            repaired = await self._store.repair_windows(now_ms)
            if repaired:
                log.warning("repaired Redis window copies from PostgreSQL",
                            extra={"fields": {"copies": repaired}})
            now_ms = await keys.server_time_ms(self._storage.redis)
        wait_ms = self._poll_ms if due_ms is None else min(self._poll_ms, due_ms - now_ms)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.poke.wait(), wait_ms / 1000)
