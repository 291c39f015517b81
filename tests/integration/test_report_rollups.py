"""The report's rollups, kept in small steps behind the result checkpoint while votes, late fraud
rejections and credits arrive, equal a computation from scratch over the ledger and the same
verdicts; so does a live report's view (the rollups plus the rows they have not reached), and
the final rollups after the close. A checkpoint that starts over starts the rollups over.

Like test_results_checkpoint, the finalizer and the rollups run in this process against a
database of this module's own, driven by the test.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest_asyncio
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from ops.stack import Stack
from results_svc.final import Finalizer
from results_svc.report import revenue, rollup, store
from results_svc.report.places import locate, place_of_ip
from results_svc.report.report import Reports
from runtime.storage import Storage, create_pool
from tests.integration import test_results_checkpoint as checkpoint_tests
from tests.integration.test_results_checkpoint import COLUMNS, Ledger, _catch_up, _round

# The same fixtures: a database of this module's own, a finalizer driven by the test.
database = checkpoint_tests.database
finalizer = checkpoint_tests.finalizer

Pool = AsyncConnectionPool[AsyncConnection[dict[str, object]]]


@pytest_asyncio.fixture
async def pool(database: str) -> AsyncIterator[Pool]:
    """A small pool on the module's database for the test's Reports, closed even when the
    test fails."""
    opened = create_pool(database, 1, 2)
    await opened.open()
    yield opened
    await opened.close()


PHNOM_PENH = (11.5564, 104.9282)
SIEM_REAP = (13.3633, 103.8564)
PARIS = (48.8566, 2.3522)


class PlacedLedger(Ledger):
    """Ledger rows with a GPS point or an IP place."""

    async def write_placed(self, rows: list[tuple[tuple[Any, ...], Any, str | None]]) -> None:
        async with await psycopg.AsyncConnection.connect(self.url) as connection:
            async with connection.cursor() as cursor, cursor.copy(
                    f"COPY votes ({COLUMNS}, latitude, longitude, ip_geo) FROM STDIN") as copy:
                for row, point, ip_geo in rows:
                    latitude, longitude = point or (None, None)
                    await copy.write_row((*row, latitude, longitude, ip_geo))


def _reference(rows: list[dict[str, Any]], earlier_voters: set[str]
               ) -> tuple[dict[str, dict[str, Any]], dict[str, list[int]]]:
    """Each round's part and the episode's figures, from judged ledger rows, from scratch."""
    parts: dict[str, dict[str, Any]] = {}
    per_round: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        per_round[row["round_id"]].append(row)
    voters: dict[str, dict[str, Any]] = defaultdict(lambda: defaultdict(int))
    for round_id, mine in per_round.items():
        minutes: dict[tuple[int, str, str], list[Any]] = defaultdict(lambda: [0, set()])
        contestants: dict[str, list[Any]] = defaultdict(lambda: [0, set()])
        invalid: dict[str, int] = defaultdict(int)
        counted_voters = set()
        for row in mine:
            user, count = row["user_id"], row["count"]
            voter = voters[user]
            if row["vote_type"] == "FREE":
                voter["free_cast"] += count
            if row["latitude"] is not None:
                point = [float(row["admitted_ms"]), row["latitude"], row["longitude"]]
                voter["gps"] = min(voter.get("gps") or point, point)
            if row["ip_geo"] and (voter.get("ip") is None or row["admitted_ms"] < voter["ip"][0]):
                voter["ip"] = (row["admitted_ms"], row["ip_geo"])
            if row["reason"]:
                invalid[row["reason"]] += count
                continue
            counted_voters.add(user)
            voter.setdefault("rounds", set()).add(round_id)
            voter["counted"] += count
            voter[{"FREE": "free", "PAID": "paid", "PREMIUM_SMS": "sms"}[row["vote_type"]]] += count
            if row["channel"] in ("APP", "WEB"):
                voter[row["channel"].lower()] += count
            minute = row["admitted_ms"] - row["admitted_ms"] % 60_000
            for bucket, key in ((minutes, (minute, row["channel"], row["vote_type"])),
                                (contestants, row["contestant_id"])):
                bucket[key][0] += count
                bucket[key][1].add(user)
        parts[round_id] = {
            "ledger_votes": sum(r["count"] for r in mine),
            "counted_votes": sum(r["count"] for r in mine if not r["reason"]),
            "voters": len(counted_voters), "invalid": dict(invalid),
            "minutes": sorted([m, c, t, votes, len(users)]
                              for (m, c, t), (votes, users) in minutes.items()),
            "contestants": {c: [votes, len(users)] for c, (votes, users) in contestants.items()}}
    figures: dict[str, list[int]] = defaultdict(lambda: [0, 0])

    def add(key: str, votes: int = 0) -> None:
        figures[key][0] += 1
        figures[key][1] += votes

    located = [user for user, voter in voters.items() if voter.get("gps")]
    places = dict(zip(located, locate([(voters[u]["gps"][1], voters[u]["gps"][2])
                                       for u in located]), strict=True))
    for user, voter in voters.items():
        if voter["free_cast"]:
            add("free_casters")
            if voter["paid"]:
                add("free_to_paid")
        if not voter["counted"]:
            continue
        add("voters", voter["counted"])
        for kind in ("free", "paid", "sms", "app", "web"):
            if voter[kind]:
                add(f"{kind}_voters")
        if len(voter["rounds"]) > 1:
            add("multi_round")
        if user in earlier_voters:
            add("returning")
        add(f"free_cast={voter['free_cast']}")
        add(f"dist:{rollup.distribution_bucket(voter['counted'])}", voter["counted"])
        place = places.get(user) or place_of_ip(voter["ip"][1] if voter.get("ip") else None)
        add(f"place:{place[0]}/{place[1]}", voter["counted"])
    return parts, dict(figures)


async def _judged(url: str, round_ids: list[str], *, final: bool) -> list[dict[str, Any]]:
    """The rounds' ledger rows the rollups may have folded, with the verdicts they fold:
    below each checkpoint's watermark by its verdicts, or all rows by the final result's."""
    verdicts = ("LEFT JOIN round_result_invalid_votes i ON i.round_id = v.round_id"
                " AND i.vote_id = v.vote_id" if final else
                "LEFT JOIN round_checkpoint_invalid i ON i.round_id = v.round_id"
                " AND i.user_id = v.user_id AND i.request_id = v.request_id")
    bound = "" if final else (" AND v.admitted_ms < (SELECT watermark_ms FROM round_checkpoints c"
                              " WHERE c.round_id = v.round_id)")
    async with await psycopg.AsyncConnection.connect(url, row_factory=dict_row) as connection:
        cursor = await connection.execute(
            "SELECT v.round_id::text, v.user_id, v.vote_type, v.channel, v.count,"
            " v.contestant_id::text, v.admitted_ms, v.latitude, v.longitude, v.ip_geo,"
            f" i.reason FROM votes v {verdicts} WHERE v.round_id = ANY(%s::uuid[]){bound}"
            " ORDER BY v.admitted_ms, v.vote_id", (round_ids,))
        return await cursor.fetchall()


async def _stored(url: str, episode_id: str) -> tuple[dict[str, Any], dict[str, list[int]]]:
    """The stored rollups; their figures equal the same contributions summed from scratch
    over the stored voter rows."""
    async with await psycopg.AsyncConnection.connect(url, row_factory=dict_row) as connection:
        view = await rollup.load(connection, episode_id)
        cursor = await connection.execute(store.DERIVED_FIGURES_SQL, (episode_id,))
        derived = {row["figure"]: [row["voters"], row["votes"]]
                   for row in await cursor.fetchall()}
    assert view.figures == derived
    return _comparable(view)


async def _live(pool: Any, episode_id: str) -> rollup.View:
    """A live report's view: the rollups extended to the end of the ledger, rolled back."""
    async with pool.connection() as connection, rollup.snapshot(connection), \
            connection.transaction(force_rollback=True):
        return await rollup.live_view(connection, episode_id)


