"""Feature state in Redis, updated by scoring itself: one pipelined round trip per batch.

Keys (Redis Cluster safe: every script call touches one hash slot):
- `tv:{s<N>}:fraud:u:<user>:votes` sorted set in the user's shard (runtime.keys): the user's
  votes within the timing window, newest `fraud_user_history` kept, score = vote time (ms),
  member = "<ip>|<ref>" (a retried vote with the same ref is not counted twice).
- `tv:{s<N>}:fraud:blocked` sorted set per user shard: flagged/blocked users of the shard,
  score = until when (ms; 2**52 for never). It mirrors the USER rows of fraud_blocks (the
  system of record) so every replica sees a flag at once; rebuilt from PostgreSQL at start.
- `tv:{d<N>}:fraud:dev:<device>:users` set of user ids seen on a device, tagged by a device
  shard of its own.

On a single Redis a batch is one script call. On Redis Cluster (REDIS_CLUSTER=true) a script
may only touch one hash slot, so the batch is split into one call per user shard and per
device shard, sent in one pipeline.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from redis.exceptions import NoScriptError

from fraud_svc.config import FraudConfig
from fraud_svc.features import History
from runtime.keys import SHARDS, shard_of, tag
from runtime.storage import RedisClient

# One script for a whole group of votes. ARGV[1..4]: velocity window (ms), timing window (ms),
# history cap, device TTL (s). ARGV[5]: the records, one per line, tab-separated:
#   u <votes key index> <blocked key index> <time ms> <ref> <ip> <user>
#   d <device key index> <user>
# Packing the records into one argument keeps the client's cost per vote low (redis-py
# encodes every argument separately). Replies: one row per record, in order:
#   u -> {blocked, window votes, intervals, mean interval (us), std dev (us), distinct IPs}
#   d -> {distinct users on the device}
_SCRIPT = """
local window = tonumber(ARGV[1])
local timing = tonumber(ARGV[2])
local cap = tonumber(ARGV[3])
local device_ttl = ARGV[4]
local out = {}
local function split(line)
  local fields, start = {}, 1
  while true do
    local tab = string.find(line, '\\t', start, true)
    if not tab then
      fields[#fields + 1] = string.sub(line, start)
      return fields
    end
    fields[#fields + 1] = string.sub(line, start, tab - 1)
    start = tab + 1
  end
end
for line in string.gmatch(ARGV[5], '[^\\n]+') do
  local f = split(line)
  if f[1] == 'd' then
    local key = KEYS[tonumber(f[2])]
    redis.call('SADD', key, f[3])
    redis.call('EXPIRE', key, device_ttl)
    out[#out + 1] = {redis.call('SCARD', key)}
  else
    local votes = KEYS[tonumber(f[2])]
    local blocked_key = KEYS[tonumber(f[3])]
    local now = tonumber(f[4])
    local ref, ip, user = f[5], f[6], f[7]
    local until_ms = redis.call('ZSCORE', blocked_key, user)
    if until_ms and tonumber(until_ms) > now then
      -- A flagged user's votes are refused without scoring: nothing to record or compute.
      out[#out + 1] = {1, 0, 0, 0, 0, 0}
    else
      redis.call('ZADD', votes, now, ip .. '|' .. ref)
      redis.call('ZREMRANGEBYSCORE', votes, '-inf', now - timing)
      redis.call('ZREMRANGEBYRANK', votes, 0, -cap - 1)
      redis.call('PEXPIRE', votes, timing)
      local entries = redis.call('ZRANGE', votes, 0, -1, 'WITHSCORES')
      local count, k, sum, sumsq, distinct, last = 0, 0, 0, 0, 0, nil
      local seen = {}
      for j = 1, #entries, 2 do
        local t = tonumber(entries[j + 1])
        if t > now - window then count = count + 1 end
        if last ~= nil then
          local d = t - last
          k = k + 1
          sum = sum + d
          sumsq = sumsq + d * d
        end
        last = t
        local member = entries[j]
        local address = string.sub(member, 1, string.find(member, '|', 1, true) - 1)
        if address ~= '' and not seen[address] then
          seen[address] = true
          distinct = distinct + 1
        end
      end
      local mean, std = 0, 0
      if k > 0 then
        mean = sum / k
        local variance = sumsq / k - mean * mean
        if variance > 0 then std = math.sqrt(variance) end
      end
      out[#out + 1] = {0, count, k, math.floor(mean * 1000), math.floor(std * 1000),
                       distinct}
    end
  end
end
return out
"""

#: Blocks never expire unless given a time: a score far beyond any vote time.
FOREVER_MS = 2**52


def votes_key(user_id: str) -> str:
    return f"tv:{tag(shard_of(user_id))}:fraud:u:{user_id}:votes"


def blocked_key(user_id: str) -> str:
    """The sorted set of blocked users of the user's shard (member user id, score = until)."""
    return f"tv:{tag(shard_of(user_id))}:fraud:blocked"


def device_shard(device_id: str) -> int:
    return zlib.crc32(device_id.encode()) % SHARDS


def device_key(device_id: str) -> str:
    return f"tv:{{d{device_shard(device_id)}}}:fraud:dev:{device_id}:users"


@dataclass(slots=True)
class Observation:
    """One vote as the feature state records it (ids without tabs or newlines)."""

    ref: str
    user_id: str
    device_id: str
    ip: str
    time_ms: int


@dataclass
class _Call:
    """One script call: the keys and records of one hash slot (or of everything)."""

    keys: dict[str, int] = field(default_factory=dict)
    records: list[str] = field(default_factory=list)
    #: (vote index, "u" or "d") per record, to route the replies.
    owners: list[tuple[int, str]] = field(default_factory=list)

    def key(self, name: str) -> int:
        index = self.keys.get(name)
        if index is None:
            index = self.keys[name] = len(self.keys) + 1
        return index


class FeatureState:
    """Reads and updates the feature state of a batch of votes in one round trip."""

    def __init__(self, redis: RedisClient, config: FraudConfig) -> None:
        self.redis = redis
        self.config = config
        self._sha = ""
        # On a single Redis the whole batch is one script call; on a cluster a script may only
        # touch one hash slot, so the batch is split by shard tag (still one pipeline).
        self._by_slot = config.redis_cluster

    async def load_scripts(self) -> None:
        self._sha = str(await self.redis.script_load(_SCRIPT))

    async def record(self, votes: Sequence[Observation]) -> list[History]:
        """Adds the votes to the state; returns each vote's history including itself."""
        if not self._sha:
            await self.load_scripts()
        try:
            return await self._record(votes)
        except NoScriptError:
            # Redis restarted (or a cluster node joined) and lost the script. Replaying the
            # batch is safe: votes are set members keyed by ref, device users a set.
            await self.load_scripts()
            return await self._record(votes)

    def plan(self, votes: Sequence[Observation]) -> dict[str, _Call]:
        """The script calls of a batch: one, or on a cluster one per hash tag."""
        calls: dict[str, _Call] = {}
        for index, vote in enumerate(votes):
            user_tag = tag(shard_of(vote.user_id))
            call = calls.setdefault(user_tag if self._by_slot else "", _Call())
            call.records.append("\t".join((
                "u", str(call.key(f"tv:{user_tag}:fraud:u:{vote.user_id}:votes")),
                str(call.key(f"tv:{user_tag}:fraud:blocked")), str(vote.time_ms),
                vote.ref, vote.ip, vote.user_id)))
            call.owners.append((index, "u"))
            if vote.device_id:
                device_tag = f"{{d{device_shard(vote.device_id)}}}"
                call = calls.setdefault(device_tag if self._by_slot else "", _Call())
                call.records.append("\t".join((
                    "d", str(call.key(f"tv:{device_tag}:fraud:dev:{vote.device_id}:users")),
                    vote.user_id)))
                call.owners.append((index, "d"))
        return calls

    async def _record(self, votes: Sequence[Observation]) -> list[History]:
        c = self.config
        calls = self.plan(votes)
        head = (int(c.fraud_velocity_window_seconds * 1000),
                int(c.fraud_bot_timing_window_seconds * 1000), c.fraud_user_history,
                c.fraud_device_ttl_seconds)
        async with self.redis.pipeline(transaction=False) as pipe:
            for call in calls.values():
                pipe.evalsha(self._sha, len(call.keys), *call.keys, *head,
                             "\n".join(call.records))
            replies = await pipe.execute()
        user_rows: list[list[int]] = [[]] * len(votes)
        device_users = [0] * len(votes)
        for call, reply in zip(calls.values(), replies, strict=True):
            for (index, kind), row in zip(call.owners, reply, strict=True):
                if kind == "u":
                    user_rows[index] = row
                else:
                    device_users[index] = int(row[0])
        return [History(window_votes=int(row[1]), intervals=int(row[2]),
                        interval_mean_s=int(row[3]) / 1e6, interval_std_s=int(row[4]) / 1e6,
                        distinct_ips=int(row[5]), device_users=device_users[index],
                        blocked=bool(int(row[0])))
                for index, row in enumerate(user_rows)]

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
