"""The Redis window follows PostgreSQL's committed round: a write lost after the commit is
repaired, and a stale write can never reopen a closed window or undo an extension."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from redis.asyncio import RedisCluster

from ops.stack import Stack
from runtime import keys
from runtime.storage import Storage
from sync_svc.config import SyncConfig
from sync_svc.show import Published, ShowStore
from televote.sync.v1 import show_control_service_pb2 as control
from tests.sync_support import Operator, request_id, seconds
from vote_svc.admission import WINDOW_IF_MISSING


@pytest_asyncio.fixture
async def storage(stack: Stack) -> AsyncIterator[Storage]:
    store = Storage.from_config(SyncConfig(database_url=stack.database_url,
                                           redis_url=stack.redis_url))
    await store.connect()
    try:
        yield store
    finally:
        await store.close()


class _CrashesAfterCommit(ShowStore):
    """A sync_svc replica that dies right after a change commits: nothing reaches Redis."""

    async def apply(self, published: Published) -> None:
        raise _Died


class _Died(Exception):
    pass


async def _copies(storage: Storage, round_id: str) -> list[dict[str, str]]:
    return [await keys.read_window(storage.redis, round_id, shard)
            for shard in range(keys.SHARDS)]


async def _until_every_copy(storage: Storage, round_id: str, **expected: str | int,
                            ) -> dict[str, str]:
    """Wait (up to 15 s) until every shard's copy of the window has the `expected` fields."""
    want = {name: str(value) for name, value in expected.items()}
    for _ in range(150):
        copies = await _copies(storage, round_id)
        if all({name: copy.get(name) for name in want} == want for copy in copies):
            return copies[0]
        await asyncio.sleep(0.1)
    raise AssertionError(f"window not repaired: {copies[0]} (want {want})")


async def _open_round(operator: Operator, window_s: float) -> control.OpenVotingResponse:
    episode_id, contestants = await operator.episode_with_contestants(2)
    round_ = (await operator.call("CreateRound", episode_id=episode_id,
                                  contestant_ids=contestants)).round
    await operator.call("StartShow", episode_id=episode_id)
    return await operator.call("OpenVoting", round_id=round_.round_id,  # type: ignore[no-any-return]
                               duration=seconds(window_s))


async def test_a_window_write_lost_after_the_commit_is_repaired_from_postgresql(
        stack: Stack, edge_channel: grpc.aio.Channel, storage: Storage) -> None:
    operator = Operator(stack, edge_channel)
    episode_id, contestants = await operator.episode_with_contestants(2)
    round_id = (await operator.call("CreateRound", episode_id=episode_id,
                                    contestant_ids=contestants)).round.round_id
    await operator.call("StartShow", episode_id=episode_id)
    config = SyncConfig(database_url=stack.database_url, redis_url=stack.redis_url)
    crashing = _CrashesAfterCommit(storage, config)

    # The open commits, then its replica dies before writing the window to Redis.
    with pytest.raises(_Died):
        await crashing.open_voting(control.OpenVotingRequest(
            request_id=request_id(), round_id=round_id, duration=seconds(600)))
    opened = (await ShowStore(storage, config).get_snapshot(episode_id)).current_round
    closes_ms = opened.closes_at.ToMilliseconds()
    # The live replicas write it from PostgreSQL, no vote needed to notice.
    await _until_every_copy(storage, round_id, state="OPEN", closes_at_ms=closes_ms,
                            opens_at_ms=opened.opens_at.ToMilliseconds())

    # An extension commits, and its Redis write is lost: Redis still says the old close, and
    # would refuse votes as closed after it.
    with pytest.raises(_Died):
        await crashing.extend_voting(control.ExtendVotingRequest(
            request_id=request_id(), round_id=round_id, extension=seconds(120)))
    await _until_every_copy(storage, round_id, state="OPEN", closes_at_ms=closes_ms + 120_000,
                            close_app_ms=closes_ms + 120_000, close_sms_ms=closes_ms + 120_000)


async def test_an_open_window_lost_from_redis_is_written_again(
        stack: Stack, edge_channel: grpc.aio.Channel, storage: Storage) -> None:
    opened = (await _open_round(Operator(stack, edge_channel), 600)).round
    first = await _until_every_copy(storage, opened.round_id, state="OPEN")
    for shard in (0, 17, keys.SHARDS - 1):  # lost copies, and one altered copy
        await storage.redis.delete(keys.window_key(shard, opened.round_id))
    await storage.redis.hset(keys.window_key(5, opened.round_id), "close_web_ms", 1)
    repaired = await _until_every_copy(storage, opened.round_id, **first)
    assert repaired == first