def _comparable(view: rollup.View) -> tuple[dict[str, Any], dict[str, list[int]]]:
    parts = {}
    for round_id, row in view.parts.items():
        parts[round_id] = {k: row[k] for k in ("ledger_votes", "counted_votes", "voters",
                                               "invalid", "minutes", "contestants")}
    return parts, view.figures


def _reports(pool: Any, rows_per_step: int) -> Reports:
    """Reports whose rollups the test extends (`follow`), `rows_per_step` rows a step."""
    config: Any = SimpleNamespace(
        results_report_min_voters=3, results_report_provisional_ms=0,
        results_report_warning_s=60, results_report_precompute_ms=0,
        results_report_rollup_ms=0, results_report_rollup_rows=rows_per_step)
    return Reports(Storage(pool=pool, redis=None), config)  # type: ignore[arg-type]


def _nonempty(parts: dict[str, Any]) -> dict[str, Any]:
    return {r: p for r, p in parts.items() if p["ledger_votes"]}


async def test_rollups_kept_in_steps_equal_a_computation_from_scratch(
        stack: Stack, database: str, finalizer: Finalizer, pool: Pool, tmp_path: Path) -> None:
    earlier = await _round(stack, database)
    ledger = PlacedLedger(database, (await _round(stack, database)).round)
    test_round = ledger.round
    episode_id = test_round.episode_id
    await ledger.sql("UPDATE episodes SET show_id = %s, created_at = now() + interval '1 second'"
                     " WHERE episode_id = %s", earlier.round.show_id, episode_id)
    # A second round of the episode taking votes at the same time (one round is OPEN at a
    # time: this one is CLOSED, its lines still open, as while its last votes settle).
    second = str(uuid.uuid4())
    await ledger.sql(
        "INSERT INTO rounds (round_id, episode_id, name, contestant_ids, window_ms, visibility,"
        " state, opens_at, closes_at, closed_at, lines_close_at) SELECT %s, episode_id,"
        " 'Second', contestant_ids, window_ms, visibility, 'CLOSED', opens_at, closes_at,"
        " closes_at, lines_close_at FROM rounds WHERE round_id = %s", second,
        test_round.round_id)
    rounds = [test_round.round_id, second]
    reports = _reports(pool, rows_per_step=37)
    rng = random.Random(19)
    users = [f"v{n}" for n in range(30)]
    for user in users[:10]:
        await ledger.credit(user, rng.randrange(0, 8))
    # Voters of the earlier episode: some come back.
    await ledger.write([earlier.row(user, earlier.round.opens_at_ms + 1000)
                        for user in users[::4]])
    await _catch_up(finalizer, earlier.round.round_id)
    assert await reports.follow(earlier.round.episode_id, wait=True)
    earlier_voters = set(users[::4])

    async def batch(n: int) -> list[tuple[tuple[Any, ...], Any, str | None]]:
        """`n` rows admitted after every checkpoint's watermark and before now (a row below a
        watermark would make the checkpoint start over: the other test)."""
        await asyncio.sleep(0.5)
        found = await ledger.sql("SELECT max(watermark_ms) FROM round_checkpoints"
                                 " WHERE round_id = ANY(%s::uuid[])", rounds)
        lo = max(found[0][0] or 0, test_round.opens_at_ms + 1000)
        hi = await ledger.now(stack)
        out = []
        for index in range(n):
            user = rng.choice(users)
            number = int(user[1:])
            kind = rng.choice(["FREE", "FREE", "PAID", "PREMIUM_SMS"])
            channel = "SMS" if kind == "PREMIUM_SMS" else rng.choice(["APP", "WEB"])
            point = (PHNOM_PENH, SIEM_REAP, PARIS, None, None)[number % 5]
            ip_geo = {0: "KH", 3: "TH", 4: "KH-17"}.get(number % 5)  # GPS wins where both
            out.append((ledger.row(user, lo + 1 + (hi - lo - 2) * index // n, vote_type=kind,
                                   contestant=rng.randrange(3), channel=channel,
                                   count=rng.choice([1, 1, 2]),
                                   round_id=rng.choice(rounds)), point, ip_geo))
        return out

    for phase in range(4):
        await ledger.write_placed(await batch(80))
        for round_id in rounds:
            await _catch_up(finalizer, round_id)
        if phase == 1:  # judged already: a rejection and credits change verdicts
            await ledger.reject(users[3])
            await ledger.credit(users[12], 20)
            for round_id in rounds:
                await _catch_up(finalizer, round_id)
            assert {user for (user,) in await ledger.sql(
                "SELECT user_id FROM report_rollup_resets")} >= {users[3], users[12]}
        assert await reports.follow(episode_id, wait=True)
        expected_parts, expected_figures = _reference(
            await _judged(database, rounds, final=False), earlier_voters)
        parts, figures = await _stored(database, episode_id)
        assert _nonempty(parts) == expected_parts
        assert figures == expected_figures
        # A report's live view: every row, those the checkpoint has not judged counted.
        await ledger.write_placed(await batch(5))
        view = await _live(pool, episode_id)
        async with await psycopg.AsyncConnection.connect(database, row_factory=dict_row) as db:
            cursor = await db.execute(
                "SELECT v.round_id::text, v.user_id, v.vote_type, v.channel, v.count,"
                " v.contestant_id::text, v.admitted_ms, v.latitude, v.longitude, v.ip_geo,"
                " i.reason FROM votes v LEFT JOIN round_checkpoint_invalid i"
                " ON i.round_id = v.round_id AND i.user_id = v.user_id"
                " AND i.request_id = v.request_id WHERE v.round_id = ANY(%s::uuid[])"
                " ORDER BY v.admitted_ms, v.vote_id", (rounds,))
            live_rows = await cursor.fetchall()
        live_parts, live_figures = _reference(live_rows, earlier_voters)
        parts, figures = _comparable(view)
        for round_id in live_parts:
            for key in live_parts[round_id]:
                assert (round_id, key, parts[round_id][key]) == (
                    round_id, key, live_parts[round_id][key])
        assert {k: v for k, v in figures.items() if live_figures.get(k) != v} == {
            k: v for k, v in live_figures.items() if figures.get(k) != v}
        assert (_nonempty(parts), figures) == (live_parts, live_figures)

    # The close: the final rollups equal the final result's verdicts over every row.
    now = await ledger.now(stack)
    for round_id in rounds:
        await ledger.sql("UPDATE rounds SET state = 'CLOSED', closed_at = to_timestamp(%s /"
                         " 1000.0) WHERE round_id = %s", now, round_id)
        assert await finalizer.finalize(round_id)
    assert await reports.follow(episode_id, wait=True)
    expected_parts, expected_figures = _reference(
        await _judged(database, rounds, final=True), earlier_voters)
    parts, figures = await _stored(database, episode_id)
    assert (_nonempty(parts), figures) == (expected_parts, expected_figures)
    assert all(final for (final,) in await ledger.sql(
        "SELECT final FROM report_round_parts WHERE episode_id = %s", episode_id))
    assert expected_figures["returning"][0] > 0 and expected_figures["multi_round"][0] > 0
    assert any(key.startswith("place:KH/Siem Reap") for key in expected_figures)
    assert "place:TH/" in expected_figures


