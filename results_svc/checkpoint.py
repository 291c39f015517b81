"""Result checkpoints: judge a round's ledger while the round is open, so that the close only
judges the last seconds of votes (VOTING_CLOSE -> RESULTS_READY in well under a second at 10
million votes, where a recount of the whole round takes minutes).

A checkpoint of round A is a durable prefix of the final result: every ledger row of A admitted
before a watermark W (ms) judged by `results_svc.rules` exactly as the full recount judges it
(`store.JUDGED_SQL`), with

- the counted and ledger totals per contestant, and the rows that do not count with their
  reason (`round_checkpoint_invalid`, by ledger row);
- the Merkle tree so far: the leaves' completed 65,536-leaf chunks and the first-leaf key of
  every receipt block go straight into `round_result_leaves` / `round_result_blocks` (what
  receipts read once the result is stored), the roots of completed blocks into
  `round_checkpoint_roots`, the leaves of the unfinished block in the checkpoint row. The tree's
  root is the root over the block roots (merkle.TopTree), so nothing is ever rehashed.

Nothing per voter is kept: a row's running totals (free votes in the episode, in the round,
paid votes ever) are recomputed from the voter's own ledger rows when the row is judged, as the
full recount does, which is cheap for the few voters of a step.

Extending (`advance`) happens in one REPEATABLE READ snapshot S, from W to a new watermark
W' (the results_svc replica that holds the round's advisory lock does it, every
RESULTS_CHECKPOINT_MS; any replica can, the state is in PostgreSQL). W' trails the Redis clock
(which stamps `admitted_ms`) by RESULTS_CHECKPOINT_LAG_MS, longer than a vote batch may take to
commit (VOTE_COMMIT_TIMEOUT_MS), so normally every row below W' has committed by then. Normally
is not enough for invariant 5, so what a checkpoint relies on is checked, not assumed:

1. No row below W committed after S. Every ledger insert logs (trigger, `ledger_appends`) its
   transaction id, round, episode and lowest `admitted_ms`; a logged insert whose transaction is
   not visible in S, below W, of A's round or episode or with paid votes (those change the
   voters' running totals), makes the checkpoint stale. That covers any writer, including a
   vote_svc batch that commits long after its lease ran out and the reconciler undid it in
   Redis, or rows written by hand.
2. The round's rules as they apply below W (opening, channel closes cut at W, contestants,
   quota, cap) are unchanged (a window extended or cut, an episode quota changed).
3. Inputs that change how judged rows count: fraud rejections and wallet credits committed
   after S (trigger log `result_input_changes`) name voters whose rows below W are judged again
   (their old contribution taken out, the new one in).

A stale checkpoint is dropped and rebuilt by the checkpointer; at the close it makes the
finalizer fall back to the full recount (`final.Finalizer`), which stays the reference. At the
close the finalizer extends the checkpoint to the end of the ledger in its own snapshot (the
last seconds of votes) and signs; `tidy` drops the checkpoint once the result is stored.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from psycopg import AsyncConnection

from results_svc import store
from results_svc.merkle import HASH_SIZE, MerkleTree
from results_svc.rounds import RoundInfo
from runtime.storage import fetch_one

log = logging.getLogger(__name__)

LEAVES_PER_CHUNK = 65_536
#: The watermark of a checkpoint that has judged nothing yet, and "no upper bound".
BEFORE_ALL = -(2**62)
AFTER_ALL = 2**62




def judge_params(info: RoundInfo) -> dict[str, Any]:
    return {"round": info.round_id, "episode": info.episode_id,
            "contestants": list(info.contestant_ids), "opens": info.opens_ms,
            "app": info.channel_close_ms("APP"), "web": info.channel_close_ms("WEB"),
            "sms": info.channel_close_ms("SMS"), "quota": info.free_quota, "cap": info.free_cap,
            "lag": info.receive_lag_ms}


def rules_below(info: RoundInfo, watermark_ms: int) -> dict[str, Any]:
    """The round's rules as they judge rows admitted before `watermark_ms`: two rule sets with
    the same value judge every such row alike (a channel close at or after the watermark
    cannot tell them apart: a row is judged by a time no later than its admission)."""
    params = judge_params(info)
    return {"opens": params["opens"], "contestants": sorted(params["contestants"]),
            "quota": params["quota"], "cap": params["cap"], "lag": params["lag"],
            "close": {c: min(params[c.lower()], watermark_ms) for c in ("APP", "WEB", "SMS")}}


@dataclass
class Checkpoint:
    """A round's checkpoint: its row in round_checkpoints, as read or about to be written."""

    round_id: str
    block_leaves: int
    watermark_ms: int = BEFORE_ALL
    snapshot: str = ""
    rules: dict[str, Any] = field(default_factory=dict)
    tree_size: int = 0
    block_tail: bytes = b""
    chunk_start: tuple[int, str, bytes] | None = None
    counts: dict[str, int] = field(default_factory=dict)
    ledger: dict[str, int] = field(default_factory=dict)

    @property
    def fresh(self) -> bool:
        return not self.snapshot


