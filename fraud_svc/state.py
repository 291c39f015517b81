"""Feature state in Redis, updated by scoring itself: one pipelined round trip per batch.

Keys (Redis Cluster safe: every script call touches one hash slot):
- `tv:{s<N>}:fraud:u:<user>:votes` sorted set in the user's shard (runtime.keys): the user's
  votes within the timing window, newest `fraud_user_history` kept, score = vote time (ms),
  member = "<ip>|<votes>|<ref>" (a retried vote with the same ref is not counted twice;
  <votes> is the submission's count: velocity counts votes, not calls). <ip> is the keyed hash
  vote_svc sends (VoteFacts.ip_hash), the raw address only from callers that send none; it
  lives as long as the key (see below), never in PostgreSQL.
- `tv:{s<N>}:fraud:u:<user>:stats` hash beside it: running sums of the history's intervals
  and its votes per IP (see _SCRIPT), so timing needs no read of the whole history.
- `tv:{s<N>}:fraud:blocked` sorted set per user shard: flagged/blocked users of the shard,
  score = until when (ms; 2**52 for never). It mirrors the USER rows of fraud_blocks (the
  system of record) so every replica sees a flag at once; rebuilt from PostgreSQL at start.
- `tv:{d<N>}:fraud:dev:<device>:users` set of user ids seen on a device, tagged by a device
  shard of its own.

A user's two keys live at least the timing window after the user's last vote, a device's key
at least the device TTL after its last vote (leases, see _SCRIPT: not refreshed on every vote).

On a single Redis a batch is one script call. On Redis Cluster (REDIS_CLUSTER=true) a script
may only touch one hash slot, so the batch is split into one call per user shard and per
device shard, sent in one pipeline.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hiredis import pack_command
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

from fraud_svc.config import FraudConfig
from fraud_svc.features import History
from runtime.keys import SHARDS, shard_of, tag
from runtime.storage import RedisClient

# One script for a whole group of votes. ARGV[1..7]: velocity window (ms), timing window (ms),
# history cap, device TTL (ms), the lease a user's keys get (ms), the lease a device's key
# gets (ms), and U, the number of user records; then the user records, then the device
# records. Every field is an argument of its own and every key sits at a fixed place, so the
# script reads them without parsing (matching a packed line cost Redis ~4 us per vote):
#   user record i (1..U):  KEYS[3i-2..3i] = votes, stats, blocked
#                          ARGV[5i+3..5i+7] = time ms, ref, ip, user, votes in it
#   device record j:       KEYS[3U+j] = the device's users; ARGV[5U+7+j] = user
# Records of one kind are applied in vote order; a user record never reads what a device
# record writes, so doing all user records first changes nothing. The reply is flat:
#   per user record: blocked, window votes, intervals, mean interval (us), std dev (us),
#                    distinct IPs
#   per device record: distinct users on the device
#
# The interval statistics are kept incrementally in the user's stats hash: s (sum of the
# intervals), q (sum of their squares), n (distinct IPs), c (votes kept), l and o (newest and
# oldest vote time), x (members standing for more than one vote), i<ip> (votes per IP). A
# vote then costs a few O(log n) commands instead of reading the whole history (up to 200
# votes for a bot), and few writes (each write inside a script is also written to the AOF and
# replicas). Times are integer ms, so the sums are exact
# integers (q <= timing window^2 < 2^53) and the statistics equal those of a full scan.
# Anything but an append in time order (a retried vote whose time changed, a vote older than
# the user's newest), and a hash that disagrees with the history (lost, evicted), falls back
# to the full scan, which rewrites the hash.
#
# Expiry is only garbage collection (the windows trim by vote time), and every write in a
# script is also written to the AOF and replicas: instead of refreshing the TTLs on every vote,
# a key whose remaining TTL is under its window (the user's timing window, the device TTL) gets
# a lease a little longer (LEASE_SLACK), so a key still lives at least its window after its
# last vote, and a voter refreshes it once per slack rather than per vote. The check is a read
# (PTTL), which is neither logged nor replicated.
_SCRIPT = """
local window = tonumber(ARGV[1])
local timing = tonumber(ARGV[2])
local cap = tonumber(ARGV[3])
local device_ttl = tonumber(ARGV[4])
local user_lease = ARGV[5]
local device_lease = ARGV[6]
local out = {}
local function int(x) return string.format('%d', x) end
local function address(member)
  return string.sub(member, 1, string.find(member, '|', 1, true) - 1)