async def test_a_checkpoint_that_starts_over_starts_the_rollups_over(
        stack: Stack, database: str, finalizer: Finalizer, pool: Pool) -> None:
    ledger = await _round(stack, database)
    test_round = ledger.round
    reports = _reports(pool, rows_per_step=1000)
    t = test_round.opens_at_ms
    await ledger.write([ledger.row(f"u{n}", t + 1000 + n) for n in range(20)])
    await _catch_up(finalizer, test_round.round_id)
    assert await reports.follow(test_round.episode_id, wait=True)
    # A row committed below the checkpoint's watermark after it was taken: the checkpoint is
    # stale, dropped and rebuilt, and the rollups fold the round again.
    await ledger.write([ledger.row("late", t + 1500, contestant=2)])
    await _catch_up(finalizer, test_round.round_id)
    assert await ledger.sql("SELECT count(*) FROM report_rollup_resets") == [(1,)]
    expected = _reference(await _judged(database, [test_round.round_id], final=False), set())
    # A live report before the rollups start over ignores the stored voter rows too.
    view = await _live(pool, test_round.episode_id)
    parts, figures = _comparable(view)
    assert figures["voters"] == [21, 21]
    assert (_nonempty(parts), figures) == expected
    while not await reports.follow(test_round.episode_id, wait=True):
        pass
    parts, figures = await _stored(database, test_round.episode_id)
    assert (_nonempty(parts), figures) == expected
    assert figures["voters"] == [21, 21]
    assert await ledger.sql("SELECT count(*) FROM report_rollup_resets") == [(0,)]


