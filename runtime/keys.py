"""Redis keys shared across services, laid out so the same scripts run on Redis Cluster.

Every key that one vote touches carries the hash tag of the voter's shard, `{s<N>}`, so the
vote admission script's keys always share one cluster slot. What every vote needs to read (the
open round's window) is therefore mirrored into every shard: sync_svc writes SHARDS copies of
a round's window, vote_svc's admission script reads the copy in its voter's shard.

Times are milliseconds since the epoch by the Redis server's clock (`TIME`): the admission
script checks the window against that clock, so sync_svc stamps windows with it too.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass

from runtime.storage import RedisClient, raise_first_error, run_scripts

#: Shards of per-user state. Changing it moves users between slots: rebuild Redis after.
SHARDS = 64

#: Channel names as they appear in window fields (`close_<channel>_ms`).
CHANNELS = ("app", "web", "sms")


def shard_of(user_id: str) -> int:
    """The shard a user's admission state lives in."""
    return zlib.crc32(user_id.encode()) % SHARDS


def tag(shard: int) -> str:
    """The Redis Cluster hash tag of a shard."""
    return f"{{s{shard}}}"


def window_key(shard: int, round_id: str) -> str:
    """A round's window as seen by the voters of one shard (a Redis hash).

    Fields, all strings: episode_id; state (OPEN or CLOSED); opens_at_ms; closes_at_ms (the
    broadcast close); close_app_ms, close_web_ms, close_sms_ms (when each channel stops taking
    votes); contestants (comma-separated contestant ids); free_quota (free votes per user per
    episode); free_cap (extra cap on free votes per user in this round, 0 = none);
    rate_limit_per_minute (votes per user per minute; vote_svc's default when absent);
    version (the episode version that wrote it).
    """
    return f"tv:{tag(shard)}:window:{round_id}"


def user_key(shard: int, user_id: str) -> str:
    """A voter's admission cache (a Redis hash, written only by vote_svc).

    Fields: `credited` and `spent` (paid votes ever credited / spent or clawed back by a
    refund; balance = credited - spent; present once loaded from PostgreSQL, `credited` only
    ever rises); `free:<episode_id>` (free votes used in that episode). A missing field means
    "not loaded": vote_svc loads it from PostgreSQL (wallets, free_vote_usage) before
    admitting.
    """
    return f"tv:{tag(shard)}:user:{user_id}"


def idempotency_key(shard: int, user_id: str, request_id: str) -> str:
    """The outcome of a vote request (a string; vote_svc's admission script owns the format).

    `P|...` while the admission waits for its ledger commit (with a lease), `D|...` once
    committed. Deleted when an admission is undone, so it never outlives an undone admission.
    """
    return f"tv:{tag(shard)}:idem:{user_id}:{request_id}"


def pending_key(shard: int) -> str:
    """The shard's admissions waiting for their ledger commit (a sorted set, vote_svc's).

    Member `vote_id|round_id|contestant_id|vote_type|count|admitted_ms|episode_id|<the
    idempotency key>`, score the lease's end (ms, Redis clock). Written by the admission
    script; vote_svc's reconciler (vote_svc/reconcile.py) removes members once settled and
    undoes those whose replica died without committing them.
    """
    return f"tv:{tag(shard)}:pending"


@dataclass(frozen=True)
class PendingMember:
    """The fields of a pending_key member."""

    vote_id: str
    round_id: str
    contestant_id: str
    vote_type: str
    count: int
    admitted_ms: int
    episode_id: str
    idempotency_key: str


def parse_pending(member: bytes | str) -> PendingMember:
    """A pending_key member's fields; ValueError if it is not one."""
    text = member.decode() if isinstance(member, bytes) else member
    (vote_id, round_id, contestant_id, vote_type, count, admitted_ms, episode_id,
     idempotency_key) = text.split("|", 7)
    return PendingMember(vote_id, round_id, contestant_id, vote_type, int(count),
                         int(admitted_ms), episode_id, idempotency_key)


def rate_key(shard: int, user_id: str) -> str:
    """A voter's rate-limit window (a hash: `minute` start ms, `n` votes in it)."""
    return f"tv:{tag(shard)}:rate:{user_id}"


def live_key(shard: int, round_id: str) -> str:
    """Provisional live counters of a round for one shard's voters (hash contestant_id -> votes).

    results_svc sums the SHARDS copies. Provisional: the ledger is the truth; after a Redis
    loss vote_svc rebuilds them from the ledger (`votes.shard`).
    """
    return f"tv:{tag(shard)}:live:{round_id}"


def live_minutes_key(shard: int, round_id: str) -> str:
    """Per-minute buckets of a round for one shard (hash `<minute_start_ms>:<contestant_id>` ->
    votes, minutes by the Redis server clock), for results_svc's trends."""
    return f"tv:{tag(shard)}:minutes:{round_id}"


