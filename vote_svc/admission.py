"""The Redis side of admission: one Lua script decides and applies each vote atomically.

Every key a vote touches is in its voter's shard (`runtime.keys`), passed as KEYS, so the
scripts run unchanged on Redis Cluster. The admission script, in order:

1. idempotency: a request id seen before returns its first outcome (pending or committed);
   the same id with other fields is IDEMPOTENCY_MISMATCH;
2. the fraud verdict (BLOCK and a geographic REFUSE refuse, after idempotency so a retry of
   an accepted vote still gets its first outcome);
3. the shard marker (missing after Redis lost its data: vote_svc rebuilds first);
4. the window, at the vote's judged time: when the edge received it (ARGV[13], epoch ms; none
   from inside the mesh without a gateway time), bounded to the window's `receive_lag_ms`
   before `TIME` of the Redis server and never after it (`results_svc.rules.judged_ms`, the
   same rule the final result applies): NOT_OPEN before opens_at_ms, CLOSED at or after the
   channel's close (`close_<channel>_ms`) or when state is neither OPEN nor CLOSED. So a vote
   the edge received while lines were open is not refused because it waited in our queues
   past the close (up to the lag); the judged time is returned with OK for the ledger;
5. the contestant is one of the round's;
6. the per-user rate (votes per minute window of the Redis clock; the window's
   `rate_limit_per_minute`, else VOTE_RATE_LIMIT_PER_MINUTE);
7. for a FREE or PAID vote, the user's cache is loaded (else NEED_LOAD; a call that brings
   PostgreSQL's figures for the user fills it first) and the free quota (episode `free_quota`
   and round `free_cap`) / paid balance suffice (a PREMIUM_SMS vote, charged by its carrier,
   uses neither: it needs no cache and reports both as 0);
then applies: free used (episode and round) or paid spent, rate, live counter, minute bucket,
and the pending idempotency record
`P|fingerprint|vote_id|admitted_ms|lease_until_ms|free_left|paid|episode`, listed in the
shard's pending set (`runtime.keys.pending_key`) for the reconciler.

Nothing is changed unless every check passes. The undo script reverses exactly one admission,
and only while its pending record is still there (so after a Redis flush, when the reloaded
state never included it, nothing is reversed twice).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import hiredis
from redis.asyncio import Redis, RedisCluster
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MaxConnectionsError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)

from runtime import keys
from runtime.coalesce import Coalescer
from runtime.storage import RedisClient, retry_unknown_scripts

log = logging.getLogger(__name__)

RATE_WINDOW_MS = 60_000

# Fills a user's cache with what PostgreSQL says (a voter's first vote, or after a Redis loss):
# ARGV[a..a+5] = credited, spent, episode_id, free used in it, round_id, free used in it.
# Fills only what is not loaded yet. `credited` only rises, so a grant racing a load cannot
# be counted twice: the larger committed total wins.
_LOAD = """
local function load(user, a)
  local c = redis.call('HGET', user, 'credited')
  if not c then
    redis.call('HSET', user, 'credited', ARGV[a], 'spent', ARGV[a + 1])
  elseif tonumber(ARGV[a]) > tonumber(c) then
    redis.call('HSET', user, 'credited', ARGV[a])
  end
  redis.call('HSETNX', user, 'free:' .. ARGV[a + 2], ARGV[a + 3])
  redis.call('HSETNX', user, 'rfree:' .. ARGV[a + 4], ARGV[a + 5])
