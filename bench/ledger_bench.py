"""What a million votes add to PostgreSQL: bytes per table (heap, indexes, TOAST) and WAL.

Starts a mesh (fraud scoring on, so its audit rows are counted too), sends votes through
vote_svc's batch path for --duration seconds (bench/vote_bench.py's gateway batches: one
ledger row per vote, written by group commit as in production), and compares every table's
size (partitions counted in their parent) and the WAL position before and after. The
figures feed the capacity model (deploy/README.md): disk per million votes, and the write
rate a primary and its standbys must carry.

    python -m bench.ledger_bench --duration 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import psycopg

from bench.vote_bench import _batches, _ledger_check, _round
from ops.edge import ONE_LOAD_GENERATOR
from ops.processes import run_stopping_on_sigterm
from ops.stack import Stack, StackSettings

#: Every table's total size (heap, indexes, TOAST), a partition counted in its parent.
_SIZES = """
SELECT coalesce(parent.relname, c.relname) AS table_name,
       sum(pg_relation_size(c.oid)) AS heap,
       sum(pg_indexes_size(c.oid)) AS indexes,
       sum(pg_total_relation_size(c.oid) - pg_relation_size(c.oid) - pg_indexes_size(c.oid))
         AS toast
  FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'public'
  LEFT JOIN pg_inherits i ON i.inhrelid = c.oid
  LEFT JOIN pg_class parent ON parent.oid = i.inhparent
 WHERE c.relkind = 'r'
 GROUP BY 1
"""


async def _snapshot(url: str) -> tuple[dict[str, dict[str, int]], int]:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as db:
        await db.execute("CHECKPOINT")  # dirty pages counted in the relations' files
        rows = await (await db.execute(_SIZES)).fetchall()
        lsn = await (await db.execute(
            "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")).fetchone()
    assert lsn is not None
    return ({name: {"heap": int(heap), "indexes": int(indexes), "toast": int(toast)}
             for name, heap, indexes, toast in rows}, int(lsn[0]))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=20)
    options = parser.parse_args()
    env = {"TELEVOTE_GRACE_SECONDS": "5", "TELEVOTE_LOG_LEVEL": "WARNING"}
    replicas = {"fraud_svc": 1, "sync_svc": 1, "vote_svc": 1, "results_svc": 1, "sms_svc": 1}
    stack = Stack(StackSettings(state_dir=Path(tempfile.mkdtemp(prefix="ledger-bench-")),
                                edge_port=0, replicas=replicas, service_env=env,
                                edge=ONE_LOAD_GENERATOR))
    await stack.start()
    try:
        test_round = await _round(stack)
        before, wal_before = await _snapshot(stack.database_url)
        acked, _, refused = await asyncio.to_thread(
            _batches, stack, test_round, options.duration, 0)
        rows = await _ledger_check(stack, test_round, acked)
        after, wal_after = await _snapshot(stack.database_url)
    finally:
        await stack.stop()
    per_million: dict[str, Any] = {}
    for table, sizes in sorted(after.items()):
        grown = {part: sizes[part] - before.get(table, {}).get(part, 0) for part in sizes}
        if sum(grown.values()) > 0:
            per_million[table] = {part: round(grown[part] * 1_000_000 / rows / 2**20, 1)
                                  for part in grown}
    total = sum(sum(parts.values()) for parts in per_million.values())
    figures = {
        "votes": rows, "refused": refused,
        "mib_per_million_votes": per_million,
        "total_mib_per_million_votes": round(total, 1),
        "wal_bytes_per_vote": round((wal_after - wal_before) / rows),
        "load_average_1m": os.getloadavg()[0],
    }
    print(json.dumps(figures, indent=1))
    print(f"{rows:,} votes: {total:,.0f} MiB of tables per million votes "
          f"(votes: {sum(per_million.get('votes', {}).values()):,.0f}), "
          f"WAL {figures['wal_bytes_per_vote']} bytes per vote "
          f"(load average {figures['load_average_1m']:.1f} on {os.cpu_count()} cores)")


if __name__ == "__main__":
    run_stopping_on_sigterm(main())