async def test_a_live_report_folds_the_judged_rows_once_for_the_rollup_too(
        stack: Stack, database: str, finalizer: Finalizer, pool: Pool) -> None:
    """A live report brings the rollups to the checkpoint and commits that before it folds
    the rows the checkpoint has not judged (rolled back): the rollup does not fold the judged
    rows again, and the report still counts every row."""
    ledger = await _round(stack, database)
    test_round = ledger.round
    episode_id = test_round.episode_id
    await ledger.sql("UPDATE episodes SET state = 'LIVE' WHERE episode_id = %s", episode_id)
    reports = _reports(pool, rows_per_step=1000)
    t = test_round.opens_at_ms
    await ledger.write([ledger.row(f"judged{n}", t + 1000 + n) for n in range(20)])
    await _catch_up(finalizer, test_round.round_id)
    (checkpoint_ms,), = await ledger.sql(
        "SELECT watermark_ms FROM round_checkpoints WHERE round_id = %s", test_round.round_id)
    await ledger.write([ledger.row(f"unjudged{n}", checkpoint_ms + n) for n in range(5)])
    report = await reports.episode_report(episode_id)
    assert not report.is_final
    assert report.summary.unique_voters == 25
    assert await ledger.sql(
        "SELECT watermark_ms FROM report_round_parts WHERE round_id = %s",
        test_round.round_id) == [(checkpoint_ms,)]
    _, figures = await _stored(database, episode_id)
    assert figures["voters"] == [20, 20]


