"""Replies to subscribers, durable: the outbox (migrations/0020).

A message's reply is written in the statement that records its outcome (sms_svc/store.py),
due only after a lease, so the recording replica sends it at once and no other replica takes
it meanwhile. The sender hands it to the SMS gateway (Kannel's sendsms) and marks it sent.
If the replica dies between recording and sending (or the gateway refuses the reply), the
reply stays pending, and every replica's poll takes the due ones once their lease has ended:
a restarted replica, or any other, resumes them.

Each lease names the process holding it (`SmsStore.lease_token`, its own per process). A
reply that waited here past its lease (for a sending slot, a slow gateway) may have been taken
by another replica meanwhile: right before handing a reply to the gateway, the sender
confirms that its own token still holds the lease (and extends it), else it leaves the reply
to the replica that took it; it marks sent or failed only replies it holds.

Delivery is still at least once, not exactly once: a replica that dies after Kannel took a
reply and before marking it sent leaves it pending, and it is sent again (Kannel's sendsms has
no id to deduplicate by), as is one whose gateway call outlasted the lease (the gateway's
timeout, 5 s, is half the default lease). The subscriber then reads the same reply twice, free
(only the inbound message is charged), and the delivery reports name the same carrier message
id, so the records hold one message with its reports.

A reply whose subscriber's number was purged (`televote sms purge`) can never be sent: the
purge drops it (`dropped_at`, `drop_reason` MSISDN_PURGED), and so does any poll that meets
one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from runtime.coalesce import Coalescer
from sms_svc.store import PendingReply, SmsStore

log = logging.getLogger(__name__)

#: Hands one reply to the SMS gateway: None when it took it, else why not.
Gateway = Callable[[PendingReply], Awaitable[str | None]]

#: A reply whose lease this process no longer holds: another replica sends it (or it was
#: dropped).
_NOT_HELD = "NOT_HELD"


class ReplyOutbox:
    """Sends recorded replies, this replica's at once and any replica's left pending."""

    def __init__(self, store: SmsStore, gateway: Gateway, *, poll_ms: float,
                 retry_ms: int, concurrency: int = 32, batch: int = 200) -> None:
        self._store = store
        self._gateway = gateway
        self._poll_s = poll_ms / 1000
        self._retry_ms = retry_ms
        self._batch = batch
        self._sending = asyncio.Semaphore(concurrency)
        #: Replies sent by concurrent deliveries are marked in one statement.
        self._sent: Coalescer[str, None] = Coalescer(self._mark_sent, max_batch=1000)
        #: Leases confirmed right before sending, many in one statement.
        self._held: Coalescer[str, bool] = Coalescer(self._hold, max_batch=1000)
        self._tasks: set[asyncio.Task[None]] = set()
        self._poller: asyncio.Task[None] | None = None

    def recorded(self, replies: list[PendingReply]) -> None:
        """Send these replies now (their outcomes were just recorded here)."""
        task = asyncio.get_running_loop().create_task(self._deliver(replies))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def start(self) -> None:
        self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def stop(self) -> None:
        """Finish the replies being sent; what is left stays pending for the next replica."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _poll(self) -> None:
        while True:
            try:
                due = await self._store.take_due_replies(self._batch)
                if due:
                    log.info("resuming %d pending SMS replies", len(due))
                    await self._deliver(due)
                if len(due) == self._batch:
                    continue
            except Exception:  # the database may be briefly away; the replies wait
                log.exception("taking pending SMS replies failed")
            await asyncio.sleep(self._poll_s)

    async def _deliver(self, replies: list[PendingReply]) -> None:
        problems = await asyncio.gather(*(self._send(reply) for reply in replies))
        failed: dict[str, list[str]] = {}
        sent = []
        for reply, problem in zip(replies, problems, strict=True):
            if problem is None:
                sent.append(self._sent.submit(reply.message_id, wait_ms=20))
            elif problem == _NOT_HELD:
                log.info("SMS reply %s is another replica's now", reply.message_id)
            else:
                failed.setdefault(problem, []).append(reply.message_id)
        try:
            for problem, message_ids in failed.items():
                await self._store.replies_failed(message_ids, problem, self._retry_ms)
            await asyncio.gather(*sent)
        except Exception:  # unmarked, they are sent again when due: at least once
            log.exception("marking SMS replies failed")

    async def _send(self, reply: PendingReply) -> str | None:
        async with self._sending:
            try:
                if not await self._held.submit(reply.message_id, wait_ms=2):
                    return _NOT_HELD
                return await self._gateway(reply)
            except Exception as error:
                log.exception("sending an SMS reply failed")
                return repr(error)

    async def _hold(self, message_ids: list[str]) -> list[bool]:
        held = await self._store.hold_replies(message_ids)
        return [message_id in held for message_id in message_ids]

    async def _mark_sent(self, message_ids: list[str]) -> list[None]:
        await self._store.replies_sent(message_ids)
        return [None] * len(message_ids)
