"""One event, many server streams: the fan-out behind WatchShow (sync_svc) and StreamResults
(results_svc).

- An event is serialized once, however many streams carry it. A stream's message on the wire is
  its own `sequence` (field 1, a varint) written in front of the shared bytes: protobuf fields
  may come in any order and a message is the concatenation of its fields, so
  `sequence_prefix(n) + shared` parses as the event with `sequence = n`. Handlers send those
  bytes as they are (`add_servicer(..., prebuilt=...)` registers an identity serializer).
- Each stream has a mailbox its publisher never waits on. `Latest` keeps the newest event only
  (live results: each update supersedes the last). `Bounded` keeps up to N in order; a reader
  that falls N behind loses its backlog and is told to resync (`RESYNC`): it is sent a fresh
  snapshot, the same thing a reconnecting client gets. Neither grows with a slow reader.
- Handlers write with `await context.write(...)` from a plain coroutine rather than yielding
  through nested async generators: one await per message between the mailbox and grpc.
- Every service process sizes the garbage collector for such bursts (`runtime.server.quiet_gc`):
  otherwise a fan-out sets off full collections that stop every stream for most of a second.
- When the server drains, `Streams.end` ends every open stream with UNAVAILABLE (clients
  reconnect to another replica and get the current state) instead of leaving them to be
  cancelled when the grace period runs out (registered with `ServiceHost.on_drain`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor

from runtime.errors import ApiError

T = TypeVar("T")


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


_SMALL_PREFIXES = [b"\x08" + varint(n) for n in range(128)]


def sequence_prefix(sequence: int) -> bytes:
    """Field 1 (varint) = `sequence`: the per-stream part of a streamed message."""
    if sequence < 128:
        return _SMALL_PREFIXES[sequence]
    return b"\x08" + varint(sequence)


def length_delimited(field_number: int, payload: bytes) -> bytes:
    """A message (or bytes/string) field holding `payload`, ready to concatenate."""
    return varint(field_number << 3 | 2) + varint(len(payload)) + payload


class _Resync:
    def __repr__(self) -> str:
        return "RESYNC"


#: What `Bounded.take` returns to a reader that fell behind: send it a fresh snapshot.
RESYNC: Any = _Resync()
_EMPTY: Any = object()


def draining() -> ApiError:
    return ApiError(grpc.StatusCode.UNAVAILABLE, "SERVER_DRAINING",
                    "this replica is shutting down; reconnect to get the current state")


class _Mailbox:
    __slots__ = ("_error", "_loop", "_waiter")

    def __init__(self) -> None:
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        # Kept: asyncio.get_running_loop() costs a getpid() system call on every wait.
        self._loop: asyncio.AbstractEventLoop | None = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def close(self, error: BaseException) -> None:
        """End the reader's stream: its next `take` raises `error`."""
        self._error = error
        self._wake()

    async def _wait(self) -> None:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None


class Latest(_Mailbox, Generic[T]):
    """A one-slot mailbox: a reader gets the newest event offered since its last take."""

    __slots__ = ("_item",)

    def __init__(self) -> None:
        super().__init__()
        self._item: T = _EMPTY

    def offer(self, item: T) -> None:
        self._item = item
        self._wake()

    async def take(self) -> T:
        while True:
            if self._error is not None:
                raise self._error
            item = self._item
            if item is not _EMPTY:
                self._item = _EMPTY
                return item
            await self._wait()

    @property
    def pending(self) -> bool:
        return self._item is not _EMPTY


class Bounded(_Mailbox, Generic[T]):
    """Up to `limit` events in order; past that the backlog is dropped for one `RESYNC`."""

    __slots__ = ("_items", "_limit", "stale")

    def __init__(self, limit: int) -> None:
        super().__init__()
        self._items: list[T] = []
        self._limit = limit
        #: Fell behind: events are dropped until the reader takes its RESYNC.
        self.stale = False

    def offer(self, item: T) -> None:
        if self.stale:
            return
        if len(self._items) >= self._limit:
            self.stale = True
            self._items.clear()
        else:
            self._items.append(item)
        self._wake()

    async def take(self) -> T:
        while True:
            if self._error is not None:
                raise self._error
            if self.stale:
                self.stale = False
                return RESYNC  # type: ignore[no-any-return]
            if self._items:
                return self._items.pop(0)
            await self._wait()

    def __len__(self) -> int:
        return 1 if self.stale else len(self._items)


