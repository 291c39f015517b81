"""The show's state machine, durable in PostgreSQL.

Every change runs in one transaction that locks the episode row, checks the transition, writes
it, bumps the episode's version and records the show event. Only after the commit are the
consequences applied outside PostgreSQL: the round's window mirrored into Redis for vote
admission, and the event published to every sync_svc replica. So PostgreSQL is the record of
what happened; Redis and the watchers follow it.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, timedelta
from typing import Any, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import grpc
from google.protobuf.message import Message
from psycopg import AsyncConnection

from runtime import ids, keys
from runtime import window as redis_window
from runtime.errors import ApiError, FieldViolation, invalid_argument
from runtime.idempotency import once, require_request_id
from runtime.protoconv import (
    CHANNEL_KEYS,
    datetime_to_ms,
    duration,
    duration_ms,
    ms_to_datetime,
    timestamp,
)
from runtime.storage import Storage, fetch_one
from runtime.window import Window
from sync_svc import store
from sync_svc.config import SyncConfig
from televote.sync.v1 import show_control_service_pb2 as control
from televote.sync.v1 import show_watch_service_pb2 as watch
from televote.sync.v1 import sync_types_pb2 as types

Row = dict[str, Any]
Connection = AsyncConnection[Row]
ResponseT = TypeVar("ResponseT", bound=Message)
EventType = watch.ShowEventType

#: Closed rounds whose Redis window the periodic repair still rewrites (`repair_windows`).
RECENTLY_CLOSED_MS = 5 * 60 * 1000


@dataclass
class Published:
    """What a committed change asks to be done outside PostgreSQL."""

    events: list[watch.WatchShowResponse] = field(default_factory=list)
    windows: list[Row] = field(default_factory=list)  # rounds whose Redis window to rewrite
    #: The windows' Redis fields, read in the change's own transaction (`_settle`).
    windows_read: list[tuple[str, Window]] = field(default_factory=list)


def failed(reason: str, message: str) -> ApiError:
    return ApiError(grpc.StatusCode.FAILED_PRECONDITION, reason, message)


def not_found(reason: str, message: str) -> ApiError:
    return ApiError(grpc.StatusCode.NOT_FOUND, reason, message)


class ShowStore:
    """Reads and changes shows; the one place that knows the show's rules."""

    def __init__(self, storage: Storage, config: SyncConfig) -> None:
        self._storage = storage
        self._config = config

    # -- running a change ------------------------------------------------------------------

    async def _change(self, method: str, request: Any, response_type: type[ResponseT],
                      perform: Callable[[Connection, Published, int], Awaitable[ResponseT]],
                      ) -> ResponseT:
        """Run one operator change exactly once, then apply what it published."""
        require_request_id(request.request_id)
        now_ms = await keys.server_time_ms(self._storage.redis)
        published = Published()
        async with self._storage.pool.connection() as connection, connection.transaction():
            response = await once(connection, method, request.request_id, request,
                                  response_type,
                                  lambda: perform(connection, published, now_ms))
            await self._settle(connection, published)
        await self.apply(published)
        return response

    async def _settle(self, connection: Connection, published: Published) -> None:
        """At the end of a change's transaction: the Redis fields of the windows it moved, from
        the rows as this transaction leaves them (no second connection, no later version)."""
        for round_row in published.windows:
            episode = await _one(connection, store.EPISODE_WINDOW_FIELDS,
                                 (round_row["episode_id"],))
            published.windows_read.append(
                (str(round_row["round_id"]), Window.of_round(round_row, episode)))

    async def apply(self, published: Published) -> None:
        """After the commit: mirror windows into Redis, then announce the events and mark
        their outbox rows published. A crash before the mark leaves the rows for
        `publish_outbox` on any replica; watchers drop what they already have (by
        episode_version), so an event announced twice is harmless."""
        for round_id, read in published.windows_read:
            await redis_window.write(self._storage.redis, round_id, read)
        for event in published.events:
            # Every replica's Hub (this one's too) hands it to its watchers.
            await self._storage.redis.publish(keys.show_channel(event.episode_id),
                                              event.SerializeToString())
        if published.events:
            async with self._storage.pool.connection() as connection:
                await connection.execute(
                    store.MARK_EVENTS_PUBLISHED,
                    ([e.episode_id for e in published.events],
                     [e.episode_version for e in published.events]))

    async def repair_windows(self, now_ms: int) -> int:
        """Re-apply the committed window of every open or recently closed round to Redis;
        returns how many shard copies were wrong.

        A change's own window write happens after its commit, so a crash in between leaves
        Redis behind PostgreSQL: an open round without a window, or an extension not
        applied (votes refused as closed until the round really closes). Every replica runs
        this periodically (the closer loop), so Redis converges within a period. Round and
        episode are read in one statement, so the fields carry the episode version they are
        true at, and the Redis write refuses them where a later state is already there
        (`keys.write_window`): a repair racing a close or an extension cannot undo it."""
        async with self._storage.pool.connection() as connection:
            cursor = await connection.execute(
                store.WINDOWS_TO_REPAIR,
                (ms_to_datetime(now_ms - RECENTLY_CLOSED_MS),))
            rows: list[Row] = await cursor.fetchall()
        repaired = 0
        for row in rows:
            repaired += await redis_window.write(self._storage.redis, str(row["round_id"]),
                                           Window.of_round(row, row))
        return repaired

    async def publish_outbox(self, older_than_ms: int, limit: int = 500) -> int:
        """Announce events committed at least `older_than_ms` ago and never marked published
        (their replica died between commit and publish); returns how many. Replicas share
        the work without waiting on each other (SKIP LOCKED)."""
        async with self._storage.pool.connection() as connection, connection.transaction():
            cursor = await connection.execute(
                store.UNPUBLISHED_EVENTS,
                (timedelta(milliseconds=older_than_ms), limit))
            rows: list[Any] = await cursor.fetchall()
            for row in rows:
                await self._storage.redis.publish(keys.show_channel(row["episode_id"]),
                                                  bytes(row["payload"]))
            if rows:
                await connection.execute(
                    store.MARK_EVENTS_PUBLISHED,
                    ([r["episode_id"] for r in rows], [r["version"] for r in rows]))
        return len(rows)


    async def _event(self, connection: Connection, published: Published, episode_id: str,
                     now_ms: int, event_type: int, **payload: Any) -> int:
        """Record an event of the episode and bump its version; returns the new version."""
        row = await _one(connection, store.BUMP_EPISODE_VERSION, (episode_id,))
        event = watch.WatchShowResponse(
            server_time=timestamp(ms_to_datetime(now_ms)), type=event_type,  # type: ignore[arg-type]
            episode_id=episode_id, episode_version=row["version"], **payload)
        await connection.execute(
            store.INSERT_SHOW_EVENT,
            (episode_id, row["version"], EventType.Name(event_type),  # type: ignore[arg-type]
             event.SerializeToString()))
        published.events.append(event)
        return int(row["version"])

    # -- setup -----------------------------------------------------------------------------

    async def create_show(self, request: control.CreateShowRequest) -> control.CreateShowResponse:
        if not request.name.strip():
            raise invalid_argument(FieldViolation("name", "must not be empty"))
        time_zone = request.time_zone or "Asia/Phnom_Penh"
        try:
            ZoneInfo(time_zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise invalid_argument(
                FieldViolation("time_zone", "must be an IANA time zone")) from None

        async def perform(connection: Connection, _: Published, __: int
                          ) -> control.CreateShowResponse:
            row = await _one(connection,
                             store.INSERT_SHOW,
                             (uuid.uuid4(), request.name.strip(), request.broadcaster,
                              time_zone))
            return control.CreateShowResponse(show=types.Show(
                show_id=str(row["show_id"]), name=row["name"], broadcaster=row["broadcaster"],
                time_zone=row["time_zone"], create_time=timestamp(row["created_at"])))

        return await self._change("CreateShow", request, control.CreateShowResponse, perform)

    async def create_episode(self, request: control.CreateEpisodeRequest
                             ) -> control.CreateEpisodeResponse:
        show_id = ids.parse(request.show_id, "show_id")
        problems = []
        if not request.title.strip():
            problems.append(FieldViolation("title", "must not be empty"))
        if not 0 <= request.free_vote_quota <= 1000:
            problems.append(FieldViolation("free_vote_quota", "must be 0..1000"))
        if not 0 <= request.rate_limit_per_minute <= 10_000:
            problems.append(FieldViolation("rate_limit_per_minute", "must be 0..10000"))
        if problems:
            raise invalid_argument(*problems)
        quota = 0 if request.disable_free_votes else (
            request.free_vote_quota or self._config.sync_default_free_votes)
        rate = request.rate_limit_per_minute or self._config.sync_default_rate_limit_per_minute
        scheduled = (request.scheduled_start_time.ToDatetime(UTC)
                     if request.HasField("scheduled_start_time") else None)

        async def perform(connection: Connection, _: Published, __: int
                          ) -> control.CreateEpisodeResponse:
            if await fetch_one(connection, store.SHOW_EXISTS,
                                (show_id,)) is None:
                raise not_found("SHOW_NOT_FOUND", f"no show {show_id}")
            row = await _one(connection,
                             store.INSERT_EPISODE,
                             (uuid.uuid4(), show_id, request.title.strip(), scheduled, quota,
                              rate))
            return control.CreateEpisodeResponse(episode=episode_message(row))

        return await self._change("CreateEpisode", request, control.CreateEpisodeResponse,
                                  perform)

    async def add_contestant(self, request: control.AddContestantRequest
                             ) -> control.AddContestantResponse:
        episode_id = ids.parse(request.episode_id, "episode_id")
        problems = []
        if not request.name.strip():
            problems.append(FieldViolation("name", "must not be empty"))
        if not 1 <= request.sms_number <= 12:
            problems.append(FieldViolation("sms_number", "must be 1..12"))
        if request.photo_url and not request.photo_url.startswith("https://"):
            problems.append(FieldViolation("photo_url", "must be an https URL"))
        if problems:
            raise invalid_argument(*problems)

        async def perform(connection: Connection, _: Published, __: int
                          ) -> control.AddContestantResponse:
            episode = await self._lock_episode(connection, episode_id)
            if episode["state"] == "ENDED":
                raise failed("SHOW_ALREADY_ENDED", "the episode has ended")
            taken = await fetch_one(
                connection, store.SMS_NUMBER_TAKEN,
                (episode_id, request.sms_number))
            if taken:
                raise ApiError(grpc.StatusCode.ALREADY_EXISTS, "SMS_NUMBER_TAKEN",
                               f"sms number {request.sms_number} is taken in this episode")
            row = await _one(connection,
                             store.INSERT_CONTESTANT,
                             (uuid.uuid4(), episode_id, request.name.strip(), request.photo_url,
                              request.sms_number))
            return control.AddContestantResponse(contestant=contestant_message(row))

        return await self._change("AddContestant", request, control.AddContestantResponse,
                                  perform)

    async def create_round(self, request: control.CreateRoundRequest
                           ) -> control.CreateRoundResponse:
        episode_id = ids.parse(request.episode_id, "episode_id")
        contestant_ids = [ids.parse(value, "contestant_ids") for value in request.contestant_ids]
        problems = []
        if len(contestant_ids) < 2:
            problems.append(FieldViolation("contestant_ids", "a round needs 2 or more"))
        if len(set(contestant_ids)) != len(contestant_ids):
            problems.append(FieldViolation("contestant_ids", "listed twice"))
        window = (duration_ms(request.window_duration) if request.HasField("window_duration")
                  else self._config.sync_default_window_ms)
        problems += self._window_problems(window, "window_duration")
        if request.free_vote_cap < 0:
            problems.append(FieldViolation("free_vote_cap", "must not be negative"))
        offsets = dict.fromkeys(keys.CHANNELS, 0)
        seen = set()
        for index, close in enumerate(request.channel_closes):
            name = CHANNEL_KEYS.get(close.channel)
            if name is None or name in seen:
                problems.append(FieldViolation(f"channel_closes[{index}].channel",
                                               "must be APP, WEB or SMS, each at most once"))
                continue
            seen.add(name)
            offset = duration_ms(close.offset)
            if abs(offset) > self._config.sync_max_channel_offset_ms:
                problems.append(FieldViolation(f"channel_closes[{index}].offset",
                                               "must be within 5 minutes of the close"))
            offsets[name] = offset
        if problems:
            raise invalid_argument(*problems)
        visibility = request.visibility or types.RESULTS_VISIBILITY_PUBLIC_COUNTS

        async def perform(connection: Connection, _: Published, __: int
                          ) -> control.CreateRoundResponse:
            episode = await self._lock_episode(connection, episode_id)
            if episode["state"] == "ENDED":
                raise failed("SHOW_ALREADY_ENDED", "the episode has ended")
            cursor = await connection.execute(
                store.EPISODE_CONTESTANT_IDS, (episode_id,))
            known = {str(row["contestant_id"]) for row in await cursor.fetchall()}
            missing = [c for c in contestant_ids if c not in known]
            if missing:
                raise failed("INVALID_CONTESTANT", f"not in this episode: {', '.join(missing)}")
            row = await _one(
                connection,
                store.INSERT_ROUND,
                (uuid.uuid4(), episode_id, request.name or "Voting", contestant_ids, window,
                 request.free_vote_cap, types.ResultsVisibility.Name(visibility),
                 offsets["app"], offsets["web"], offsets["sms"]))
            return control.CreateRoundResponse(round=round_message(row))

        return await self._change("CreateRound", request, control.CreateRoundResponse, perform)

    def _window_problems(self, window_ms: int, field_name: str) -> list[FieldViolation]:
        low, high = self._config.sync_min_window_ms, self._config.sync_max_window_ms
        if low <= window_ms <= high:
            return []
        return [FieldViolation(field_name, f"must be between {low / 1000:g} s and "
                                           f"{high / 3_600_000:g} h")]

    # -- show control ----------------------------------------------------------------------

    async def start_show(self, request: control.StartShowRequest) -> control.StartShowResponse:
        episode_id = ids.parse(request.episode_id, "episode_id")

        async def perform(connection: Connection, published: Published, now_ms: int
                          ) -> control.StartShowResponse:
            return control.StartShowResponse(
                episode=await self._start_show(connection, published, episode_id, now_ms))

        return await self._change("StartShow", request, control.StartShowResponse, perform)

    async def _start_show(self, connection: Connection, published: Published, episode_id: str,
                          now_ms: int) -> types.Episode:
        episode = await self._lock_episode(connection, episode_id)
        if episode["state"] == "LIVE":
            raise failed("SHOW_ALREADY_STARTED", "the episode is already live")
        if episode["state"] == "ENDED":
            raise failed("SHOW_ALREADY_ENDED", "the episode has ended")
        await connection.execute(store.START_EPISODE, (ms_to_datetime(now_ms), episode_id))
        await self._event(connection, published, episode_id, now_ms,
                          EventType.SHOW_EVENT_TYPE_STATE_CHANGED,
                          state=types.SHOW_STATE_LIVE)
        return episode_message(await self._episode(connection, episode_id))

    async def start_performance(self, request: control.StartPerformanceRequest
                                ) -> control.StartPerformanceResponse:
        episode_id = ids.parse(request.episode_id, "episode_id")
        contestant_id = ids.parse(request.contestant_id, "contestant_id")

        async def perform(connection: Connection, published: Published, now_ms: int
                          ) -> control.StartPerformanceResponse:
            return control.StartPerformanceResponse(performance=await self._start_performance(
                connection, published, episode_id, contestant_id, request.song_title,
                request.song_artist, now_ms))

        return await self._change("StartPerformance", request,
                                  control.StartPerformanceResponse, perform)

    async def _start_performance(self, connection: Connection, published: Published,
                                 episode_id: str, contestant_id: str, song_title: str,
                                 song_artist: str, now_ms: int) -> types.Performance:
        episode = await self._lock_episode(connection, episode_id)
        self._require_live(episode)
        if await fetch_one(connection, store.CONTESTANT_IN_EPISODE,
                            (contestant_id, episode_id)) is None:
            raise not_found("CONTESTANT_NOT_FOUND", f"no contestant {contestant_id} here")
        if await self._on_stage(connection, episode_id) is not None:
            raise failed("PERFORMANCE_IN_PROGRESS", "end the current performance first")
        row = await _one(connection,
                         store.INSERT_PERFORMANCE,
                         (uuid.uuid4(), episode_id, contestant_id, song_title, song_artist,
                          ms_to_datetime(now_ms)))
        performance = performance_message(row)
        await self._event(connection, published, episode_id, now_ms,
                          EventType.SHOW_EVENT_TYPE_PERFORMANCE_STARTED, performance=performance)
        return performance

    async def end_performance(self, request: control.EndPerformanceRequest
                              ) -> control.EndPerformanceResponse:
        episode_id = ids.parse(request.episode_id, "episode_id")

        async def perform(connection: Connection, published: Published, now_ms: int
                          ) -> control.EndPerformanceResponse:
            await self._lock_episode(connection, episode_id)
            performance = await self._end_performance(connection, published, episode_id, now_ms)
            if performance is None:
                raise failed("NO_PERFORMANCE_IN_PROGRESS", "nobody is on stage")
            return control.EndPerformanceResponse(performance=performance)

        return await self._change("EndPerformance", request, control.EndPerformanceResponse,
                                  perform)

    async def _end_performance(self, connection: Connection, published: Published,
                               episode_id: str, now_ms: int) -> types.Performance | None:
        if await self._on_stage(connection, episode_id) is None:
            return None
        row = await _one(connection, store.END_PERFORMANCE, (ms_to_datetime(now_ms), episode_id))
        performance = performance_message(row)
        await self._event(connection, published, episode_id, now_ms,
                          EventType.SHOW_EVENT_TYPE_PERFORMANCE_ENDED, performance=performance)
        return performance

    async def open_voting(self, request: control.OpenVotingRequest
                          ) -> control.OpenVotingResponse:
        round_id = ids.parse(request.round_id, "round_id")
        window = duration_ms(request.duration) if request.HasField("duration") else None
        if window is not None and (problems := self._window_problems(window, "duration")):
            raise invalid_argument(*problems)

        async def perform(connection: Connection, published: Published, now_ms: int
                          ) -> control.OpenVotingResponse:
            return control.OpenVotingResponse(round=await self._open_voting(
                connection, published, round_id, window, now_ms))

        return await self._change("OpenVoting", request, control.OpenVotingResponse, perform)

    async def _open_voting(self, connection: Connection, published: Published, round_id: str,
                           window_ms: int | None, now_ms: int) -> types.Round:
        round_row = await self._round(connection, round_id)
        episode = await self._lock_episode(connection, str(round_row["episode_id"]))
        self._require_live(episode)
        round_row = await self._round(connection, round_id)  # re-read under the episode lock
        if round_row["state"] == "OPEN":
            raise failed("VOTING_ALREADY_OPEN", "this round is already open")
        if round_row["state"] != "PENDING":
            raise failed("ROUND_ALREADY_CLOSED", "a round opens once")
        if await fetch_one(connection, store.OPEN_ROUND_EXISTS, (episode["episode_id"],)):
            raise failed("VOTING_ALREADY_OPEN", "another round of this episode is open")
        window = window_ms or round_row["window_ms"]
        closes_ms = now_ms + window
        lines_close_ms = closes_ms + max(
            round_row[f"{channel}_close_offset_ms"] for channel in keys.CHANNELS)
        round_row = await _one(
            connection,
            store.OPEN_ROUND,
            (window, ms_to_datetime(now_ms), ms_to_datetime(closes_ms),
             ms_to_datetime(max(lines_close_ms, closes_ms)), round_id))
        message = round_message(round_row)
        await self._event(connection, published, str(episode["episode_id"]), now_ms,
                          EventType.SHOW_EVENT_TYPE_VOTING_OPEN, round=message)
        published.windows.append(round_row)
        return message

    async def extend_voting(self, request: control.ExtendVotingRequest
                            ) -> control.ExtendVotingResponse:
        round_id = ids.parse(request.round_id, "round_id")
        extension = duration_ms(request.extension)
        if not 0 < extension <= 3_600_000:
            raise invalid_argument(FieldViolation("extension", "must be more than 0, up to 1 h"))

        async def perform(connection: Connection, published: Published, now_ms: int
                          ) -> control.ExtendVotingResponse:
            round_row = await self._round(connection, round_id)
            episode_id = str(round_row["episode_id"])
            await self._lock_episode(connection, episode_id)
            round_row = await self._round(connection, round_id)
            self._require_open(round_row)
            # The extension is judged against the close it moves: a round already past its
            # close (about to be closed by the closer) cannot be revived.
            if datetime_to_ms(round_row["lines_close_at"]) <= now_ms:
                raise failed("ROUND_ALREADY_CLOSED", "the round has closed")
            round_row = await _one(
                connection,
                store.EXTEND_ROUND,
                (timedelta(milliseconds=extension), timedelta(milliseconds=extension), extension,
                 round_id))
            message = round_message(round_row)
            await self._event(connection, published, episode_id, now_ms,
                              EventType.SHOW_EVENT_TYPE_VOTING_EXTENDED, round=message)
            published.windows.append(round_row)
            return control.ExtendVotingResponse(round=message)

        return await self._change("ExtendVoting", request, control.ExtendVotingResponse, perform)

    async def close_voting(self, request: control.CloseVotingRequest
                           ) -> control.CloseVotingResponse:
        round_id = ids.parse(request.round_id, "round_id")

        async def perform(connection: Connection, published: Published, now_ms: int
                          ) -> control.CloseVotingResponse:
            round_row = await self._round(connection, round_id)
            await self._lock_episode(connection, str(round_row["episode_id"]))
            round_row = await self._round(connection, round_id)
            self._require_open(round_row)
            return control.CloseVotingResponse(round=await self._close_round(
                connection, published, round_row, now_ms, "OPERATOR"))

        return await self._change("CloseVoting", request, control.CloseVotingResponse, perform)

    async def _close_round(self, connection: Connection, published: Published, round_row: Row,
                           now_ms: int, cause: str) -> types.Round:
        """Close an open round now (or at its own close time, if that came first).

        Redis is closed first, inside the transaction that holds the episode lock, and the
        close time recorded is the moment Redis closed: so every vote admission acknowledged
        lies inside the recorded window and the final result counts it. Should the commit
        then fail, the round is closed for votes but still OPEN here, and a retry finishes
        the close: the safe direction for a live show.
        """
        redis_closed_ms = await keys.close_window(self._storage.redis, str(round_row["round_id"]))
        closed_at = min(ms_to_datetime(max(now_ms, redis_closed_ms)), round_row["lines_close_at"])
        round_row = await _one(
            connection,
            store.CLOSE_ROUND,
            (closed_at, cause, round_row["round_id"]))
        message = round_message(round_row)
        await self._event(connection, published, str(round_row["episode_id"]), now_ms,
                          EventType.SHOW_EVENT_TYPE_VOTING_CLOSED, round=message)
        published.windows.append(round_row)
        return message

    async def end_show(self, request: control.EndShowRequest) -> control.EndShowResponse:
        episode_id = ids.parse(request.episode_id, "episode_id")

        async def perform(connection: Connection, published: Published, now_ms: int
                          ) -> control.EndShowResponse:
            return control.EndShowResponse(
                episode=await self._end_show(connection, published, episode_id, now_ms))

        return await self._change("EndShow", request, control.EndShowResponse, perform)

    async def _end_show(self, connection: Connection, published: Published, episode_id: str,
                        now_ms: int) -> types.Episode:
        episode = await self._lock_episode(connection, episode_id)
        self._require_live(episode)
        open_round = await fetch_one(connection, store.OPEN_ROUND_OF_EPISODE, (episode_id,))
        if open_round is not None:
            await self._close_round(connection, published, open_round, now_ms, "SHOW_END")
        await self._end_performance(connection, published, episode_id, now_ms)
        await connection.execute(store.END_EPISODE, (ms_to_datetime(now_ms), episode_id))
        await self._event(connection, published, episode_id, now_ms,
                          EventType.SHOW_EVENT_TYPE_STATE_CHANGED, state=types.SHOW_STATE_ENDED)
        return episode_message(await self._episode(connection, episode_id))

    async def apply_cue(self, request: control.ApplyCueRequest) -> control.ApplyCueResponse:
        """A broadcast automation cue: the same transition as its explicit RPC."""
        episode_id = ids.parse(request.episode_id, "episode_id")
        cue = request.type
        if cue == control.CUE_TYPE_PERFORMANCE_START:
            contestant_id = ids.parse(request.contestant_id, "contestant_id")
        round_id = ids.parse(request.round_id, "round_id") if request.round_id else None
        window = (duration_ms(request.voting_duration)
                  if request.HasField("voting_duration") else None)
        if cue == control.CUE_TYPE_VOTING_OPEN and window is not None and (
                problems := self._window_problems(window, "voting_duration")):
            raise invalid_argument(*problems)
        if cue not in control.CueType.values() or cue == control.CUE_TYPE_UNSPECIFIED:
            raise invalid_argument(FieldViolation("type", "must be a known cue type"))

        async def perform(connection: Connection, published: Published, now_ms: int
                          ) -> control.ApplyCueResponse:
            if cue == control.CUE_TYPE_SHOW_START:
                await self._start_show(connection, published, episode_id, now_ms)
            elif cue == control.CUE_TYPE_PERFORMANCE_START:
                await self._start_performance(connection, published, episode_id, contestant_id,
                                              request.song_title, request.song_artist, now_ms)
            elif cue == control.CUE_TYPE_PERFORMANCE_END:
                await self._lock_episode(connection, episode_id)
                if await self._end_performance(connection, published, episode_id,
                                               now_ms) is None:
                    raise failed("NO_PERFORMANCE_IN_PROGRESS", "nobody is on stage")
            elif cue == control.CUE_TYPE_VOTING_OPEN:
                target = round_id or await self._next_pending_round(connection, episode_id)
                await self._open_voting(connection, published, target, window, now_ms)
            elif cue == control.CUE_TYPE_VOTING_CLOSE:
                await self._lock_episode(connection, episode_id)
                open_round = await fetch_one(
                    connection, store.OPEN_ROUND_OF_EPISODE,
                    (episode_id,))
                if open_round is None:
                    raise failed("NO_OPEN_ROUND", "no round of this episode is open")
                await self._close_round(connection, published, open_round, now_ms, "CUE")
            else:
                await self._end_show(connection, published, episode_id, now_ms)
            return control.ApplyCueResponse(
                snapshot=await self.snapshot(connection, episode_id, now_ms))

        return await self._change("ApplyCue", request, control.ApplyCueResponse, perform)

    async def _next_pending_round(self, connection: Connection, episode_id: str) -> str:
        row = await fetch_one(connection, store.NEXT_PENDING_ROUND,
                               (episode_id,))
        if row is None:
            raise failed("NO_PENDING_ROUND", "the episode has no round waiting to open")
        return str(row["round_id"])

    # -- viewers ---------------------------------------------------------------------------

    async def record_viewers(self, sample_ms: int, replica: str,
                             viewers: dict[str, int]) -> None:
        """This replica's open WatchShow streams per episode at the instant `sample_ms`."""
        async with self._storage.pool.connection() as connection:
            await connection.execute(store.RECORD_VIEWERS, (
                sample_ms, replica, list(viewers), list(viewers.values())))

    # -- closing by the clock --------------------------------------------------------------

    async def next_close_ms(self) -> int | None:
        """When the next open round's lines close, if any round is open."""
        async with self._storage.pool.connection() as connection:
            row = await _one(connection, store.NEXT_LINES_CLOSE, ())
        return None if row["due"] is None else datetime_to_ms(row["due"])

    async def close_due_rounds(self, now_ms: int) -> int:
        """Close every open round whose lines have closed by `now_ms`; returns how many.

        Any number of replicas may call this at once: the conditional UPDATE inside
        `_close_round` lets exactly one of them close each round and announce it.
        """
        async with self._storage.pool.connection() as connection:
            cursor = await connection.execute(
                store.ROUNDS_DUE_TO_CLOSE, (ms_to_datetime(now_ms),))
            due = await cursor.fetchall()
        closed = 0
        for row in due:
            published = Published()
            async with self._storage.pool.connection() as connection, connection.transaction():
                await self._lock_episode(connection, str(row["episode_id"]))
                round_row = await self._round(connection, str(row["round_id"]))
                if round_row["state"] != "OPEN":
                    continue  # another replica closed it first
                await self._close_round(connection, published, round_row, now_ms, "AUTO")
                await self._settle(connection, published)
            await self.apply(published)
            closed += 1
        return closed

    async def publish_results_ready(self, round_id: str) -> types.Round:
        """results_svc stored a round's final result: mark it FINALIZED and announce it once."""
        round_id = ids.parse(round_id, "round_id")
        published = Published()
        now_ms = await keys.server_time_ms(self._storage.redis)
        async with self._storage.pool.connection() as connection, connection.transaction():
            round_row = await self._round(connection, round_id)
            await self._lock_episode(connection, str(round_row["episode_id"]))
            round_row = await self._round(connection, round_id)
            if round_row["state"] == "FINALIZED":
                return round_message(round_row)  # a retry: announced already
            if round_row["state"] == "PENDING":
                raise failed("NO_OPEN_ROUND", "the round never opened")
            if round_row["state"] == "OPEN":
                raise failed("ROUND_NOT_CLOSED", "the round is still open")
            round_row = await _one(connection, store.FINALIZE_ROUND, (round_id,))
            message = round_message(round_row)
            await self._event(connection, published, str(round_row["episode_id"]), now_ms,
                              EventType.SHOW_EVENT_TYPE_RESULTS_READY, round=message)
            await self._settle(connection, published)
        await self.apply(published)
        return message

    # -- reading ---------------------------------------------------------------------------

    async def get_snapshot(self, episode_id: str) -> types.ShowSnapshot:
        episode_id = ids.parse(episode_id, "episode_id")
        now_ms = await keys.server_time_ms(self._storage.redis)
        async with self._storage.pool.connection() as connection:
            return await self.snapshot(connection, episode_id, now_ms)

    async def snapshot(self, connection: Connection, episode_id: str, now_ms: int
                       ) -> types.ShowSnapshot:
        episode = await self._episode(connection, episode_id)
        snapshot = types.ShowSnapshot(episode=episode_message(episode),
                                      server_time=timestamp(ms_to_datetime(now_ms)),
                                      episode_version=episode["version"])
        on_stage = await self._on_stage(connection, episode_id)
        if on_stage is not None:
            snapshot.current_performance.CopyFrom(performance_message(on_stage))
        current = await fetch_one(
            connection, store.CURRENT_ROUND, (episode_id,))
        if current is not None:
            snapshot.current_round.CopyFrom(round_message(current))
            cursor = await connection.execute(
                store.CONTESTANTS_BY_ID,
                (current["contestant_ids"],))
            by_id = {row["contestant_id"]: row for row in await cursor.fetchall()}
            snapshot.round_contestants.extend(
                contestant_message(by_id[c]) for c in current["contestant_ids"] if c in by_id)
            if current["state"] == "OPEN":
                remaining = max(0, datetime_to_ms(current["closes_at"]) - now_ms)
                snapshot.time_remaining.CopyFrom(duration(remaining))
        return snapshot

    async def episode_finished(self, episode_id: str) -> bool:
        """Ended, and no closed round still waits for its result: nothing more to announce."""
        async with self._storage.pool.connection() as connection:
            row = await _one(connection,
                             store.EPISODE_FINISHED, (episode_id,))
        return bool(row["finished"])

    async def _episode(self, connection: Connection, episode_id: str) -> Row:
        row = await fetch_one(connection, store.EPISODE,
                               (episode_id,))
        if row is None:
            raise not_found("EPISODE_NOT_FOUND", f"no episode {episode_id}")
        return row

    async def _lock_episode(self, connection: Connection, episode_id: str) -> Row:
        """The episode row, locked: changes to one episode and its rounds happen one by one."""
        row = await fetch_one(connection, store.EPISODE_FOR_UPDATE, (episode_id,))
        if row is None:
            raise not_found("EPISODE_NOT_FOUND", f"no episode {episode_id}")
        return row

    async def _round(self, connection: Connection, round_id: str) -> Row:
        row = await fetch_one(connection, store.ROUND,
                               (round_id,))
        if row is None:
            raise not_found("ROUND_NOT_FOUND", f"no round {round_id}")
        return row

    async def _on_stage(self, connection: Connection, episode_id: str) -> Row | None:
        return await fetch_one(connection, store.CURRENT_PERFORMANCE, (episode_id,))

    @staticmethod
    def _require_live(episode: Row) -> None:
        if episode["state"] == "SCHEDULED":
            raise failed("SHOW_NOT_STARTED", "the episode is not on air yet")
        if episode["state"] == "ENDED":
            raise failed("SHOW_ALREADY_ENDED", "the episode has ended")

    @staticmethod
    def _require_open(round_row: Row) -> None:
        if round_row["state"] == "PENDING":
            raise failed("NO_OPEN_ROUND", "the round has not opened")
        if round_row["state"] != "OPEN":
            raise failed("ROUND_ALREADY_CLOSED", "the round has closed")


# -- rows to messages --------------------------------------------------------------------------

def episode_message(row: Row) -> types.Episode:
    return types.Episode(
        episode_id=str(row["episode_id"]), show_id=str(row["show_id"]), title=row["title"],
        scheduled_start_time=timestamp(row["scheduled_start_time"]),
        state=types.ShowState.Value(f"SHOW_STATE_{row['state']}"),
        free_vote_quota=row["free_vote_quota"],
        rate_limit_per_minute=row["rate_limit_per_minute"],
        start_time=timestamp(row["started_at"]), end_time=timestamp(row["ended_at"]),
        create_time=timestamp(row["created_at"]))


def contestant_message(row: Row) -> types.Contestant:
    return types.Contestant(
        contestant_id=str(row["contestant_id"]), episode_id=str(row["episode_id"]),
        name=row["name"], photo_url=row["photo_url"], sms_number=row["sms_number"])


def performance_message(row: Row) -> types.Performance:
    return types.Performance(
        performance_id=str(row["performance_id"]), episode_id=str(row["episode_id"]),
        contestant_id=str(row["contestant_id"]), song_title=row["song_title"],
        song_artist=row["song_artist"], start_time=timestamp(row["started_at"]),
        end_time=timestamp(row["ended_at"]))


def round_message(row: Row) -> types.Round:
    message = types.Round(
        round_id=str(row["round_id"]), episode_id=str(row["episode_id"]), name=row["name"],
        contestant_ids=[str(c) for c in row["contestant_ids"]],
        window_duration=duration(row["window_ms"]), free_vote_cap=row["free_vote_cap"],
        visibility=types.ResultsVisibility.Value(row["visibility"]),
        state=types.RoundState.Value(f"ROUND_STATE_{row['state']}"),
        opens_at=timestamp(row["opens_at"]), closes_at=timestamp(row["closes_at"]),
        create_time=timestamp(row["created_at"]))
    for channel, name in CHANNEL_KEYS.items():
        offset = row[f"{name}_close_offset_ms"]
        close = types.ChannelClose(channel=channel, offset=duration(offset))
        if row["closes_at"] is not None:
            moment = row["closes_at"] + timedelta(milliseconds=offset)
            if row["closed_at"] is not None:
                moment = min(moment, row["closed_at"])
            close.closes_at.FromDatetime(moment)
        message.channel_closes.append(close)
    return message


async def _one(connection: Connection, query: str, params: tuple[Any, ...]) -> Row:
    row: Row | None = await fetch_one(connection, query, params)
    assert row is not None, query
    return row