async def load(connection: AsyncConnection[Any], round_id: str) -> Checkpoint | None:
    row: Any = await fetch_one(connection, store.CHECKPOINT, (round_id,))
    if row is None:
        return None
    start = None
    if row["chunk_start_ms"] is not None:
        start = (row["chunk_start_ms"], row["chunk_start_id"], bytes(row["chunk_start_hash"]))
    return Checkpoint(round_id, row["block_leaves"], row["watermark_ms"], row["snapshot"],
                      row["rules"], row["tree_size"], bytes(row["block_tail"]), start,
                      {k: int(v) for k, v in row["counts"].items()},
                      {k: int(v) for k, v in row["ledger"].items()})


async def save(connection: AsyncConnection[Any], state: Checkpoint) -> None:
    """Store the checkpoint as of this transaction's snapshot."""
    start = state.chunk_start or (None, None, None)
    await connection.execute(
        store.SAVE_CHECKPOINT,
        {"round": state.round_id, "watermark": state.watermark_ms,
         "rules": json.dumps(state.rules), "size": state.tree_size,
         "block_leaves": state.block_leaves, "tail": state.block_tail, "start_ms": start[0],
         "start_id": start[1], "start_hash": start[2], "counts": json.dumps(state.counts),
         "ledger": json.dumps(state.ledger)})


async def discard(connection: AsyncConnection[Any], round_id: str) -> None:
    """Drop a round's checkpoint and the tree parts it wrote (only while it has no result).
    The report's rollups folded its verdicts: they are told to start over."""
    await connection.execute(store.LOG_ROLLUP_RESET, (round_id, round_id))
    for statement in store.DISCARD_CHECKPOINT:
        await connection.execute(statement, (round_id,))


async def staleness(connection: AsyncConnection[Any], info: RoundInfo, state: Checkpoint,
                    rejudge_limit: int) -> str | None:
    """Why the checkpoint no longer is a prefix of the round's result (or is one that costs
    more to repair than to rebuild), or None."""
    if state.fresh:
        return None
    if rules_below(info, state.watermark_ms) != state.rules:
        return "the round's rules changed below the watermark"
    # Each changed voter's rows are judged again (advance). Past a step's worth of voters (a
    # credit granted to every voter at once, say) judging the round anew is the bounded cost;
    # a list of millions of voters in one statement is not.
    row: Any = await fetch_one(
        connection, store.CHANGED_VOTER_COUNT,
        {"round": info.round_id, "limit": rejudge_limit + 1}, prepare=False)
    if row["n"] > rejudge_limit:
        return f"credits or fraud rejections of over {rejudge_limit} voters changed"
    cursor = await connection.execute(
        store.LEDGER_APPENDED_SINCE,
        {"round": info.round_id, "episode": info.episode_id}, prepare=False)
    if await cursor.fetchone() is not None:
        return "ledger rows committed below the watermark after it was taken"
    return None


