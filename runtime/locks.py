"""PostgreSQL advisory locks that more than one service takes: one function per lock, so the
key every party hashes is written once.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from psycopg import AsyncConnection


def _round_key(round_id: str) -> str:
    return f"televote.results:{round_id}"


async def round_results(connection: AsyncConnection[Any], round_id: str) -> None:
    """Wait for, then hold until the transaction ends, round `round_id`'s finalization lock.

    results_svc holds it while it recounts and stores a final result (`round_results_session`);
    whoever changes what the result counts (a fraud verdict, a re-scored vote's rejection)
    holds it while it checks that no result is stored yet and makes the change. So a change
    either commits before the recount starts, and is counted, or finds the result stored.
    `round_id` must be the canonical text (runtime.ids). Take several rounds' locks in sorted
    order.
    """
    await connection.execute("SELECT pg_advisory_xact_lock(hashtext(%s))",
                             (_round_key(round_id),))


@contextlib.asynccontextmanager
async def round_results_session(connection: AsyncConnection[Any], round_id: str, *,
                                wait: bool) -> AsyncIterator[bool]:
    """The same lock held by the session (one finalizer or checkpointer at a time, across
    replicas), committed at once so that a REPEATABLE READ transaction that follows takes its
    snapshot after the previous holder's commit. `wait` False: yield False at once if another
    holds it."""
    async with session_lock(connection, _round_key(round_id), wait=wait) as got:
        yield got


@contextlib.asynccontextmanager
async def session_lock(connection: AsyncConnection[Any], key: str, *,
                       wait: bool) -> AsyncIterator[bool]:
    """The advisory lock `key`, held by the session until the block ends, taken (and
    committed) before the block's first transaction, so a REPEATABLE READ snapshot taken in it
    sees the previous holder's commits. `wait` False: yield False at once if another holds
    it."""
    if wait:
        await connection.execute("SET LOCAL lock_timeout = '30s'")
        await connection.execute("SELECT pg_advisory_lock(hashtext(%s))", (key,))
        got = True
    else:
        cursor = await connection.execute(
            "SELECT pg_try_advisory_lock(hashtext(%s)) AS got", (key,))
        row: Any = await cursor.fetchone()
        got = bool(row["got"])
    await connection.commit()
    try:
        yield got
    finally:
        if got:
            await connection.execute("SELECT pg_advisory_unlock(hashtext(%s))", (key,))
            await connection.commit()


async def try_singleton(connection: AsyncConnection[Any], name: str) -> bool:
    """Take the transaction lock of a job only one replica runs at a time, if it is free."""
    cursor = await connection.execute("SELECT pg_try_advisory_xact_lock(hashtext(%s)) AS mine",
                                      (name,))
    row: Any = await cursor.fetchone()
    return bool(row and row["mine"])