end
"""

# ARGV[13] is when the edge received the vote (epoch ms; '' if unknown). ARGV[14..19], when
# given, is what PostgreSQL says of the user (see _LOAD): a cache that lacks the user is
# filled first, in the same call, instead of answering NEED_LOAD.
ADMIT = _LOAD + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local prior = redis.call('GET', KEYS[3])
if prior then
  local state, fp = string.match(prior, '^(%a)|([^|]*)|')
  if fp ~= ARGV[5] then return {'MISMATCH'} end
  if state == 'D' then return {'DONE', prior} end
  return {'PENDING', prior, tostring(now)}
end
if ARGV[9] ~= '0' then return {'BLOCKED'} end
if redis.call('EXISTS', KEYS[7]) == 0 then return {'REBUILD'} end
local w = redis.call('HMGET', KEYS[1], 'state', 'opens_at_ms', 'close_' .. ARGV[4] .. '_ms',
                     'contestants', 'free_quota', 'episode_id', 'free_cap',
                     'rate_limit_per_minute', 'receive_lag_ms')
if not w[1] then return {'NO_WINDOW'} end
local judged = now
local received = tonumber(ARGV[13])
if received then judged = math.max(math.min(received, now), now - tonumber(w[9] or '0')) end
if judged < tonumber(w[2]) then return {'NOT_OPEN', tostring(now), w[2]} end
if (w[1] ~= 'OPEN' and w[1] ~= 'CLOSED') or judged >= tonumber(w[3]) then
  return {'CLOSED', tostring(now), w[3]}
end
if not string.find(',' .. w[4] .. ',', ',' .. ARGV[1] .. ',', 1, true) then
  return {'INVALID_CONTESTANT'}
end
local count = tonumber(ARGV[3])
local window = tonumber(ARGV[10])
local limit = tonumber(w[8] or ARGV[8])
local minute = now - (now % window)
local r = redis.call('HMGET', KEYS[4], 'minute', 'n')
local used = 0
if r[1] and tonumber(r[1]) == minute then used = tonumber(r[2]) end
if used + count > limit then
  return {'RATE_LIMITED', tostring(minute + window - now)}
end
local episode = w[6]
-- A premium SMS is charged by its carrier: it uses neither the free quota nor the paid
-- balance, so it needs no cache of them (no NEED_LOAD) and reports both as 0.
local free_left_after, balance_after = 0, 0
if ARGV[2] ~= 'PREMIUM_SMS' then
  local rfield = 'rfree:' .. ARGV[12]
  local u = redis.call('HMGET', KEYS[2], 'credited', 'spent', 'free:' .. episode, rfield)
  if not u[1] or not u[3] or not u[4] then
    if not ARGV[14] then return {'NEED_LOAD', episode} end
    load(KEYS[2], 14)
    u = redis.call('HMGET', KEYS[2], 'credited', 'spent', 'free:' .. episode, rfield)
  end
  local credited, spent = tonumber(u[1]), tonumber(u[2])
  local free_used, round_used = tonumber(u[3]), tonumber(u[4])
  local quota, cap = tonumber(w[5]), tonumber(w[7] or '0')
  local function free_left()
    local left = quota - free_used
    if cap > 0 and cap - round_used < left then left = cap - round_used end
    return math.max(left, 0)
  end
  if ARGV[2] == 'FREE' then
    if count > free_left() then return {'NO_FREE', tostring(free_left())} end
    free_used = redis.call('HINCRBY', KEYS[2], 'free:' .. episode, count)
    round_used = redis.call('HINCRBY', KEYS[2], rfield, count)
  elseif ARGV[2] == 'PAID' then
    if spent + count > credited then return {'NO_BALANCE', tostring(credited - spent)} end
    spent = redis.call('HINCRBY', KEYS[2], 'spent', count)
  end
  free_left_after, balance_after = free_left(), credited - spent
end
redis.call('HSET', KEYS[4], 'minute', minute, 'n', used + count)
redis.call('PEXPIRE', KEYS[4], window * 2)
redis.call('HINCRBY', KEYS[5], ARGV[1], count)
redis.call('HINCRBY', KEYS[6], minute .. ':' .. ARGV[1], count)
local value = table.concat({'P', ARGV[5], ARGV[6], now, now + tonumber(ARGV[7]),
                            free_left_after, balance_after, episode, judged}, '|')
redis.call('SET', KEYS[3], value, 'PX', ARGV[11])
-- What the reconciler needs to undo this admission if its replica dies (vote_svc/reconcile.py);
-- the settling done/undo removes it, so normally the reconciler finds nothing.
local member = table.concat({ARGV[6], ARGV[12], ARGV[1], ARGV[2], ARGV[3], now, episode,
                             KEYS[3]}, '|')
redis.call('ZADD', KEYS[8], now + tonumber(ARGV[7]), member)
return {'OK', value, member, tostring(judged)}
"""

# Settling an admission (done or undo) also takes it off its shard's pending set when given
# the pending key and the member the admission script returned (the reconciler's work list).
_SETTLES_PENDING = """
local function settle()
$script
end
local settled = settle()
if ARGV[$arg] and ARGV[$arg] ~= '' then redis.call('ZREM', KEYS[$key], ARGV[$arg]) end
return settled
"""