async def _changed_voters(connection: AsyncConnection[Any], round_id: str) -> list[str]:
    cursor = await connection.execute(store.CHANGED_VOTERS, {"round": round_id}, prepare=False)
    return [row["user_id"] for row in await cursor.fetchall()]


async def _take_out(connection: AsyncConnection[Any], state: Checkpoint, users: list[str]
                    ) -> None:
    """Remove what `users`' rows below the watermark contributed to the counted totals."""
    cursor = await connection.execute(
        store.CHANGED_VOTER_COUNTS,
        {"users": users, "round": state.round_id, "lo": state.watermark_ms}, prepare=False)
    for row in await cursor.fetchall():
        if row["contestant"] in state.counts:
            state.counts[row["contestant"]] -= row["n"]
    await connection.execute(
        store.FORGET_INVALID,
        (state.round_id, users))


async def _step_end(connection: AsyncConnection[Any], round_id: str, lo: int, hi: int,
                    max_rows: int) -> int:
    """A watermark at most `hi` that leaves about `max_rows` rows in [lo, watermark)."""
    cursor = await connection.execute(
        store.ADMITTED_BETWEEN,
        (round_id, lo, hi, max_rows), prepare=False)
    row: Any = await cursor.fetchone()
    return hi if row is None else max(row["admitted_ms"], lo + 1)