async def test_a_stale_window_write_cannot_reopen_a_closed_window_or_undo_an_extension(
        stack: Stack, edge_channel: grpc.aio.Channel, storage: Storage) -> None:
    operator = Operator(stack, edge_channel)
    opened = (await _open_round(operator, 600)).round
    at_open = await _until_every_copy(storage, opened.round_id, state="OPEN")
    extended = (await operator.call("ExtendVoting", round_id=opened.round_id,
                                    extension=seconds(60))).round
    after_extension = await _until_every_copy(
        storage, opened.round_id, closes_at_ms=extended.closes_at.ToMilliseconds())

    # A replay of the window as it was before the extension (a delayed write, a repair that
    # read PostgreSQL just before the extension committed) changes nothing.
    assert await keys.write_window(storage.redis, opened.round_id, at_open) == 0
    assert await _copies(storage, opened.round_id) == [after_extension] * keys.SHARDS

    # The close shuts Redis before it commits, without a version: from then on no write of
    # an OPEN window applies, not even one that claims a later version.
    await keys.close_window(storage.redis, opened.round_id)
    for stale in (at_open, after_extension,
                  after_extension | {"version": int(after_extension["version"]) + 100}):
        assert await keys.write_window(storage.redis, opened.round_id, stale) == 0
    assert all(copy["state"] == "CLOSED" for copy in await _copies(storage, opened.round_id))

    closed = (await operator.call("CloseVoting", round_id=opened.round_id)).round
    after_close = await _until_every_copy(storage, opened.round_id, state="CLOSED")
    assert await keys.write_window(storage.redis, opened.round_id, after_extension) == 0
    # The periodic repair rewrites recently closed rounds too, and leaves them closed.
    store = ShowStore(storage, SyncConfig(database_url=stack.database_url,
                                          redis_url=stack.redis_url))
    await store.repair_windows(await keys.server_time_ms(storage.redis))
    assert await _copies(storage, opened.round_id) == [after_close] * keys.SHARDS
    assert int(after_close["close_app_ms"]) <= closed.channel_closes[0].closes_at.ToMilliseconds()


async def test_a_copy_lost_before_the_close_stays_closed_against_a_late_restore(
        stack: Stack, edge_channel: grpc.aio.Channel, storage: Storage) -> None:
    """vote_svc restores a window it finds missing from what PostgreSQL said; if it read the
    round OPEN just before the close committed, its restore runs after the close did."""
    opened = (await _open_round(Operator(stack, edge_channel), 600)).round
    at_open = await _until_every_copy(storage, opened.round_id, state="OPEN")
    lost = keys.window_key(3, opened.round_id)
    await storage.redis.delete(lost)

    closed_ms = await keys.close_window(storage.redis, opened.round_id)

    tombstone = await keys.read_window(storage.redis, opened.round_id, 3)
    assert tombstone["state"] == "CLOSED"
    assert all(int(tombstone[f"close_{channel}_ms"]) <= closed_ms for channel in keys.CHANNELS)
    restore = storage.redis.register_script(WINDOW_IF_MISSING)
    late = [part for pair in at_open.items() for part in pair]
    assert await restore(keys=[lost], args=late) == 0
    assert await keys.read_window(storage.redis, opened.round_id, 3) == tombstone


async def test_a_vote_admitted_in_the_closing_millisecond_lies_inside_the_recorded_window(
        storage: Storage) -> None:
    """An admission reads the Redis clock, then a shard's close script runs in the same
    millisecond: the admission's time must still be before the close that gets recorded, or the
    final result (which counts votes admitted strictly before it) would drop a vote that was
    acknowledged. A pipeline runs the clock read and the close back to back, so they share a
    millisecond on almost every try."""
    if isinstance(storage.redis, RedisCluster):
        pytest.skip("a cluster pipeline cannot carry TIME: it belongs to no slot")
    close = storage.redis.register_script(keys._CLOSE_WINDOW)
    fields = [f"close_{channel}_ms" for channel in keys.CHANNELS]
    for _ in range(20):
        key = keys.window_key(0, str(uuid.uuid4()))
        async with storage.redis.pipeline(transaction=False) as pipe:
            pipe.time()
            await close(keys=[key], args=fields, client=pipe)  # type: ignore[arg-type]
            (seconds, micros), closed_ms = await pipe.execute()
        await storage.redis.delete(key)
        assert int(seconds) * 1000 + int(micros) // 1000 < int(closed_ms)