async def test_the_reports_purchases_are_read_by_time_not_by_scanning_every_purchase(
        stack: Stack, database: str) -> None:
    ledger = await _round(stack, database)
    episode_id = ledger.round.episode_id
    await ledger.sql("UPDATE episodes SET started_at = now() - interval '1 hour',"
                     " ended_at = now() WHERE episode_id = %s", episode_id)
    # A year of purchases, 20,000 of them, by 5,000 buyers.
    await ledger.sql(
        "INSERT INTO purchases (purchase_id, request_id, user_id, store, store_transaction_id,"
        " store_reference, environment, package_id, product_id, votes, bonus_votes,"
        " price_micros, currency_code, purchased_at, balance_after, fingerprint)"
        " SELECT gen_random_uuid(), 'plan-' || n, 'buyer-' || n %% 5000, 'APPLE', 'plan-' || n,"
        " 'plan-' || n, 'Sandbox', 'vote_pack_10', 'vote_pack_10', 10, 0, 990000, 'USD',"
        " now() - n * interval '26 minutes', 10, '\\x00' FROM generate_series(1, 20000) n")
    # The episode's voters, many, as the rollups keep them.
    await ledger.sql(
        "INSERT INTO report_episode_voters (episode_id, user_id, counted, free, paid, sms, app,"
        " web, free_cast, rounds, place, returned) SELECT %s, 'buyer-' || n, 1, 1, 0, 0, 1, 0,"
        " 1, 1, 'unknown/', false FROM generate_series(1, 5000) n", episode_id)
    await ledger.sql("ANALYZE purchases")
    await ledger.sql("ANALYZE report_episode_voters")
    async with await psycopg.AsyncConnection.connect(database, row_factory=dict_row) as db:
        hours = await (await db.execute(revenue.LIVE_HOURS_SQL, (episode_id,))).fetchone()
        assert hours is not None
        cursor = await db.execute(
            "EXPLAIN " + (revenue.PACKAGES_SQL or ""),
            {"episode": episode_id, "from": hours["from"], "to": hours["to"]})
        plan = "\n".join(row["QUERY PLAN"] for row in await cursor.fetchall())
    assert "purchases_by_time" in plan, plan


async def _forget(ledger: Ledger, episode_id: str) -> None:
    """Drop an episode's rollups (as if never folded)."""
    for table in ("report_round_parts", "report_episode_voters", "report_episode_figures",
                  "report_episode_rollups"):
        await ledger.sql(f"DELETE FROM {table} WHERE episode_id = %s", episode_id)


