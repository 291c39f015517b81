"""Driving a show in tests: an operator's client for ShowControlService, and watchers."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration

from ops.stack import Stack
from runtime.access import Role
from televote.sync.v1 import show_control_service_pb2 as control
from televote.sync.v1 import show_control_service_pb2_grpc as control_grpc
from televote.sync.v1 import show_watch_service_pb2 as watch
from televote.sync.v1 import show_watch_service_pb2_grpc as watch_grpc
from tests.conftest import bearer


def seconds(value: float) -> Duration:
    duration = Duration()
    duration.FromMilliseconds(round(value * 1000))
    return duration


def request_id() -> str:
    return str(uuid.uuid4())


@dataclass
class Operator:
    """The control room: calls ShowControlService with an operator token."""

    stack: Stack
    channel: grpc.aio.Channel

    @property
    def stub(self) -> control_grpc.ShowControlServiceStub:
        return control_grpc.ShowControlServiceStub(self.channel)

    @property
    def metadata(self) -> tuple[tuple[str, str]]:
        return bearer(self.stack.settings.state_dir, Role.OPERATOR, "producer")

    async def call(self, method: str, **fields: Any) -> Any:
        """Call a ShowControlService RPC with a fresh request id unless one is given."""
        request_type = getattr(control, f"{method}Request")
        fields.setdefault("request_id", request_id())
        return await getattr(self.stub, method)(request_type(**fields), metadata=self.metadata,
                                                timeout=10)

    async def cue(self, episode_id: str, cue: int, **fields: Any) -> control.ApplyCueResponse:
        return await self.call("ApplyCue", episode_id=episode_id, type=cue, **fields)  # type: ignore[no-any-return]

    async def episode_with_contestants(self, count: int = 3) -> tuple[str, list[str]]:
        show = (await self.call("CreateShow", name="X Factor Cambodia")).show
        episode = (await self.call("CreateEpisode", show_id=show.show_id,
                                   title="Live show 1")).episode
        contestants = [
            (await self.call("AddContestant", episode_id=episode.episode_id,
                             name=f"Singer {number}", sms_number=number,
                             photo_url=f"https://img.example/{number}.jpg")).contestant
            for number in range(1, count + 1)]
        return episode.episode_id, [c.contestant_id for c in contestants]


@dataclass
class GrpcWatcher:
    """WatchShow over native gRPC, collected into a list as events arrive."""

    events: list[watch.WatchShowResponse] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def start(self, channel: grpc.aio.Channel, episode_id: str) -> GrpcWatcher:
        async def read() -> None:
            stub = watch_grpc.ShowWatchServiceStub(channel)
            async for event in stub.WatchShow(watch.WatchShowRequest(episode_id=episode_id)):
                self.events.append(event)
                self.arrived.set()

        self.task = asyncio.create_task(read())
        return self

    async def wait_for(self, event_type: int, count: int = 1, timeout: float = 30) -> None:
        async with asyncio.timeout(timeout):
            while sum(e.type == event_type for e in self.events) < count:
                self.arrived.clear()
                await self.arrived.wait()

    def types(self) -> list[str]:
        return [watch.ShowEventType.Name(e.type).removeprefix("SHOW_EVENT_TYPE_")
                for e in self.events]

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


class SseWatcher:
    """WatchShow as Server-Sent Events through the edge's JSON transcoding (a browser's view).

    Spoken over a plain asyncio connection (HTTP/1.1, chunked) so the test can stop it at once.
    """

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.received_ms: list[float] = []  # when each event arrived, by this host's clock
        self.arrived = asyncio.Event()  # set at each event
        self.task: asyncio.Task[None] | None = None

    def start(self, target: str, path: str) -> SseWatcher:
        self.task = asyncio.create_task(self._read(target, path))
        return self

    async def _read(self, target: str, path: str) -> None:
        host, port = target.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {target}\r\n"
                     "Accept: text/event-stream\r\n\r\n".encode())
        try:
            status = await reader.readline()
            assert b" 200 " in status, status
            while (await reader.readline()).strip():  # headers
                pass
            buffer = b""
            while size := int((await reader.readline()).strip() or b"0", 16):
                buffer += await reader.readexactly(size)
                await reader.readline()
                *messages, buffer = buffer.split(b"\n\n")
                for message in messages:
                    for line in message.decode().splitlines():
                        if line.startswith("data:"):
                            self.events.append(json.loads(line.removeprefix("data:")))
                            self.received_ms.append(time.time() * 1000)
                            self.arrived.set()
        finally:
            writer.close()

    async def wait_until(self, done: Callable[[dict[str, Any]], bool], timeout: float) -> None:
        """Until an event satisfies `done` (the edge's stream may run a little behind a
        native one)."""
        async with asyncio.timeout(timeout):
            while not any(done(event) for event in self.events):
                self.arrived.clear()
                await self.arrived.wait()

    def types(self) -> list[str]:
        return [e["type"].removeprefix("SHOW_EVENT_TYPE_") for e in self.events]

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
