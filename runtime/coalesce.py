"""Many callers' requests, one round trip: the batching under vote_svc's hot path.

Each RPC handles one vote, but every vote needs Redis and, for a voter's first vote,
PostgreSQL. Paid one round trip per vote, the event loop's wake-ups, syscalls and client-library
overhead cost more CPU than the work itself. A Coalescer collects the requests that concurrent
handlers make and sends them as one batch.

Each request says how long it may wait (`wait_ms`): a batch leaves when its most urgent
request must, so a request that may wait (a committed vote's settlement in Redis, which no
caller waits for) rides along with the next urgent one (an admission) instead of paying a
round trip of its own.

With `max_inflight`, a batch also waits while that many are out, and leaves as soon as one
returns, with everything queued meanwhile ("smart batching"): a batch then holds what
arrived during one round trip, so it grows with the load by itself (under load a round trip
takes longer and more arrive during it), and nothing waits on a timer when nothing is out.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Reply = TypeVar("Reply")

#: Runs a batch: one reply (or the exception for that item alone) per item, in order.
BatchRunner = Callable[[list[Item]], Awaitable[Sequence[Reply | BaseException]]]


#: A caller bringing this many items (a carrier's batch of messages) shares a round trip
#: among them already (`company_wait_ms`).
SHARED_ENOUGH = 50


def company_wait_ms(items: int, wait_ms: float) -> float:
    """How long a caller's `items` wait for other callers' to share a round trip: `wait_ms`,
    or nothing (the end of this event-loop iteration, with whatever else it queued) for a
    batch of SHARED_ENOUGH items or more. The wait is there to share a round trip; a large
    batch's items share one already, and for a caller with a few batches in flight (a
    carrier) the wait only adds to each answer's time, and so divides its throughput."""
    return 0.0 if items >= SHARED_ENOUGH else wait_ms


class Coalescer(Generic[Item, Reply]):
    """Runs `run_batch` on the items submitted together; each caller gets its own reply.

    A reply that is an exception is raised to that item's caller only. If `run_batch` raises,
    every caller of the batch gets it. With `max_batch`, a batch leaves as soon as it is full;
    with `max_inflight`, no batch leaves while that many are being run.
    """

    def __init__(self, run_batch: BatchRunner[Item, Reply], max_batch: int = 0,
                 max_inflight: int = 0) -> None:
        self._run_batch = run_batch
        self._max_batch = max_batch  # 0: no limit
        self._max_inflight = max_inflight  # 0: no limit
        self._inflight = 0  # batches being run
        self._held = False  # a batch is due but waits for one in flight to return
        self._items: list[Item] = []
        #: Per item, where its reply goes: its own future, or its place in a group.
        self._futures: list[asyncio.Future[Reply] | tuple[_Group[Reply], int]] = []
        self._timer: asyncio.TimerHandle | asyncio.Handle | None = None
        self._due = 0.0  # loop time by which the pending batch leaves
        self._tasks: set[asyncio.Task[None]] = set()

    def submit(self, item: Item, *, wait_ms: float = 0.0) -> asyncio.Future[Reply]:
        """Queue `item` for a batch that leaves within `wait_ms` (0: at the end of this
        event-loop iteration, with whatever else this iteration queued).

        A future, not a coroutine: gathering a batch's submissions then costs no task per item.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Reply] = loop.create_future()
        self._items.append(item)
        self._futures.append(future)
        if self._held:  # it leaves when a batch in flight returns
            return future
        if len(self._items) == self._max_batch:  # full: it leaves now
            self._flush_now()
            return future
        self._leave_within(loop, wait_ms)
        return future

    def submit_many(self, items: Sequence[Item], *, wait_ms: float = 0.0,
                    ) -> asyncio.Future[list[Reply | BaseException]]:
        """Queue `items` as `submit` does, with one future for all of them: its result is
        each item's reply, or the exception for that item, in order. A caller with many
        items (a carrier's batch of messages) pays one future, not one per item."""
        loop = asyncio.get_running_loop()
        group: _Group[Reply] = _Group(loop.create_future(), len(items))
        if not items:
            group.future.set_result([])
            return group.future
        for position, item in enumerate(items):
            self._items.append(item)
            self._futures.append((group, position))
            if len(self._items) == self._max_batch:
                self._flush_now()
        if self._items:
            self._leave_within(loop, wait_ms)
        return group.future

    def _flush_now(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._flush()

    def _leave_within(self, loop: asyncio.AbstractEventLoop, wait_ms: float) -> None:
        due = loop.time() + wait_ms / 1000
        if self._timer is None or due < self._due:
            if self._timer is not None:
                self._timer.cancel()
            self._due = due
            self._timer = (loop.call_later(wait_ms / 1000, self._flush) if wait_ms
                           else loop.call_soon(self._flush))

    def _flush(self) -> None:
        if self._timer is not None:  # called before its time (full, or a batch returned)
            self._timer.cancel()
        self._timer = None
        if not self._items:
            self._held = False
            return
        if self._max_inflight and self._inflight >= self._max_inflight:
            self._held = True
            return
        self._held = False
        self._inflight += 1
        loop = asyncio.get_running_loop()
        size = self._max_batch or len(self._items)
        items, futures = self._items[:size], self._futures[:size]
        self._items, self._futures = self._items[size:], self._futures[size:]
        if self._items:  # held past a full batch: the rest leave next, as their own batch
            self._timer = loop.call_soon(self._flush)
        task = loop.create_task(self._execute(items, futures))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _execute(self, items: list[Item],
                       futures: list[asyncio.Future[Reply] | tuple[_Group[Reply], int]],
                       ) -> None:
        try:
            replies: Sequence[Reply | BaseException] = await self._run_batch(items)
        except Exception as error:
            replies = [error] * len(items)
        finally:
            self._inflight -= 1
            if self._held:  # what queued while this batch was out leaves now
                self._flush()
        for future, reply in zip(futures, replies, strict=True):
            if isinstance(future, tuple):
                group, position = future
                group.deliver(position, reply)
            elif future.done():  # its caller was cancelled
                continue
            elif isinstance(reply, BaseException):
                future.set_exception(reply)
            else:
                future.set_result(reply)


class _Group(Generic[Reply]):
    """The replies of one `submit_many`, complete when the last arrives."""

    __slots__ = ("_left", "future", "replies")

    def __init__(self, future: asyncio.Future[list[Reply | BaseException]], size: int) -> None:
        self.future = future
        self.replies: list[Reply | BaseException] = [None] * size  # type: ignore[list-item]
        self._left = size

    def deliver(self, position: int, reply: Reply | BaseException) -> None:
        self.replies[position] = reply
        self._left -= 1
        if self._left == 0 and not self.future.done():
            self.future.set_result(self.replies)