# KEYS: user, idempotency, rate, live, minutes[, pending].
# ARGV: vote_id, vote_type, count, contestant_id, episode_id, admitted_ms, window_ms, round_id
#       [, pending member].
UNDO = """
local v = redis.call('GET', KEYS[2])
if not v then return 0 end
local state, vote_id = string.match(v, '^(%a)|[^|]*|([^|]*)|')
if state ~= 'P' or vote_id ~= ARGV[1] then return 0 end
local count = tonumber(ARGV[3])
if ARGV[2] == 'FREE' then
  redis.call('HINCRBY', KEYS[1], 'free:' .. ARGV[5], -count)
  redis.call('HINCRBY', KEYS[1], 'rfree:' .. ARGV[8], -count)
elseif ARGV[2] == 'PAID' then
  redis.call('HINCRBY', KEYS[1], 'spent', -count)
end
local admitted = tonumber(ARGV[6])
local minute = admitted - (admitted % tonumber(ARGV[7]))
local r = redis.call('HGET', KEYS[3], 'minute')
if r and tonumber(r) == minute then redis.call('HINCRBY', KEYS[3], 'n', -count) end
redis.call('HINCRBY', KEYS[4], ARGV[4], -count)
redis.call('HINCRBY', KEYS[5], minute .. ':' .. ARGV[4], -count)
redis.call('DEL', KEYS[2])
return 1
"""
UNDO = _SETTLES_PENDING.replace("$script", UNDO).replace("$key", "6").replace("$arg", "9")

# KEYS: idempotency[, pending].
# ARGV: vote_id, ttl_ms, replacement value (a committed outcome) or ''[, pending member].
# Marks the pending admission `vote_id` committed (as itself, or as the replacement: the
# ledger's original of the same request, whose charge this admission now carries); with no
# vote_id, records the replacement where nothing is recorded (a refusal read from the ledger).
DONE = """
local v = redis.call('GET', KEYS[1])
if v then
  local state, vote_id = string.match(v, '^(%a)|[^|]*|([^|]*)|')
  if state == 'P' and vote_id == ARGV[1] then
    if ARGV[3] ~= '' then
      redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[2])
    else
      redis.call('SET', KEYS[1], 'D' .. string.sub(v, 2), 'PX', ARGV[2])
    end
    return 1
  end
  return 0
end
if ARGV[1] == '' and ARGV[3] ~= '' then redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[2]) end
return 0
"""
DONE = _SETTLES_PENDING.replace("$script", DONE).replace("$key", "2").replace("$arg", "4")

# KEYS: user. ARGV: credited (the committed total after a grant). Only raises a loaded cache.
GRANT = """
local c = redis.call('HGET', KEYS[1], 'credited')
if c and tonumber(ARGV[1]) > tonumber(c) then redis.call('HSET', KEYS[1], 'credited', ARGV[1]) end
return 1
"""

# A refund's claw-back, taken from what admission can still spend, so no vote admitted at the
# same moment can spend it too. KEYS: user. ARGV: votes to claw back, then PostgreSQL's
# credited and spent + clawed_back (read under the wallet's row lock) for an unloaded cache.
# Returns the votes clawed back (at most the unspent balance).
CLAW = """
local c = redis.call('HGET', KEYS[1], 'credited')
if not c then
  redis.call('HSET', KEYS[1], 'credited', ARGV[2], 'spent', ARGV[3])
elseif tonumber(ARGV[2]) > tonumber(c) then
  redis.call('HSET', KEYS[1], 'credited', ARGV[2])
end
local u = redis.call('HMGET', KEYS[1], 'credited', 'spent')
local take = math.min(tonumber(ARGV[1]), math.max(tonumber(u[1]) - tonumber(u[2]), 0))
if take > 0 then redis.call('HINCRBY', KEYS[1], 'spent', take) end
return take
"""

# KEYS: window. ARGV: field, value, ... Writes a window only if no one (sync_svc) has.
WINDOW_IF_MISSING = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""


@dataclass(frozen=True)
class Outcome:
    """A parsed idempotency record."""

    state: str
    fingerprint: str
    vote_id: str
    admitted_ms: int
    lease_until_ms: int
    free_left: int
    paid_balance: int
    episode_id: str
    #: The time the window was judged by, as the vote's leaf records it ("received_ms");
    #: None in a record written before leaves carried it (its leaf has none).
    judged_ms: int | None = None

    @classmethod
    def parse(cls, raw: bytes | str) -> Outcome:
        text = raw.decode() if isinstance(raw, bytes) else raw
        state, fp, vote_id, admitted, lease, free_left, paid, episode, *judged = text.split("|")
        return cls(state, fp, vote_id, int(admitted), int(lease), int(free_left), int(paid),
                   episode, int(judged[0]) if judged and judged[0] else None)

    def encode(self) -> str:
        return "|".join([self.state, self.fingerprint, self.vote_id, str(self.admitted_ms),
                         str(self.lease_until_ms), str(self.free_left), str(self.paid_balance),
                         self.episode_id, "" if self.judged_ms is None else str(self.judged_ms)])


