"""sync_svc's gRPC servicers: thin translations onto the ShowStore and the Hub."""

from __future__ import annotations

from typing import Any

from runtime import fanout, ids
from runtime.errors import FieldViolation, invalid_argument
from sync_svc.hub import Hub
from sync_svc.show import ShowStore
from televote.sync.v1 import show_control_service_pb2 as control
from televote.sync.v1 import show_control_service_pb2_grpc as control_grpc
from televote.sync.v1 import show_internal_service_pb2 as internal
from televote.sync.v1 import show_internal_service_pb2_grpc as internal_grpc
from televote.sync.v1 import show_watch_service_pb2 as watch
from televote.sync.v1 import show_watch_service_pb2_grpc as watch_grpc


class ShowControlServicer(control_grpc.ShowControlServiceServicer):
    """Operators and broadcast automation drive the show."""

    def __init__(self, store: ShowStore) -> None:
        self._store = store

    async def CreateShow(self, request: control.CreateShowRequest, context: Any
                         ) -> control.CreateShowResponse:
        return await self._store.create_show(request)

    async def CreateEpisode(self, request: control.CreateEpisodeRequest, context: Any
                            ) -> control.CreateEpisodeResponse:
        return await self._store.create_episode(request)

    async def AddContestant(self, request: control.AddContestantRequest, context: Any
                            ) -> control.AddContestantResponse:
        return await self._store.add_contestant(request)

    async def CreateRound(self, request: control.CreateRoundRequest, context: Any
                          ) -> control.CreateRoundResponse:
        return await self._store.create_round(request)

    async def ApplyCue(self, request: control.ApplyCueRequest, context: Any
                       ) -> control.ApplyCueResponse:
        return await self._store.apply_cue(request)

    async def StartShow(self, request: control.StartShowRequest, context: Any
                        ) -> control.StartShowResponse:
        return await self._store.start_show(request)

    async def StartPerformance(self, request: control.StartPerformanceRequest, context: Any
                               ) -> control.StartPerformanceResponse:
        return await self._store.start_performance(request)

    async def EndPerformance(self, request: control.EndPerformanceRequest, context: Any
                             ) -> control.EndPerformanceResponse:
        return await self._store.end_performance(request)

    async def OpenVoting(self, request: control.OpenVotingRequest, context: Any
                         ) -> control.OpenVotingResponse:
        return await self._store.open_voting(request)

    async def ExtendVoting(self, request: control.ExtendVotingRequest, context: Any
                           ) -> control.ExtendVotingResponse:
        return await self._store.extend_voting(request)

    async def CloseVoting(self, request: control.CloseVotingRequest, context: Any
                          ) -> control.CloseVotingResponse:
        return await self._store.close_voting(request)

    async def EndShow(self, request: control.EndShowRequest, context: Any
                      ) -> control.EndShowResponse:
        return await self._store.end_show(request)


class ShowWatchServicer(watch_grpc.ShowWatchServiceServicer):
    """Everyone follows the show."""

    def __init__(self, store: ShowStore, hub: Hub) -> None:
        self._store = store
        self._hub = hub

    async def GetShowState(self, request: watch.GetShowStateRequest, context: Any
                           ) -> watch.GetShowStateResponse:
        return watch.GetShowStateResponse(snapshot=await self._store.get_snapshot(
            _episode_id(request.episode_id)))

    async def WatchShow(self, request: watch.WatchShowRequest,  # type: ignore[override]
                        context: Any) -> None:
        """Writes each WatchShowResponse already serialized (registered with
        `fanout.add_servicer(prebuilt=["WatchShow"])`): every watcher shares one serialization
        of an event and only its sequence is its own."""
        stream = self._hub.watch(_episode_id(request.episode_id))
        try:
            sequence = 0
            while (body := await stream.next()) is not None:
                sequence += 1
                await context.write(fanout.sequence_prefix(sequence) + body)
        finally:
            stream.close()


class ShowInternalServicer(internal_grpc.ShowInternalServiceServicer):
    """Other services of the mesh report to the show's clock."""

    def __init__(self, store: ShowStore) -> None:
        self._store = store

    async def PublishResultsReady(self, request: internal.PublishResultsReadyRequest,
                                  context: Any) -> internal.PublishResultsReadyResponse:
        return internal.PublishResultsReadyResponse(
            round=await self._store.publish_results_ready(request.round_id))


def _episode_id(value: str) -> str:
    if not value:
        raise invalid_argument(FieldViolation("episode_id", "is required"))
    return ids.parse(value, "episode_id")
