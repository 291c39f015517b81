"""Show sync: cues, the event sequence watchers see, illegal transitions, the Redis window."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import grpc
import pytest

from ops.stack import Stack
from runtime import keys
from runtime.errors import error_info
from runtime.storage import Storage, create_redis
from sync_svc.config import SyncConfig
from sync_svc.show import Published, ShowStore
from televote.sync.v1 import show_control_service_pb2 as control
from televote.sync.v1 import show_watch_service_pb2 as watch
from televote.sync.v1 import show_watch_service_pb2_grpc as watch_grpc
from televote.sync.v1 import sync_types_pb2 as types
from tests.sync_support import GrpcWatcher, Operator, SseWatcher, request_id, seconds

Cue = control.CueType
EXPECTED_SHOW = [
    "SNAPSHOT", "STATE_CHANGED", "PERFORMANCE_STARTED", "PERFORMANCE_ENDED", "VOTING_OPEN",
    # a 9 s window with the test ticks: TIME_UPDATE every 4 s, WARNING at 6 s, COUNTDOWN from 3
    "TIME_UPDATE", "WARNING", "TIME_UPDATE", "COUNTDOWN", "COUNTDOWN", "COUNTDOWN",
    "VOTING_CLOSED", "STATE_CHANGED",
]


@pytest.fixture
def operator(stack: Stack, edge_channel: grpc.aio.Channel) -> Operator:
    return Operator(stack, edge_channel)


async def _refusal(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call  # type: ignore[misc]
    info = error_info(refused.value)
    return refused.value.code(), info.reason if info else ""


async def test_a_full_show_run_through_cues_reaches_watchers_over_grpc_and_sse(
        stack: Stack, operator: Operator, edge_channel: grpc.aio.Channel) -> None:
    episode_id, contestants = await operator.episode_with_contestants()
    round_ = (await operator.call("CreateRound", episode_id=episode_id, name="Final vote",
                                  contestant_ids=contestants)).round
    native = GrpcWatcher().start(edge_channel, episode_id)  # anonymous viewer, no token
    sse = SseWatcher().start(stack.edge_target, f"/v1/episodes/{episode_id}/events")
    await native.wait_for(watch.SHOW_EVENT_TYPE_SNAPSHOT)
    await sse.wait_until(lambda _: True, timeout=5)  # its snapshot: the stream is open

    await operator.cue(episode_id, Cue.CUE_TYPE_SHOW_START)
    await operator.cue(episode_id, Cue.CUE_TYPE_PERFORMANCE_START, contestant_id=contestants[0],
                       song_title="Someone Like You")
    await operator.cue(episode_id, Cue.CUE_TYPE_PERFORMANCE_END)
    opened = await operator.cue(episode_id, Cue.CUE_TYPE_VOTING_OPEN,
                                voting_duration=seconds(9))
    assert opened.snapshot.current_round.round_id == round_.round_id
    await native.wait_for(watch.SHOW_EVENT_TYPE_VOTING_CLOSED, timeout=20)
    await operator.cue(episode_id, Cue.CUE_TYPE_SHOW_END)
    await native.wait_for(watch.SHOW_EVENT_TYPE_STATE_CHANGED, count=2)
    async with asyncio.timeout(5):  # the edge's stream may run a little behind the native one
        while len(sse.events) < len(EXPECTED_SHOW):
            sse.arrived.clear()
            await sse.arrived.wait()
    await native.stop()
    await sse.stop()

    assert native.types() == EXPECTED_SHOW
    assert sse.types() == EXPECTED_SHOW
    assert [e.sequence for e in native.events] == list(range(1, len(EXPECTED_SHOW) + 1))
    countdown = [e.timing.seconds_remaining for e in native.events if e.HasField("timing")]
    assert countdown == [8, 6, 4, 3, 2, 1]
    closed = next(e for e in native.events if e.type == watch.SHOW_EVENT_TYPE_VOTING_CLOSED)
    assert closed.round.state == types.ROUND_STATE_CLOSED
    # Every event carries the server clock, so clients can correct their own.
    assert all(e.server_time.seconds > 0 for e in native.events)
    assert all("serverTime" in e for e in sse.events)


async def test_illegal_transitions_are_refused_with_reasons_and_change_nothing(
        stack: Stack, operator: Operator) -> None:
    episode_id, contestants = await operator.episode_with_contestants()
    first = (await operator.call("CreateRound", episode_id=episode_id,
                                 contestant_ids=contestants[:2])).round
    second = (await operator.call("CreateRound", episode_id=episode_id,
                                  contestant_ids=contestants[1:])).round

    async def refused(expected: str, call: object) -> None:
        before = await _version(stack, episode_id)
        code, reason = await _refusal(call)
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, expected)
        assert await _version(stack, episode_id) == before

    await refused("SHOW_NOT_STARTED", operator.cue(episode_id, Cue.CUE_TYPE_VOTING_OPEN))
    await refused("SHOW_NOT_STARTED", operator.cue(
        episode_id, Cue.CUE_TYPE_PERFORMANCE_START, contestant_id=contestants[0]))
    await refused("NO_OPEN_ROUND", operator.cue(episode_id, Cue.CUE_TYPE_VOTING_CLOSE))
    await operator.cue(episode_id, Cue.CUE_TYPE_SHOW_START)
    await refused("SHOW_ALREADY_STARTED", operator.cue(episode_id, Cue.CUE_TYPE_SHOW_START))
    await refused("NO_PERFORMANCE_IN_PROGRESS",
                  operator.cue(episode_id, Cue.CUE_TYPE_PERFORMANCE_END))
    await operator.cue(episode_id, Cue.CUE_TYPE_PERFORMANCE_START, contestant_id=contestants[0])
    await refused("PERFORMANCE_IN_PROGRESS", operator.cue(
        episode_id, Cue.CUE_TYPE_PERFORMANCE_START, contestant_id=contestants[1]))
    await operator.call("OpenVoting", round_id=first.round_id, duration=seconds(60))
    await refused("VOTING_ALREADY_OPEN", operator.cue(episode_id, Cue.CUE_TYPE_VOTING_OPEN))
    await refused("VOTING_ALREADY_OPEN", operator.call("OpenVoting", round_id=second.round_id))
    await refused("NO_OPEN_ROUND", operator.call("CloseVoting", round_id=second.round_id))
    await operator.call("CloseVoting", round_id=first.round_id)
    await refused("ROUND_ALREADY_CLOSED", operator.call("OpenVoting", round_id=first.round_id))
    await refused("ROUND_ALREADY_CLOSED", operator.call("CloseVoting", round_id=first.round_id))
    await refused("ROUND_ALREADY_CLOSED", operator.call(
        "ExtendVoting", round_id=first.round_id, extension=seconds(30)))
    await operator.call("EndShow", episode_id=episode_id)
    await refused("SHOW_ALREADY_ENDED", operator.cue(episode_id, Cue.CUE_TYPE_SHOW_START))
    await refused("SHOW_ALREADY_ENDED", operator.cue(episode_id, Cue.CUE_TYPE_SHOW_END))
    await refused("SHOW_ALREADY_ENDED", operator.call("OpenVoting", round_id=second.round_id))

    _, reason = await _refusal(operator.call(
        "AddContestant", episode_id=episode_id, name="Late", sms_number=9))
    assert reason == "SHOW_ALREADY_ENDED"


async def test_bad_input_gets_reasons_and_field_violations(
        stack: Stack, operator: Operator) -> None:
    episode_id, contestants = await operator.episode_with_contestants(2)
    cases = [
        operator.call("CreateShow", name=""),
        operator.call("CreateShow", name="x", request_id="not-a-uuid"),
        operator.call("AddContestant", episode_id=episode_id, name="A", sms_number=13),
        operator.call("AddContestant", episode_id=episode_id, name="A", sms_number=3,
                      photo_url="http://insecure.example/a.jpg"),
        operator.call("CreateRound", episode_id=episode_id, contestant_ids=contestants[:1]),
        operator.call("CreateRound", episode_id=episode_id, contestant_ids=contestants,
                      window_duration=seconds(5 * 3600)),
        operator.call("CreateRound", episode_id="nope", contestant_ids=contestants),
        operator.cue(episode_id, Cue.CUE_TYPE_UNSPECIFIED),
    ]
    for case in cases:
        assert await _refusal(case) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
    assert await _refusal(operator.call(
        "AddContestant", episode_id=episode_id, name="Twin", sms_number=1)) == (
        grpc.StatusCode.ALREADY_EXISTS, "SMS_NUMBER_TAKEN")
    assert await _refusal(operator.call(
        "CreateEpisode", show_id="00000000-0000-0000-0000-000000000000", title="x")) == (
        grpc.StatusCode.NOT_FOUND, "SHOW_NOT_FOUND")

    # Through the edge as JSON: a 400 whose body carries the reason.
    token = operator.metadata[0][1]
    request = urllib.request.Request(
        f"{stack.edge_url}/v1/episodes/{episode_id}/contestants", method="POST",
        data=json.dumps({"requestId": request_id(), "name": "A", "smsNumber": 40}).encode(),
        headers={"authorization": token, "content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as http_error:
        await asyncio.to_thread(urllib.request.urlopen, request, timeout=5)
    assert http_error.value.code == 400
    assert "INVALID_REQUEST" in http_error.value.read().decode()


async def test_retries_with_one_request_id_change_state_once(operator: Operator) -> None:
    same = request_id()
    first = await operator.call("CreateShow", name="Retry show", request_id=same)
    again = await asyncio.gather(*(operator.call("CreateShow", name="Retry show",
                                                 request_id=same) for _ in range(5)))
    assert {reply.show.show_id for reply in again} == {first.show.show_id}
    assert await _refusal(operator.call("CreateShow", name="Other", request_id=same)) == (
        grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_MISMATCH")


async def test_the_open_window_is_mirrored_into_every_shard_and_closed_there(
        stack: Stack, operator: Operator) -> None:
    episode_id, contestants = await operator.episode_with_contestants(2)
    round_ = (await operator.call("CreateRound", episode_id=episode_id,
                                  contestant_ids=contestants,
                                  channel_closes=[types.ChannelClose(
                                      channel=3, offset=seconds(90))])).round  # SMS grace
    await operator.call("StartShow", episode_id=episode_id)
    opened = (await operator.call("OpenVoting", round_id=round_.round_id,
                                  duration=seconds(60))).round
    redis = create_redis(stack.redis_url)
    try:
        copies = [await keys.read_window(redis, round_.round_id, shard)
                  for shard in range(keys.SHARDS)]
        assert all(copy == copies[0] for copy in copies)
        window = copies[0]
        closes_ms = opened.closes_at.ToMilliseconds()
        assert window["state"] == "OPEN"
        assert int(window["opens_at_ms"]) == opened.opens_at.ToMilliseconds()
        assert int(window["closes_at_ms"]) == closes_ms
        assert int(window["close_app_ms"]) == closes_ms
        assert int(window["close_sms_ms"]) == closes_ms + 90_000
        assert window["contestants"].split(",") == contestants
        assert window["free_quota"] == "5"

        closed = (await operator.call("CloseVoting", round_id=round_.round_id)).round
        window = await keys.read_window(redis, round_.round_id, keys.SHARDS - 1)
        closed_ms = max(c.closes_at.ToMilliseconds() for c in closed.channel_closes)
        assert window["state"] == "CLOSED"
        assert all(int(window[f"close_{c}_ms"]) <= closed_ms for c in keys.CHANNELS)
        assert closed_ms < closes_ms  # closed early, every channel at once
    finally:
        await redis.aclose()


async def test_get_show_state_and_unknown_episodes(stack: Stack, operator: Operator,
                                                   edge_channel: grpc.aio.Channel) -> None:
    episode_id, _ = await operator.episode_with_contestants(2)
    stub = watch_grpc.ShowWatchServiceStub(edge_channel)
    state = await stub.GetShowState(watch.GetShowStateRequest(episode_id=episode_id), timeout=5)
    assert state.snapshot.episode.state == types.SHOW_STATE_SCHEDULED
    assert await _refusal(stub.GetShowState(watch.GetShowStateRequest(
        episode_id="00000000-0000-0000-0000-000000000000"), timeout=5)) == (
        grpc.StatusCode.NOT_FOUND, "EPISODE_NOT_FOUND")
    assert await _refusal(stub.GetShowState(watch.GetShowStateRequest(), timeout=5)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
    url = f"{stack.edge_url}/v1/episodes/{episode_id}/state"  # anonymous, as a poller would
    with await asyncio.to_thread(urllib.request.urlopen, url, timeout=5) as response:
        body = json.loads(response.read())
    assert body["snapshot"]["episode"]["state"] == "SHOW_STATE_SCHEDULED"


async def _version(stack: Stack, episode_id: str) -> int:
    import psycopg

    async with await psycopg.AsyncConnection.connect(stack.database_url) as connection:
        cursor = await connection.execute(
            "SELECT version FROM episodes WHERE episode_id = %s", (episode_id,))
        row = await cursor.fetchone()
    assert row is not None
    return int(row[0])


async def test_results_ready_is_announced_once_and_ends_the_finished_show(
        stack: Stack, operator: Operator, edge_channel: grpc.aio.Channel) -> None:
    from televote.sync.v1 import show_internal_service_pb2 as internal
    from televote.sync.v1 import show_internal_service_pb2_grpc as internal_grpc

    episode_id, contestants = await operator.episode_with_contestants(2)
    round_id = (await operator.call("CreateRound", episode_id=episode_id,
                                    contestant_ids=contestants)).round.round_id
    await operator.call("StartShow", episode_id=episode_id)
    await operator.call("OpenVoting", round_id=round_id, duration=seconds(60))
    watcher = GrpcWatcher().start(edge_channel, episode_id)
    await watcher.wait_for(watch.SHOW_EVENT_TYPE_SNAPSHOT)
    await operator.call("EndShow", episode_id=episode_id)  # closes the round first

    async with stack.channel("sync_svc", as_holder="results_svc") as channel, \
            stack.channel("sync_svc") as anonymous:
        stub = internal_grpc.ShowInternalServiceStub(channel)
        request = internal.PublishResultsReadyRequest(round_id=round_id)
        first = await stub.PublishResultsReady(request, timeout=5)
        again = await stub.PublishResultsReady(request, timeout=5)
        assert first.round.state == again.round.state == types.ROUND_STATE_FINALIZED
        assert await _refusal(internal_grpc.ShowInternalServiceStub(anonymous)
                              .PublishResultsReady(request, timeout=5)) == (
            grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")  # an operator's grpcurl
    assert watcher.task is not None
    await asyncio.wait_for(watcher.task, 10)  # the stream ends: nothing more to announce
    assert watcher.types() == ["SNAPSHOT", "VOTING_CLOSED", "STATE_CHANGED", "RESULTS_READY"]


class _DiesBeforePublishing(ShowStore):
    """A sync_svc replica that dies right after a change commits, before announcing it."""

    async def apply(self, published: Published) -> None:
        raise _Died


class _Died(Exception):
    pass


async def test_a_close_whose_replica_dies_before_publishing_still_reaches_watchers(
        stack: Stack, operator: Operator, edge_channel: grpc.aio.Channel) -> None:
    episode_id, contestants = await operator.episode_with_contestants(2)
    round_id = (await operator.call("CreateRound", episode_id=episode_id,
                                    contestant_ids=contestants)).round.round_id
    await operator.call("StartShow", episode_id=episode_id)
    await operator.call("OpenVoting", round_id=round_id, duration=seconds(600))
    watcher = GrpcWatcher().start(edge_channel, episode_id)
    await watcher.wait_for(watch.SHOW_EVENT_TYPE_SNAPSHOT)

    config = SyncConfig(database_url=stack.database_url, redis_url=stack.redis_url)
    storage = Storage.from_config(config)
    await storage.connect()
    try:
        with pytest.raises(_Died):
            await _DiesBeforePublishing(storage, config).close_voting(
                control.CloseVotingRequest(request_id=request_id(), round_id=round_id))
    finally:
        await storage.close()
    # The live replicas' closer loops publish what the dead one committed but never sent.
    await watcher.wait_for(watch.SHOW_EVENT_TYPE_VOTING_CLOSED, timeout=30)
    closed = [e for e in watcher.events if e.type == watch.SHOW_EVENT_TYPE_VOTING_CLOSED]
    assert len(closed) == 1 and closed[0].round.state == types.ROUND_STATE_CLOSED
    await watcher.stop()