async def advance(connection: AsyncConnection[Any], info: RoundInfo, state: Checkpoint,
                  upto_ms: int, max_rows: int) -> bool:
    """Extend the checkpoint towards `upto_ms` by one step of about `max_rows` rows, in the
    connection's (REPEATABLE READ) transaction, and save it. The caller has checked
    `staleness`. True when the watermark reached `upto_ms`."""
    # A step's rows are sorted twice (by voter, then in ledger order): in memory, not on disk.
    # Every row is reached through an index (the round's ledger order, the voter, the vote id,
    # the wallet), never by scanning a partition: a growing ledger's statistics are always
    # stale, and a plan that believes a partition is small scans it once per judged row
    # (quadratic) or once per step (a step then costs the whole ledger). For the same reason
    # the step's queries are planned for their values each time (prepare=False), never with
    # a generic plan.
    # No parallel plans either: a step is small, and a parallel plan carries its voter lists
    # to every worker once per partition.
    await connection.execute(store.STEP_PLANNER_SETTINGS)
    lo = state.watermark_ms
    if not state.fresh and state.chunk_start is None and state.tree_size % LEAVES_PER_CHUNK:
        raise AssertionError("a checkpoint inside a chunk knows where the chunk starts")
    users = [] if state.fresh else await _changed_voters(connection, state.round_id)
    if users:
        await _take_out(connection, state, users)
        # The report's rollups folded these voters' rows with the old verdicts.
        await connection.execute(store.LOG_ROLLUP_RESETS, (state.round_id, users))
    hi = await _step_end(connection, info.round_id, lo, upto_ms, max_rows) if upto_ms > lo \
        else lo
    if not state.counts:
        state.counts = dict.fromkeys(info.contestant_ids, 0)
    bounds = {"round": info.round_id, "lo": lo, "hi": hi, "users": users}
    found: Any = await fetch_one(connection, store.STEP_SQL, bounds, prepare=False)
    voters = sorted(set(found["voters"]) | set(users))
    cursor = await connection.execute(
        store.DELTA_SQL, {**judge_params(info), **bounds, "voters": voters,
                    "repeated": found["repeated"]}, prepare=False)
    rows: list[Any] = await cursor.fetchall()
    invalid = []
    block_keys = []
    roots = []
    chunks = []
    for row in rows:
        contestant, count = row["contestant_id"], row["count"]
        if row["reason"] is None:
            state.counts[contestant] = state.counts.get(contestant, 0) + count
        else:
            invalid.append((state.round_id, row["user_id"], row["request_id"], row["vote_id"],
                            contestant, count, row["admitted_ms"], row["receipt_hash"],
                            row["reason"]))
        if not row["fresh"]:
            continue
        state.ledger[contestant] = state.ledger.get(contestant, 0) + count
        key = (row["admitted_ms"], row["vote_id"], bytes(row["receipt_hash"]))
        if state.tree_size % LEAVES_PER_CHUNK == 0:
            state.chunk_start = key
        if state.tree_size % state.block_leaves == 0:
            block_keys.append((state.round_id, state.tree_size // state.block_leaves, *key))
        state.block_tail += key[2]
        state.tree_size += 1
        if state.tree_size % state.block_leaves == 0:
            roots.append((state.round_id, state.tree_size // state.block_leaves - 1,
                          block_root(state.block_tail)))
            state.block_tail = b""
        if state.tree_size % LEAVES_PER_CHUNK == 0:
            assert state.chunk_start is not None
            chunks.append((state.tree_size // LEAVES_PER_CHUNK - 1, state.chunk_start, key))
            state.chunk_start = None
    state.watermark_ms = hi
    state.rules = rules_below(info, hi)
    await save(connection, state)
    async with connection.cursor() as cur:
        if invalid:
            async with cur.copy(
                    store.COPY_INVALID
                    ) as copy:
                for record in invalid:
                    await copy.write_row(record)
        if block_keys:
            await cur.executemany(
                store.INSERT_BLOCK_START, block_keys)
        if roots:
            await cur.executemany(store.INSERT_BLOCK_ROOT, roots)
        for chunk, first, last in chunks:
            await _write_chunk(cur, state.round_id, chunk, first, last)
    return hi >= upto_ms


def block_root(leaves: bytes) -> bytes:
    return MerkleTree([leaves[i:i + HASH_SIZE] for i in range(0, len(leaves), HASH_SIZE)]).root


async def _write_chunk(cur: Any, round_id: str, chunk: int, first: tuple[int, str, bytes],
                       last: tuple[int, str, bytes] | None) -> None:
    """The chunk's leaves, from the ledger rows between its first and last leaf's keys (the
    same snapshot that judged them: nothing else lies between). The plain bounds on
    admitted_ms keep the plan on the round's ordered index whatever the statistics say."""
    await cur.execute(
        store.INSERT_CHUNK_LEAVES + ("" if last is None else store.CHUNK_LEAVES_UPTO),
        (round_id, chunk, round_id, first[0], *first,
         *(() if last is None else (last[0], *last))), prepare=False)


@dataclass
class Tree:
    """The signed tree of a finished checkpoint."""

    size: int
    root: bytes
    block_roots: list[bytes]


async def finish(connection: AsyncConnection[Any], state: Checkpoint) -> Tree:
    """After the last step (the ledger's end): write the unfinished chunk, and give the tree's
    size, root and block roots."""
    async with connection.cursor() as cur:
        if state.chunk_start is not None:
            await _write_chunk(cur, state.round_id, state.tree_size // LEAVES_PER_CHUNK,
                               state.chunk_start, None)
        await cur.execute(store.BLOCK_ROOTS, (state.round_id,))
        roots = [bytes(row["root"]) for row in await cur.fetchall()]
    if state.block_tail:
        roots.append(block_root(state.block_tail))
    assert len(roots) == -(-state.tree_size // state.block_leaves)
    return Tree(state.tree_size, MerkleTree(roots).root, roots)


async def tidy(connection: AsyncConnection[Any]) -> None:
    """Drop the checkpoints of stored results (kept out of the close's transaction: at 10
    million votes their roots and invalid rows take a while to delete), and forget log entries
    that every live checkpoint's snapshot, and every later one, can see (a checkpoint of a
    round that no longer takes votes holds nothing back)."""
    await connection.execute(store.DROP_FINALIZED_CHECKPOINTS)
    for statement in store.FORGET_SEEN_CHANGES:
        await connection.execute(statement)
