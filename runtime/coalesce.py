"""Many callers' requests, one round trip: the batching under vote_svc's hot path.

Each RPC handles one vote, but every vote needs Redis and, for a voter's first vote,
PostgreSQL. Paid one round trip per vote, the event loop's wake-ups, syscalls and client-library
overhead cost more CPU than the work itself. A Coalescer collects the requests that concurrent
handlers make and sends them as one batch.

Each request says how long it may wait (`wait_ms`): a batch leaves when its most urgent
request must, so a request that may wait (a committed vote's settlement in Redis, which no
caller waits for) rides along with the next urgent one (an admission) instead of paying a
round trip of its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Reply = TypeVar("Reply")

#: Runs a batch: one reply (or the exception for that item alone) per item, in order.
BatchRunner = Callable[[list[Item]], Awaitable[Sequence[Reply | BaseException]]]


class Coalescer(Generic[Item, Reply]):
    """Runs `run_batch` on the items submitted together; each caller gets its own reply.

    A reply that is an exception is raised to that item's caller only. If `run_batch` raises,
    every caller of the batch gets it. With `max_batch`, a batch leaves as soon as it is full.
    """

    def __init__(self, run_batch: BatchRunner[Item, Reply], max_batch: int = 0) -> None:
        self._run_batch = run_batch
        self._max_batch = max_batch  # 0: no limit
        self._items: list[Item] = []
        self._futures: list[asyncio.Future[Reply]] = []
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
        if len(self._items) == self._max_batch:  # full: it leaves now
            if self._timer is not None:
                self._timer.cancel()
            self._flush()
            return future
        due = loop.time() + wait_ms / 1000
        if self._timer is None or due < self._due:
            if self._timer is not None:
                self._timer.cancel()
            self._due = due
            self._timer = (loop.call_later(wait_ms / 1000, self._flush) if wait_ms
                           else loop.call_soon(self._flush))
        return future

    def _flush(self) -> None:
        self._timer = None
        items, futures = self._items, self._futures
        self._items, self._futures = [], []
        task = asyncio.get_running_loop().create_task(self._execute(items, futures))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _execute(self, items: list[Item], futures: list[asyncio.Future[Reply]]) -> None:
        try:
            replies = await self._run_batch(items)
        except Exception as error:
            for future in futures:
                if not future.done():
                    future.set_exception(error)
            return
        for future, reply in zip(futures, replies, strict=True):
            if future.done():  # its caller was cancelled
                continue
            if isinstance(reply, BaseException):
                future.set_exception(reply)
            else:
                future.set_result(reply)