end
-- The votes a member stands for (1 for a member without a count).
local function votes_of(member)
  local a = string.find(member, '|', 1, true)
  local b = string.find(member, '|', a + 1, true)
  if not b then return 1 end
  return tonumber(string.sub(member, a + 1, b - 1)) or 1
end
-- The full scan: trim, read the whole history, and rewrite the stats from it.
local function rebuild(votes, stats, now, member)
  redis.call('ZADD', votes, now, member)
  redis.call('ZREMRANGEBYSCORE', votes, '-inf', now - timing)
  redis.call('ZREMRANGEBYRANK', votes, 0, -cap - 1)
  local entries = redis.call('ZRANGE', votes, 0, -1, 'WITHSCORES')
  local sum, sumsq, distinct, last, multi = 0, 0, 0, nil, 0
  local counts = {}
  for j = 1, #entries, 2 do
    local t = tonumber(entries[j + 1])
    if votes_of(entries[j]) > 1 then multi = multi + 1 end
    if last ~= nil then
      sum = sum + (t - last)
      sumsq = sumsq + (t - last) * (t - last)
    end
    last = t
    local ip = address(entries[j])
    if ip ~= '' then
      if not counts[ip] then
        counts[ip] = 0
        distinct = distinct + 1
      end
      counts[ip] = counts[ip] + 1
    end
  end
  local card, oldest = #entries / 2, tonumber(entries[2])
  local fields = {'s', int(sum), 'q', int(sumsq), 'n', distinct, 'c', card,
                  'l', int(last), 'o', int(oldest), 'x', multi}
  for ip, n in pairs(counts) do
    fields[#fields + 1] = 'i' .. ip
    fields[#fields + 1] = n
  end
  redis.call('DEL', stats)
  redis.call('HSET', stats, unpack(fields))
  redis.call('PEXPIRE', votes, user_lease)  -- the hash is new: no TTL yet
  redis.call('PEXPIRE', stats, user_lease)
  return sum, sumsq, distinct, card, oldest, multi
end
-- Appends a vote at the end of the history (in time order) and updates the stats; returns
-- them and the time of the user's previous vote (nil if unknown).
-- Returns nil when the fast path does not apply (the caller rebuilds).
local function append(votes, stats, now, member, ip)
  if redis.call('ZADD', votes, 'NX', now, member) == 0 then
    if tonumber(redis.call('ZSCORE', votes, member)) ~= now then return nil end
    -- The same vote again (a retried batch): nothing changes.
    local h = redis.call('HMGET', stats, 's', 'q', 'n', 'c', 'o', 'x')
    if not h[1] or tonumber(h[4]) ~= redis.call('ZCARD', votes) then return nil end
    return tonumber(h[1]), tonumber(h[2]), tonumber(h[3]), tonumber(h[4]), tonumber(h[5]),
           tonumber(h[6] or 0), nil
  end
  local ip_field = 'i' .. ip
  local h = redis.call('HMGET', stats, 's', 'q', 'n', 'c', 'l', 'o', ip_field, 'x')
  local card = redis.call('ZCARD', votes)
  local sum, sumsq, distinct, oldest, previous
  local multi = tonumber(h[8] or 0)
  if card == 1 then
    -- A fresh history: whatever the hash held belonged to an expired one.
    if h[1] then redis.call('DEL', stats) end
    sum, sumsq, distinct, oldest, multi = 0, 0, 0, now, 0
    h[7] = false
  else
    if not h[1] or tonumber(h[4]) + 1 ~= card then return nil end
    previous = tonumber(h[5])
    local d = now - previous
    if d < 0 then return nil end  -- older than the newest vote: inserted in the middle
    sum, sumsq = tonumber(h[1]) + d, tonumber(h[2]) + d * d
    distinct, oldest = tonumber(h[3]), tonumber(h[6])
  end
  if votes_of(member) > 1 then multi = multi + 1 end
  local ip_votes = tonumber(h[7] or 0) + 1
  if ip ~= '' and ip_votes == 1 then distinct = distinct + 1 end
  -- Trim exactly as ZREMRANGEBYSCORE (-inf, now - timing] then ZREMRANGEBYRANK to the cap:
  -- the oldest max(expired, card - cap) votes, whose intervals and IPs leave the stats.
  local cutoff = now - timing
  if card > cap or oldest <= cutoff then
    local m = math.max(card - cap, redis.call('ZCOUNT', votes, '-inf', int(cutoff)))
    local gone = redis.call('ZRANGE', votes, 0, m, 'WITHSCORES')
    redis.call('ZREMRANGEBYRANK', votes, 0, m - 1)
    for j = 1, 2 * m, 2 do
      local d = tonumber(gone[j + 3]) - tonumber(gone[j + 1])
      sum, sumsq = sum - d, sumsq - d * d
      if votes_of(gone[j]) > 1 then multi = multi - 1 end
      local old_ip = address(gone[j])
      if old_ip == ip then
        ip_votes = ip_votes - 1  -- the vote's own IP: written below
      elseif old_ip ~= '' and redis.call('HINCRBY', stats, 'i' .. old_ip, -1) <= 0 then
        redis.call('HDEL', stats, 'i' .. old_ip)
        distinct = distinct - 1
      end
    end
    card, oldest = card - m, tonumber(gone[2 * m + 2])
  end
  if ip ~= '' then
    redis.call('HSET', stats, 's', int(sum), 'q', int(sumsq), 'n', distinct, 'c', card,
               'l', int(now), 'o', int(oldest), 'x', multi, ip_field, ip_votes)
  else
    redis.call('HSET', stats, 's', int(sum), 'q', int(sumsq), 'n', distinct, 'c', card,
               'l', int(now), 'o', int(oldest), 'x', multi)
  end
  return sum, sumsq, distinct, card, oldest, multi, previous
end
local users = tonumber(ARGV[7])
for i = 1, users do
  local votes, stats, blocked = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  local now, ref, ip, user = tonumber(ARGV[5 * i + 3]), ARGV[5 * i + 4], ARGV[5 * i + 5],
                             ARGV[5 * i + 6]
  local n = ARGV[5 * i + 7]
  local until_ms = redis.call('ZSCORE', blocked, user)
  if until_ms and tonumber(until_ms) > now then
    -- A flagged user's votes are refused without scoring: nothing to record or compute.
    for _, x in ipairs({1, 0, 0, 0, 0, 0}) do out[#out + 1] = x end
  else
    local member = ip .. '|' .. n .. '|' .. ref
    local sum, sumsq, distinct, card, oldest, multi, previous =
      append(votes, stats, now, member, ip)
    if sum == nil then
      sum, sumsq, distinct, card, oldest, multi = rebuild(votes, stats, now, member)
    elseif redis.call('PTTL', votes) < timing then
      -- Both keys always get the same lease; a new history's zset has none yet.
      redis.call('PEXPIRE', votes, user_lease)
      redis.call('PEXPIRE', stats, user_lease)
    end
    -- Votes in (now - window, +inf]: the whole history if its oldest is in the window, only
    -- this vote if the previous one (the newest of the rest) is not; else counted.
    -- Counted in votes: a member of count n stands for n. While every member of the history
    -- is a single vote (multi = 0, nearly always) the member count is the vote count.
    local count = card
    if previous and previous <= now - window then
      count = tonumber(n)
    elseif multi > 0 then
      count = 0
      for _, m in ipairs(redis.call('ZRANGEBYSCORE', votes, '(' .. int(now - window), '+inf')) do
        count = count + votes_of(m)
      end
    elseif oldest <= now - window then
      count = redis.call('ZCOUNT', votes, '(' .. int(now - window), '+inf')
    end
    local k = card - 1
    local mean, std = 0, 0
    if k > 0 then
      mean = sum / k
      local variance = sumsq / k - mean * mean
      if variance > 0 then std = math.sqrt(variance) end
    end
    out[#out + 1] = 0
    out[#out + 1] = count
    out[#out + 1] = k
    out[#out + 1] = math.floor(mean * 1000)
    out[#out + 1] = math.floor(std * 1000)
    out[#out + 1] = distinct
  end
end
for j = 1, #KEYS - 3 * users do
  local key = KEYS[3 * users + j]
  redis.call('SADD', key, ARGV[5 * users + 7 + j])
  if redis.call('PTTL', key) < device_ttl then redis.call('PEXPIRE', key, device_lease) end
  out[#out + 1] = redis.call('SCARD', key)
end
return out
"""


def _run(work: list[Callable[[], None]]) -> None:
    """Runs and removes the pending work (at most once, however often it is retried)."""
    while work:
        work.pop()()


#: A key whose TTL ran under its window is given this much more than the window (see _SCRIPT):
#: a steady voter then refreshes it about once per LEASE_SLACK of its window.
LEASE_SLACK = 1 / 8


def _lease(window_ms: int) -> int:
    return window_ms + max(int(window_ms * LEASE_SLACK), 1)


#: Blocks never expire unless given a time: a score far beyond any vote time.
FOREVER_MS = 2**52


def votes_key(user_id: str) -> str:
    return f"tv:{tag(shard_of(user_id))}:fraud:u:{user_id}:votes"


def stats_key(user_id: str) -> str:
    return f"tv:{tag(shard_of(user_id))}:fraud:u:{user_id}:stats"


def blocked_key(user_id: str) -> str:
    """The sorted set of blocked users of the user's shard (member user id, score = until)."""
    return f"tv:{tag(shard_of(user_id))}:fraud:blocked"


def device_shard(device_id: str) -> int:
    return zlib.crc32(device_id.encode()) % SHARDS


def device_key(device_id: str) -> str:
    return f"tv:{{d{device_shard(device_id)}}}:fraud:dev:{device_id}:users"


@dataclass(slots=True)
class Observation:
    """One vote as the feature state records it."""

    ref: str
    user_id: str
    device_id: str
    ip: str
    time_ms: int
    #: Votes in the submission (velocity counts votes, not calls).
    count: int = 1


#: Per shard: its hash tag, and its key of blocked users (made once, not per vote).
_USER_TAGS = tuple(tag(shard) for shard in range(SHARDS))
_BLOCKED_KEYS = tuple(f"tv:{t}:fraud:blocked" for t in _USER_TAGS)
_DEVICE_TAGS = tuple(f"{{d{shard}}}" for shard in range(SHARDS))


@dataclass
class _Call:
    """One script call: the user and device records of one hash slot (or of everything)."""

    user_keys: list[str] = field(default_factory=list)
    user_args: list[str | int] = field(default_factory=list)
    device_keys: list[str] = field(default_factory=list)
    device_args: list[str] = field(default_factory=list)
    #: The vote index of each user record and of each device record, to route the replies.
    users: list[int] = field(default_factory=list)
    devices: list[int] = field(default_factory=list)

    @property
    def keys(self) -> list[str]:
        return self.user_keys + self.device_keys

    def command(self, sha: str, head: tuple[int, ...]) -> tuple[str | int, ...]:
        return ("EVALSHA", sha, len(self.user_keys) + len(self.device_keys), *self.user_keys,
                *self.device_keys, *head, len(self.users), *self.user_args,
                *self.device_args)


class FeatureState:
    """Reads and updates the feature state of a batch of votes in one round trip."""

    def __init__(self, redis: RedisClient, config: FraudConfig) -> None:
        self.redis = redis
        self.config = config
        self._sha = ""
        # On a single Redis the whole batch is one script call; on a cluster a script may only
        # touch one hash slot, so the batch is split by shard tag (still one pipeline).
        self._by_slot = config.on_redis_cluster
        timing_ms = int(config.fraud_bot_timing_window_seconds * 1000)
        device_ttl_ms = config.fraud_device_ttl_seconds * 1000
        self._head = (int(config.fraud_velocity_window_seconds * 1000), timing_ms,
                      config.fraud_user_history, device_ttl_ms, _lease(timing_ms),
                      _lease(device_ttl_ms))

    async def load_scripts(self) -> None:
        self._sha = str(await self.redis.script_load(_SCRIPT))

    async def record(self, votes: Sequence[Observation],
                     meanwhile: Callable[[], None] | None = None) -> list[History]:
        """Adds the votes to the state; returns each vote's history including itself.

        `meanwhile` runs once, while Redis executes the batch (on a cluster, before it is
        sent): the caller's work that does not need the histories costs no latency.
        """
        pending = [meanwhile] if meanwhile else []
        if not self._sha:
            await self.load_scripts()
        try:
            return await self._record(votes, pending)
        except NoScriptError:
            # Redis restarted (or a cluster node joined) and lost the script. Replaying the
            # batch is safe: votes are set members keyed by ref, device users a set.
            await self.load_scripts()
            return await self._record(votes, pending)

    def plan(self, votes: Sequence[Observation]) -> dict[str, _Call]:
        """The script calls of a batch: one, or on a cluster one per hash tag."""
        calls: dict[str, _Call] = {}
        by_slot = self._by_slot
        call = single = _Call()
        for index, vote in enumerate(votes):
            user_id = vote.user_id
            shard = shard_of(user_id)
            user_tag = _USER_TAGS[shard]
            if by_slot:
                call = calls.get(user_tag) or calls.setdefault(user_tag, _Call())
            user = f"tv:{user_tag}:fraud:u:{user_id}"
            call.user_keys += (f"{user}:votes", f"{user}:stats", _BLOCKED_KEYS[shard])
            call.user_args += (vote.time_ms, vote.ref, vote.ip, user_id, vote.count)
            call.users.append(index)
            device_id = vote.device_id
            if device_id:
                device_tag = _DEVICE_TAGS[device_shard(device_id)]
                if by_slot:
                    call = calls.get(device_tag) or calls.setdefault(device_tag, _Call())
                call.device_keys.append(f"tv:{device_tag}:fraud:dev:{device_id}:users")
                call.device_args.append(user_id)
                call.devices.append(index)
        if not by_slot:
            calls[""] = single
        return calls

    async def _record(self, votes: Sequence[Observation],
                      meanwhile: list[Callable[[], None]]) -> list[History]:
        calls = self.plan(votes)
        replies = await self._execute([call.command(self._sha, self._head)
                                       for call in calls.values()], meanwhile)
        # Flat replies: six numbers per user record, then one per device record.
        user_rows: list[list[int]] = [[]] * len(votes)
        device_users = [0] * len(votes)
        for call, reply in zip(calls.values(), replies, strict=True):
            at = 0
            for index in call.users:
                user_rows[index] = reply[at:at + 6]
                at += 6
            for index in call.devices:
                device_users[index] = reply[at]
                at += 1
            assert at == len(reply)
        return [History(row[1], row[2], row[3] / 1e6, row[4] / 1e6, row[5], users,
                        bool(row[0]))
                for row, users in zip(user_rows, device_users, strict=True)]

    async def _execute(self, commands: list[tuple[str | int, ...]],
                       meanwhile: list[Callable[[], None]]) -> list[Any]:
        """Sends the commands in one round trip; their replies in order.

        Runs (and removes) the `meanwhile` work once the commands are sent.
        """
        if not isinstance(self.redis, Redis):
            # A cluster client routes each call to the node of its slot.
            _run(meanwhile)
            async with self.redis.pipeline(transaction=False) as pipe:
                for command in commands:
                    pipe.execute_command(*command)
                return list(await pipe.execute())
        # On a single server, hiredis packs the commands in C: redis-py packs each argument
        # (about nine per vote) in Python.
        packed = b"".join(pack_command(command)  # type: ignore[arg-type]  # stub: a 1-tuple
                          for command in commands)
        pool = self.redis.connection_pool
        for attempt in (1, 2):
            connection = await pool.get_connection()  # type: ignore[no-untyped-call]
            try:
                await connection.send_packed_command(packed)
                _run(meanwhile)
                return [await connection.read_response() for _ in commands]
            except RedisConnectionError:
                # A connection broken since its last use (Redis restarted): retry once on a
                # fresh one. Replaying is safe (see record).
                await connection.disconnect()
                if attempt == 2:
                    raise
            except BaseException:
                # Replies may be left unread (an error reply, a cancellation): never reuse it.
                await connection.disconnect()
                raise
            finally:
                await pool.release(connection)
        raise AssertionError("unreachable")

    async def set_blocked(self, user_ids: Sequence[str], blocked: bool = True,
                          until_ms: dict[str, int] | None = None) -> None:
        """Flags (or unflags) users so every replica refuses their votes at once."""
        if not user_ids:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for user_id in user_ids:
                if blocked:
                    pipe.zadd(blocked_key(user_id),
                              {user_id: (until_ms or {}).get(user_id) or FOREVER_MS})
                else:
                    pipe.zrem(blocked_key(user_id), user_id)
            await pipe.execute()