async def test_a_fold_in_many_steps_equals_one_step_and_follows_profiles_and_earlier_episodes(
        stack: Stack, database: str, finalizer: Finalizer, pool: Pool) -> None:
    earlier = await _round(stack, database)
    ledger = PlacedLedger(database, (await _round(stack, database)).round)
    test_round = ledger.round
    episode_id = test_round.episode_id
    await ledger.sql("UPDATE episodes SET show_id = %s, created_at = now() + interval '1 second'"
                     " WHERE episode_id = %s", earlier.round.show_id, episode_id)
    rng = random.Random(22)
    users = [f"p{n}" for n in range(40)]
    await ledger.write([earlier.row(user, earlier.round.opens_at_ms + 1000)
                        for user in users[:5]])
    await _catch_up(finalizer, earlier.round.round_id)
    assert await _reports(pool, 1000).follow(earlier.round.episode_id, wait=True)
    t = test_round.opens_at_ms + 1000
    rows = []
    for n in range(300):
        user = rng.choice(users)
        kind = rng.choice(["FREE", "FREE", "PAID", "PREMIUM_SMS"])
        channel = "SMS" if kind == "PREMIUM_SMS" else rng.choice(["APP", "WEB"])
        point = (PHNOM_PENH, SIEM_REAP, None)[int(user[1:]) % 3]
        rows.append((ledger.row(user, t + n * 700, vote_type=kind, channel=channel,
                                contestant=rng.randrange(3), count=rng.choice([1, 2])),
                     point, "KH-17" if point is None else None))
    await ledger.write_placed(rows)
    await ledger.reject(users[7])
    await ledger.sql("INSERT INTO voter_profiles (user_id, age_band, gender, province)"
                     " SELECT 'p' || n, '25-34', CASE WHEN n %% 2 = 0 THEN 'female' ELSE '' END,"
                     " 'Phnom Penh' FROM generate_series(0, 19) n")
    await _catch_up(finalizer, test_round.round_id)

    # Many small steps, then the same rows in one step: the same rollups.
    assert await _reports(pool, rows_per_step=3).follow(episode_id, wait=True)
    in_steps = await _stored(database, episode_id)
    await _forget(ledger, episode_id)
    assert await _reports(pool, rows_per_step=10**6).follow(episode_id, wait=True)
    in_one = await _stored(database, episode_id)
    assert in_steps == in_one
    expected = _reference(await _judged(database, [test_round.round_id], final=False),
                          set(users[:5]))
    parts, figures = in_one
    assert (_nonempty(parts), {k: v for k, v in figures.items()
                               if not k.startswith("profile:")}) == expected

    def segment(figures: dict[str, list[int]], name: str) -> int:
        return figures.get(name, [0, 0])[0]

    async def counted_voters(where: str) -> int:
        found = await ledger.sql(
            "SELECT count(*) FROM report_episode_voters e JOIN voter_profiles p USING (user_id)"
            f" WHERE e.episode_id = %s AND e.counted > 0 AND {where}", episode_id)
        return int(found[0][0])

    assert segment(figures, "profile:age_band=25-34") == await counted_voters(
        "p.age_band = '25-34'") > 0
    assert segment(figures, "profile:gender=female") == await counted_voters(
        "p.gender = 'female'") > 0
    # A voter who declares (or changes) a profile after voting moves between segments at the
    # next step, votes or not.
    voted = {user for user, in await ledger.sql(
        "SELECT user_id FROM report_episode_voters WHERE episode_id = %s AND counted > 0"
        " AND user_id >= 'p2' ORDER BY user_id", episode_id)}
    newcomer, changer = sorted(u for u in voted if int(u[1:]) >= 20)[0], \
        sorted(u for u in voted if int(u[1:]) < 20 and int(u[1:]) % 2 == 0)[0]
    await ledger.sql("INSERT INTO voter_profiles (user_id, age_band, gender, province)"
                     " VALUES (%s, '55+', 'male', '')", newcomer)
    await ledger.sql("UPDATE voter_profiles SET gender = 'male', updated_at = now()"
                     " WHERE user_id = %s", changer)
    async with pool.connection() as connection, rollup.snapshot(connection), \
            connection.transaction(force_rollback=True):
        live = await rollup.live_view(connection, episode_id)
    assert await _reports(pool, 1000).follow(episode_id, wait=True)
    _, figures = await _stored(database, episode_id)
    assert live.figures == figures
    assert segment(figures, "profile:gender=female") == segment(
        in_one[1], "profile:gender=female") - 1
    assert segment(figures, "profile:gender=male") == segment(
        in_one[1], "profile:gender=male") + 2
    assert segment(figures, "profile:age_band=55+") == 1
    assert segment(figures, "profile:gender=male") == await counted_voters("p.gender = 'male'")

    # An earlier episode's new voter is this episode's returning voter from then on.
    returning = segment(figures, "returning")
    back = sorted(voted - set(users[:5]))[0]
    await ledger.write([earlier.row(back, await ledger.now(stack) - 1)])
    await _catch_up(finalizer, earlier.round.round_id)
    assert await _reports(pool, 1000).follow(earlier.round.episode_id, wait=True)
    _, figures = await _stored(database, episode_id)
    assert segment(figures, "returning") == returning + 1