@dataclass(frozen=True)
class VoteKeys:
    """The KEYS of one vote, all in its voter's shard."""

    shard: int
    window: str
    user: str
    idempotency: str
    rate: str
    live: str
    minutes: str
    marker: str
    pending: str

    @classmethod
    def of(cls, user_id: str, round_id: str, request_id: str) -> VoteKeys:
        shard = keys.shard_of(user_id)
        return cls(shard, keys.window_key(shard, round_id), keys.user_key(shard, user_id),
                   keys.idempotency_key(shard, user_id, request_id),
                   keys.rate_key(shard, user_id), keys.live_key(shard, round_id),
                   keys.live_minutes_key(shard, round_id), keys.shard_marker_key(shard),
                   keys.pending_key(shard))

    def admit_keys(self) -> list[str]:
        return [self.window, self.user, self.idempotency, self.rate, self.live, self.minutes,
                self.marker, self.pending]

    def undo_keys(self) -> list[str]:
        return [self.user, self.idempotency, self.rate, self.live, self.minutes]


#: One script call: the script and its EVALSHA arguments (number of keys, keys, args).
_Call = tuple[Any, Sequence[Any]]


class Scripts:
    """The registered Lua scripts, and one shared pipeline for the calls of concurrent RPCs.

    Concurrent RPCs' script calls (admissions, settlements) go to Redis as one pipeline of
    EVALSHAs: one round trip and one syscall for all of them instead of one each
    (runtime.coalesce). (redis-py's own pipelined scripts would add a SCRIPT EXISTS round trip
    per pipeline; a NOSCRIPT reply, after a Redis restart, reloads them instead.)
    """

    def __init__(self, redis: RedisClient, *, max_inflight: int = 0) -> None:
        """`max_inflight`: pipelines out at once (0: no limit); at the limit, calls wait for
        one to return and leave together (runtime.coalesce, VOTE_ADMIT_MAX_INFLIGHT)."""
        # Typed Any: redis-py's stubs do not admit a pipeline as `client`, which it supports.
        self.redis = redis
        self.admit: Any = redis.register_script(ADMIT)
        self.undo: Any = redis.register_script(UNDO)
        self.done: Any = redis.register_script(DONE)
        self.grant: Any = redis.register_script(GRANT)
        self.claw: Any = redis.register_script(CLAW)
        self.window_if_missing: Any = redis.register_script(WINDOW_IF_MISSING)
        self._calls: Coalescer[_Call, Any] = Coalescer(self._execute,
                                                        max_inflight=max_inflight)
        self._idle: list[Any] = []  # connections of the pipelines (_raw_pipeline)
        self._reloading: asyncio.Task[None] | None = None

    def call(self, script: Any, keys: Sequence[str], args: Sequence[str | int], *,
             wait_ms: float = 0.0) -> asyncio.Future[Any]:
        """Run `script` in a shared pipeline that leaves within `wait_ms` (0: at the end of
        this event-loop iteration): its reply, or what Redis raised for it."""
        return self._calls.submit((script, (len(keys), *keys, *args)), wait_ms=wait_ms)

    async def _execute(self, batch: list[_Call]) -> list[Any]:
        return await retry_unknown_scripts(self.redis, [script for script, _ in batch], batch,
                                           self._pipeline)

    async def _pipeline(self, batch: Sequence[_Call]) -> list[Any]:
        if isinstance(self.redis, Redis):
            return await self._raw_pipeline(self.redis, batch)
        return await self._cluster_pipeline(self.redis, batch)

    async def _raw_pipeline(self, redis: Redis, batch: Sequence[_Call]) -> list[Any]:
        """The same pipeline without redis-py's per-command packing and per-reply timers
        (most of the client's CPU per vote): hiredis packs, one timeout covers the batch.

        On connections of its own, taken from the pool and kept (up to _KEPT_CONNECTIONS
        idle ones): the pool's checkout (a lock, metrics hooks and a probing read of the
        socket) cost more than a vote's packing and parsing. The rest go back to the pool, so
        a burst of pipelines while Redis is slow does not keep the other users' connections.
        """
        pool = redis.connection_pool
        connection = (self._idle.pop() if self._idle
                      else await pool.get_connection())  # type: ignore[no-untyped-call]
        try:
            replies = await _send_and_read(connection, batch)
        except BaseException:
            await connection.disconnect()
            await pool.release(connection)  # a broken connection goes back to be reconnected
            raise
        if len(self._idle) < _KEPT_CONNECTIONS:
            self._idle.append(connection)
        else:
            await pool.release(connection)
        return replies

    async def _cluster_pipeline(self, redis: RedisCluster, batch: Sequence[_Call]
                                ) -> list[Any]:
        """On Redis Cluster: the raw pipeline of each master's calls, on that node's own
        connections (redis-py's cluster pipeline cost twice the client CPU per admission,
        bench/cluster_bench.py). The calls a node redirected (MOVED, ASK: their slot is
        elsewhere now, nothing ran) or could not serve yet (TRYAGAIN, CLUSTERDOWN) go
        through redis-py's cluster pipeline, which follows redirections and reloads the slot
        map. A node that cannot be reached fails its calls only (the others' shards go on
        admitting) and has the slot map reloaded, to find the replica promoted in its place.
        """
        await redis.initialize()  # the slot map, at the first call (then it returns at once)
        by_node: dict[Any, list[int]] = {}
        replies: list[Any] = [None] * len(batch)
        for index, (_, args) in enumerate(batch):
            try:
                # args: the key count, then the keys; all of a call's keys share one slot.
                node = redis.get_node_from_key(args[1])
            except SlotNotCoveredError as error:
                replies[index] = error
                self._reload_slots(redis)
                continue
            by_node.setdefault(node, []).append(index)

        async def node_pipeline(node: Any, indices: list[int]) -> None:
            try:
                connection = node.acquire_connection()
            except MaxConnectionsError as error:
                answers: list[Any] = [error] * len(indices)
            else:
                try:
                    answers = await _send_and_read(connection, [batch[i] for i in indices])
                except Exception as error:  # unreachable, reset, timed out
                    await connection.disconnect()
                    answers = [error] * len(indices)
                    self._reload_slots(redis)
                except BaseException:
                    await connection.disconnect()
                    raise
                finally:
                    node.release(connection)
            for index, answer in zip(indices, answers, strict=True):
                replies[index] = answer

        await asyncio.gather(*(node_pipeline(node, indices)
                               for node, indices in by_node.items()))
        redirected = [index for index, reply in enumerate(replies)
                      if isinstance(reply, _REDIRECTED)]
        if redirected:
            async with redis.pipeline(transaction=False) as pipe:
                for index in redirected:
                    script, args = batch[index]
                    pipe.evalsha(script.sha, *args)
                again = await pipe.execute(raise_on_error=False)
            for index, reply in zip(redirected, again, strict=True):
                replies[index] = reply
        return replies

    def _reload_slots(self, redis: RedisCluster) -> None:
        """Reload the cluster's slot map in the background, one reload at a time."""
        if self._reloading is None or self._reloading.done():
            self._reloading = asyncio.get_running_loop().create_task(_reload(redis))