Mailbox = Latest[Any] | Bounded[Any]

#: Mailboxes handed an event per turn of the event loop (see `deliver`).
DELIVERY_BATCH = 256


async def deliver(mailboxes: Iterable[Latest[T] | Bounded[T]], item: T,
                  batch: int = DELIVERY_BATCH) -> None:
    """Offer `item` to every mailbox, yielding to the event loop after each `batch`.

    Each offer wakes one stream's handler; waking ten thousand at once makes one loop turn
    that long, and meanwhile grpc's accept loop cannot take new calls (grpc-core cancels
    calls that wait unaccepted beyond its pending-request limits), health checks and unary
    RPCs wait too. Slices keep every turn short."""
    for n, mailbox in enumerate(list(mailboxes), start=1):
        mailbox.offer(item)
        if n % batch == 0:
            await asyncio.sleep(0)


class Topic(Generic[T]):
    """The mailboxes of one subject (an episode, a round) on this replica, and the one task
    that delivers its events to them: in order, in slices (`deliver`), and without the
    publisher ever waiting (a countdown ticker keeps its second even while the previous
    tick is still being handed out)."""

    def __init__(self) -> None:
        self.mailboxes: set[Latest[T] | Bounded[T]] = set()
        self._pending: deque[T] = deque()
        self._task: asyncio.Task[None] | None = None

    def publish(self, item: T) -> None:
        self._pending.append(item)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while self._pending:
            await deliver(self.mailboxes, self._pending.popleft())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def __len__(self) -> int:
        return len(self.mailboxes)


class Streams:
    """Every open stream mailbox of a process, so draining can end them all."""

    def __init__(self) -> None:
        self._open: set[Mailbox] = set()
        self._ended: ApiError | None = None

    def open(self, mailbox: Mailbox) -> None:
        """Track a new stream's mailbox; refused with UNAVAILABLE once draining began."""
        if self._ended is not None:
            raise self._ended
        self._open.add(mailbox)

    def close(self, mailbox: Mailbox) -> None:
        self._open.discard(mailbox)

    def end(self, error: ApiError | None = None) -> None:
        """End every open stream (and refuse new ones) with `error`, UNAVAILABLE by default."""
        self._ended = error or draining()
        for mailbox in list(self._open):
            mailbox.close(self._ended)

    def __len__(self) -> int:
        return len(self._open)


def _as_is(message: bytes) -> bytes:
    return message


def add_servicer(service: ServiceDescriptor, prebuilt: Iterable[str] = ()
                 ) -> Callable[[Any, grpc.aio.Server], None]:
    """`add_XServicer_to_server` for `service`, except that the handlers named in `prebuilt`
    send the bytes they write or yield as they are (already serialized messages)."""
    prebuilt = frozenset(prebuilt)
    makers = {(False, False): grpc.unary_unary_rpc_method_handler,
              (False, True): grpc.unary_stream_rpc_method_handler,
              (True, False): grpc.stream_unary_rpc_method_handler,
              (True, True): grpc.stream_stream_rpc_method_handler}

    def register(servicer: Any, server: grpc.aio.Server) -> None:
        handlers = {}
        for method in service.methods:
            request = message_factory.GetMessageClass(method.input_type)
            response = message_factory.GetMessageClass(method.output_type)
            make: Any = makers[(method.client_streaming, method.server_streaming)]
            handlers[method.name] = make(
                getattr(servicer, method.name), request_deserializer=request.FromString,
                response_serializer=_as_is if method.name in prebuilt
                else response.SerializeToString)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service.full_name, handlers),))

    return register