def shard_marker_key(shard: int) -> str:
    """Set by vote_svc once a shard's live counters are known to be complete; its absence
    after a Redis flush makes vote_svc rebuild that shard's counters from the ledger."""
    return f"tv:{tag(shard)}:marker"


def show_channel(episode_id: str) -> str:
    """Pub/sub channel of an episode's show events (sync_svc replicas fan out through it)."""
    return f"tv:show:{episode_id}"


async def server_time_ms(redis: RedisClient) -> int:
    """Now, by the Redis server's clock: the clock every window is judged by."""
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


# Writes one shard's copy of a window unless the copy already holds a later state: a write
# whose `version` (the episode version it was read at) is below the stored one is refused, and
# so is any write that would reopen a CLOSED copy (a round opens once; `_CLOSE_WINDOW` closes
# the copies before the close commits, without a version). So a delayed or replayed write of
# an older committed state (sync_svc's periodic repair, a slow replica) can never reopen a
# closed window or undo an extension. Returns -1 when refused, else how many fields other
# than `version` it changed (0: the copy already said so).
# ARGV: field, value, ... (window fields; a write without `version` is not ordered).
_WRITE_WINDOW = """
local new = {}
for i = 1, #ARGV, 2 do new[ARGV[i]] = ARGV[i + 1] end
local stored = redis.call('HMGET', KEYS[1], 'version', 'state')
if stored[2] == 'CLOSED' and new['state'] == 'OPEN' then return -1 end
if stored[1] and new['version'] and tonumber(new['version']) < tonumber(stored[1]) then
  return -1
end
local changed = 0
for i = 1, #ARGV, 2 do
  if ARGV[i] ~= 'version' and redis.call('HGET', KEYS[1], ARGV[i]) ~= ARGV[i + 1] then
    changed = changed + 1
  end
end
redis.call('HSET', KEYS[1], unpack(ARGV))
return changed
"""


async def write_window(redis: RedisClient, round_id: str, fields: Mapping[str, str | int]
                       ) -> int:
    """Mirror a round's window into every shard (the only writer is sync_svc), except where a
    shard's copy holds a later state (`_WRITE_WINDOW`); returns how many copies it changed."""
    script = redis.register_script(_WRITE_WINDOW)
    args = [str(part) for pair in fields.items() for part in pair]
    replies = raise_first_error(await run_scripts(
        redis, [(script, [window_key(shard, round_id)], args) for shard in range(SHARDS)]))
    return sum(int(reply) > 0 for reply in replies)


async def read_window(redis: RedisClient, round_id: str, shard: int = 0) -> dict[str, str]:
    """One shard's copy of a round's window (empty when the round was never opened)."""
    raw = await redis.hgetall(window_key(shard, round_id))
    return {_text(key): _text(value) for key, value in raw.items()}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# Closes one shard's copy of a window at the Redis server's own "now" (never later than what
# it already says) and returns that moment. Reading the clock inside the script makes the
# close and its time one step: no vote can be admitted in this shard at or after the returned
# time, which is what lets the caller record a close time that every acknowledged vote
# precedes.
# A copy that Redis lost is closed too, as a closed window that opened and closed now: else
# vote_svc, finding no window, could restore the OPEN round it read from PostgreSQL just
# before the close committed, after this close ran (its restore only fills missing copies).
# The close is recorded as the millisecond AFTER the script ran: a vote admitted earlier in the
# same millisecond carries that millisecond as its time, and the round's rules count votes
# admitted strictly before the close, so closing "at now" would refuse to count a vote that was
# acknowledged. Admissions after the script are refused by `state`, whatever their time.
_CLOSE_WINDOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + 1
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('HSET', KEYS[1], 'opens_at_ms', now) end
for _, field in ipairs(ARGV) do
  local close = tonumber(redis.call('HGET', KEYS[1], field))
  if close == nil or close > now then redis.call('HSET', KEYS[1], field, now) end
end
redis.call('HSET', KEYS[1], 'state', 'CLOSED')
return now
"""


async def close_window(redis: RedisClient, round_id: str) -> int:
    """Close every shard's copy of a round's window now; returns when the last one closed.

    Every vote acknowledged in this round was admitted before the returned time (epoch ms,
    Redis clock), so it is the close time to record.
    """
    script = redis.register_script(_CLOSE_WINDOW)
    fields = [f"close_{channel}_ms" for channel in CHANNELS]
    closed_at = raise_first_error(await run_scripts(
        redis, [(script, [window_key(shard, round_id)], fields) for shard in range(SHARDS)]))
    return max(int(moment) for moment in closed_at)
