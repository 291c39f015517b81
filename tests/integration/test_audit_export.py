"""The audit export of a real round: results_svc/audit.py's SQL against the finalizer's SQL
recount, on the session stack's PostgreSQL. (Exports of random ledgers, without a database:
tests/unit/test_audit.py.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from results_svc import audit, merkle, rules
from results_svc.signing import Signer


def _leaf(fields: dict[str, Any], canonical: bool = True) -> bytes:
    if canonical:
        return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return json.dumps(fields).encode()  # other key order, spaces: parsed as JSON


def _vote_row(test_round: Any, user: str, ms: int, vote_type: str = "FREE", count: int = 1,
              *, contestant: str | None = None, channel: str = "APP",
              round_id: str | None = None, episode_id: str | None = None,
              canonical: bool = True) -> tuple[Any, ...]:
    """A ledger row as vote_svc's group commit writes it (leaf bytes included)."""
    import hashlib
    import time
    import uuid

    vote_id = str(uuid.uuid4())
    round_id = round_id or test_round.round_id
    contestant = contestant or test_round.contestants[ms % len(test_round.contestants)]
    leaf = _leaf({"accepted_at_ms": ms, "channel": channel, "contestant_id": contestant,
                  "count": count, "round_id": round_id, "vote_id": vote_id,
                  "vote_type": vote_type,
                  "voter": hashlib.sha256(user.encode()).hexdigest()[:32]}, canonical)
    return (vote_id, f"req-{vote_id}", user, 0, round_id, episode_id or test_round.episode_id,
            contestant, vote_type, count, channel, ms,
            time.strftime("%Y-%m-%d %H:%M:%S+00", time.gmtime(ms / 1000)), "ALLOW", b"f",
            leaf, merkle.leaf_hash(leaf))


async def _copy_votes(database_url: str, rows: list[tuple[Any, ...]]) -> None:
    import psycopg

    async with await psycopg.AsyncConnection.connect(database_url) as connection:
        async with connection.cursor() as cursor, cursor.copy(
                "COPY votes (vote_id, request_id, user_id, shard, round_id, episode_id,"
                " contestant_id, vote_type, count, channel, admitted_ms, admitted_at,"
                " fraud_action, fingerprint, leaf_data, receipt_hash) FROM STDIN") as copy:
            for row in rows:
                await copy.write_row(row)