async def _reload(redis: RedisCluster) -> None:
    try:
        await redis.nodes_manager.initialize()
    except Exception as error:  # no node answers: the next failed pipeline tries again
        log.warning("Redis Cluster slot map not reloaded: %r", error)


async def _send_and_read(connection: Any, calls: Sequence[_Call]) -> list[Any]:
    """EVALSHA each call on one connection in one write; each call's reply or error."""
    async with asyncio.timeout(_PIPELINE_TIMEOUT_S):
        packed = b"".join(hiredis.pack_command(("EVALSHA", script.sha, *args))
                          for script, args in calls)
        await connection.send_packed_command([packed], check_health=False)
        replies: list[Any] = []
        for _ in calls:
            try:
                replies.append(await connection.read_response(timeout=math.inf))
            except ResponseError as error:  # that call's error; the rest follow
                replies.append(error)
    return replies


#: Replies that say a call did not run on the node it was sent to, and may run elsewhere.
_REDIRECTED = (AskError, TryAgainError, ClusterDownError)  # MovedError is an AskError


#: A pipeline of scripts that takes longer than this means Redis is in trouble.
_PIPELINE_TIMEOUT_S = 5.0
#: Idle pipeline connections kept out of the pool (a few pipelines are in flight at once).
_KEPT_CONNECTIONS = 8


def decode_reply(reply: Sequence[bytes | str | int]) -> list[str]:
    return [item.decode() if isinstance(item, bytes) else str(item) for item in reply]