async def test_the_export_of_a_real_round_with_every_rule_verifies(
        stack: Any, tmp_path: Path) -> None:
    """The export's SQL (leaf lines, other rounds' votes, fraud flags, credit, and only the
    signed leaves when a row committed after the tree) against the finalizer's SQL recount."""
    import uuid

    import psycopg

    from results_svc.config import ResultsConfig
    from results_svc.final import Finalizer
    from runtime.storage import Storage
    from tests.support_windows import close_test_round, open_test_round

    test_round = await open_test_round(stack.database_url, stack.redis_url, free_quota=4,
                                       free_cap=3, opens_in_ms=-60_000)
    user = f"audit-{test_round.round_id[:8]}-".__add__
    opens = test_round.opens_at_ms
    rows = [
        # Earlier: 3 free votes in another round of the episode, 2 paid in another episode.
        _vote_row(test_round, user("quota"), opens - 5000, count=3, round_id=str(uuid.uuid4())),
        _vote_row(test_round, user("paid"), opens - 4000, "PAID", 2, round_id=str(uuid.uuid4()),
                  episode_id=str(uuid.uuid4())),
        _vote_row(test_round, user("quota"), opens + 100),  # 4 of 4
        _vote_row(test_round, user("quota"), opens + 200),  # OVER_FREE_QUOTA
        _vote_row(test_round, user("paid"), opens + 300, "PAID"),  # 3 of 3 credited
        _vote_row(test_round, user("paid"), opens + 400, "PAID"),  # NO_BALANCE
        *(_vote_row(test_round, user("cap"), opens + 500) for _ in range(4)),  # 4th: cap
        _vote_row(test_round, user("early"), opens - 10),  # OUTSIDE_WINDOW
        _vote_row(test_round, user("sms"), opens + 600, "PREMIUM_SMS", channel="SMS"),
        _vote_row(test_round, user("stranger"), opens + 700, contestant=str(uuid.uuid4())),
        _vote_row(test_round, user("fraud-vote"), opens + 800),
        _vote_row(test_round, user("fraud-vote"), opens + 801),
        _vote_row(test_round, user("fraud-user"), opens + 900),
        _vote_row(test_round, user("fraud-user"), opens + 901),
        _vote_row(test_round, user("odd"), opens + 950, canonical=False),  # a J line
    ]
    await _copy_votes(stack.database_url, rows)
    async with await psycopg.AsyncConnection.connect(stack.database_url) as connection:
        await connection.execute("INSERT INTO wallets (user_id, credited) VALUES (%s, 3)",
                                 (user("paid"),))
        for who, ref in ((user("fraud-vote"), rows[-4][1]), (user("fraud-user"), None)):
            review = str(uuid.uuid4())
            await connection.execute(
                "INSERT INTO fraud_reviews (review_id, vote_ref, decision_id, user_id, round_id,"
                " score, signals) VALUES (%s, %s, 'd', %s, %s, 0.9, '{}')",
                (review, ref or "any", who, test_round.round_id))
            await connection.execute(
                "INSERT INTO fraud_rejections (rejection_id, round_id, user_id, vote_ref,"
                " review_id, rejected_by) VALUES (%s, %s, %s, %s, %s, 'test')",
                (str(uuid.uuid4()), test_round.round_id, who, ref, review))
    await close_test_round(stack.database_url, stack.redis_url, test_round)
    config = ResultsConfig(database_url=stack.database_url, redis_url=stack.redis_url,
                           sync_target=stack.target("sync_svc"), televote_state_dir=tmp_path,
                           televote_replica="audit-test")
    storage = Storage.from_config(config)
    await storage.connect()
    finalizer = Finalizer(storage, config, Signer.load_or_create(tmp_path))
    try:
        await finalizer.start()
        await finalizer.finalize(test_round.round_id)
    finally:
        await finalizer.stop()
        await storage.close()
    # A row committed after the tree was taken: not a leaf, not in the export.
    late = _vote_row(test_round, user("late"), opens + 150)
    await _copy_votes(stack.database_url, [late])

    out = tmp_path / "round.export"
    assert await audit.export_round(stack.database_url, test_round.round_id, out) == 16
    async with await psycopg.AsyncConnection.connect(stack.database_url) as connection:
        cursor = await connection.execute(
            "SELECT k.public_key, r.counts FROM round_results r JOIN ledger_keys k"
            " USING (key_id) WHERE r.round_id = %s", (test_round.round_id,))
        row = await cursor.fetchone()
        assert row is not None
        public_key, counts = row
        cursor = await connection.execute(
            "SELECT reason, count(*) FROM round_result_invalid_votes WHERE round_id = %s"
            " GROUP BY 1", (test_round.round_id,))
        by_reason = dict(await cursor.fetchall())
    verdict = audit.verify_export(out, bytes(public_key).hex())
    assert verdict.ok, verdict.problems
    assert verdict.rows_by_reason == by_reason == {
        rules.OVER_FREE_QUOTA: 1, rules.NO_BALANCE: 1, rules.OVER_ROUND_FREE_CAP: 1,
        rules.OUTSIDE_WINDOW: 1, rules.NOT_A_CONTESTANT: 1, rules.FRAUD_REJECTED: 3}
    assert verdict.recount is not None and verdict.recount.counts == counts
    lines = out.read_bytes().splitlines()
    assert [line[:1] for line in lines[1:]].count(b"C") == 2
    assert sum(line.startswith(b"L 1 ") for line in lines) == 3
    assert [line[:2] for line in lines].count(b"J ") == 1  # the one not canonical
    assert late[0].encode() not in out.read_bytes()
