"""The report's SQL: a round's part from its ledger rows, an episode's merge of the parts, and
the episode's moments, fraud decisions and stored final report.

Only results_svc's own tables are written (report_round_parts, report_round_voters,
episode_reports); the ledger, rounds, performances, fraud records and voter profiles are read.
"""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection

Connection = AsyncConnection[Any]

#: Why a ledger row does not count: the final result's verdict once the round is finalized;
#: before that, the verdicts of the round's checkpoint (the rows below its watermark), and
#: every later row counts provisionally.
_VERDICT = """
  LEFT JOIN round_result_invalid_votes fi
         ON %(finalized)s AND fi.round_id = v.round_id AND fi.vote_id = v.vote_id
  LEFT JOIN round_checkpoint_invalid ci
         ON NOT %(finalized)s AND ci.round_id = v.round_id AND ci.user_id = v.user_id
        AND ci.request_id = v.request_id
"""

#: One read of the round's ledger rows, grouped four ways at once (GROUPING SETS: one scan,
#: one hash table per set): per voter (stored in report_round_voters), per voter and minute,
#: channel and type, per voter and contestant (distinct voters of each bucket are then the
#: rows with counted votes), and per reason a row does not count.
PART_SQL = f"""
WITH judged AS (
  SELECT v.user_id, v.vote_type, v.channel, v.count, v.contestant_id,
         v.admitted_ms - v.admitted_ms %% 60000 AS minute_ms, v.admitted_ms,
         v.latitude, v.longitude, coalesce(fi.reason, ci.reason) AS reason
    FROM votes v {_VERDICT}
   WHERE v.round_id = %(round)s::uuid
), g AS MATERIALIZED (
  SELECT GROUPING(user_id, minute_ms, channel, vote_type, contestant_id, reason) AS grp,
         user_id, minute_ms, channel, vote_type, contestant_id, reason,
         sum(count) AS votes,
         coalesce(sum(count) FILTER (WHERE reason IS NULL), 0) AS counted,
         coalesce(sum(count) FILTER (WHERE reason IS NULL AND vote_type = 'FREE'), 0) AS free,
         coalesce(sum(count) FILTER (WHERE reason IS NULL AND vote_type = 'PAID'), 0) AS paid,
         coalesce(sum(count) FILTER (WHERE reason IS NULL AND vote_type = 'PREMIUM_SMS'), 0)
           AS sms,
         coalesce(sum(count) FILTER (WHERE reason IS NULL AND channel = 'APP'), 0) AS app,
         coalesce(sum(count) FILTER (WHERE reason IS NULL AND channel = 'WEB'), 0) AS web,
         coalesce(sum(count) FILTER (WHERE vote_type = 'FREE'), 0) AS free_cast,
         min(ARRAY[admitted_ms::float8, latitude, longitude])
           FILTER (WHERE latitude IS NOT NULL AND longitude IS NOT NULL) AS first_gps
    FROM judged
   GROUP BY GROUPING SETS ((user_id), (minute_ms, channel, vote_type, user_id),
                           (contestant_id, user_id), (reason))
), voters AS (
  INSERT INTO report_round_voters (round_id, user_id, counted, free, paid, sms, app, web,
                                   free_cast, first_gps)
  SELECT %(round)s::uuid, user_id, counted, free, paid, sms, app, web, free_cast, first_gps
    FROM g WHERE grp = {0b011111}
  RETURNING 1
)
SELECT
  (SELECT count(*) FROM voters) AS rows,
  (SELECT count(*) FROM g WHERE grp = {0b011111} AND counted > 0) AS voters,
  (SELECT coalesce(sum(votes), 0)::bigint FROM g WHERE grp = {0b111110}) AS ledger_votes,
  (SELECT coalesce(sum(counted), 0)::bigint FROM g WHERE grp = {0b011111}) AS counted_votes,
  (SELECT coalesce(jsonb_object_agg(reason, votes), '{{}}') FROM g
    WHERE grp = {0b111110} AND reason IS NOT NULL) AS invalid,
  (SELECT coalesce(jsonb_agg(jsonb_build_array(minute_ms, channel, vote_type, votes, voters)
                             ORDER BY minute_ms, channel, vote_type), '[]')
     FROM (SELECT minute_ms, channel, vote_type, sum(counted) AS votes,
                  count(*) FILTER (WHERE counted > 0) AS voters
             FROM g WHERE grp = {0b000011} GROUP BY 1, 2, 3) m
    WHERE votes > 0) AS minutes,
  (SELECT coalesce(jsonb_object_agg(contestant_id, jsonb_build_array(votes, voters)), '{{}}')
     FROM (SELECT contestant_id, sum(counted) AS votes,
                  count(*) FILTER (WHERE counted > 0) AS voters
             FROM g WHERE grp = {0b011101} GROUP BY 1) c) AS contestants
"""


async def part_is_current(connection: Connection, round_id: str, finalized: bool,
                          max_age_ms: int) -> bool:
    cursor = await connection.execute(
        "SELECT final, computed_at > now() - make_interval(secs => %s / 1000.0) AS recent"
        " FROM report_round_parts WHERE round_id = %s", (max_age_ms, round_id))
    row: Any = await cursor.fetchone()
    return row is not None and (row["final"] or (not finalized and row["recent"]))


async def build_part(connection: Connection, round_id: str, episode_id: str, finalized: bool,
                     max_age_ms: int) -> None:
    """(Re)compute a round's part in the connection's transaction, unless another replica
    just did: the transaction-scoped advisory lock makes them take turns."""
    await connection.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                             (f"report-part:{round_id}",))
    if await part_is_current(connection, round_id, finalized, max_age_ms):
        return
    # A round's rows are many: group them in memory, never in a plan that sorts on disk.
    await connection.execute("SET LOCAL work_mem = '256MB'")
    await connection.execute("DELETE FROM report_round_parts WHERE round_id = %s", (round_id,))
    await connection.execute(
        "INSERT INTO report_round_parts (round_id, episode_id, final, ledger_votes,"
        " counted_votes, voters, invalid, minutes, contestants)"
        " VALUES (%s, %s, %s, 0, 0, 0, '{}', '[]', '{}')", (round_id, episode_id, finalized))
    cursor = await connection.execute(PART_SQL, {"round": round_id, "finalized": finalized},
                                      prepare=False)
    row: Any = await cursor.fetchone()
    await connection.execute(
        "UPDATE report_round_parts SET ledger_votes = %(ledger_votes)s,"
        " counted_votes = %(counted_votes)s, voters = %(voters)s, invalid = %(invalid)s,"
        " minutes = %(minutes)s, contestants = %(contestants)s, computed_at = now()"
        " WHERE round_id = %(round)s",
        {**{k: row[k] for k in ("ledger_votes", "counted_votes", "voters")},
         "invalid": _json(row["invalid"]), "minutes": _json(row["minutes"]),
         "contestants": _json(row["contestants"]), "round": round_id})


def _json(value: Any) -> Any:
    from psycopg.types.json import Jsonb
    return Jsonb(value)


EPISODE_SQL = """
SELECT e.episode_id::text, e.title, e.state, e.free_vote_quota, e.show_id::text,
       e.started_at, e.ended_at, s.name AS show_name
  FROM episodes e JOIN shows s USING (show_id) WHERE e.episode_id = %s
"""

ROUNDS_SQL = """
SELECT r.round_id::text, r.name, r.state, r.contestant_ids::text[] AS contestant_ids,
       r.opens_at, r.closes_at, r.closed_at, r.lines_close_at,
       rr.winner_ids::text[] AS winner_ids
  FROM rounds r LEFT JOIN round_results rr USING (round_id)
 WHERE r.episode_id = %s
 ORDER BY r.opens_at NULLS LAST, r.created_at
"""

PARTS_SQL = """
SELECT round_id::text, final, ledger_votes, counted_votes, voters, invalid, minutes,
       contestants
  FROM report_round_parts WHERE round_id = ANY(%s::uuid[])
"""

CONTESTANTS_SQL = """
SELECT contestant_id::text, name FROM contestants WHERE episode_id = %s
"""

PERFORMANCES_SQL = """
SELECT p.contestant_id::text, p.started_at, p.ended_at,
       (p.started_at - '1970-01-01 00:00:00+00'::timestamptz) AS since_epoch
  FROM performances p WHERE p.episode_id = %s ORDER BY p.started_at
"""

#: The first ledger vote for a contestant in a round at or after a moment: the round's
#: ledger-order index read from the moment on, stopping at the first match.
FIRST_VOTE_SQL = """
SELECT admitted_ms FROM votes
 WHERE round_id = %(round)s::uuid AND admitted_ms >= %(from_ms)s
   AND contestant_id = %(contestant)s::uuid
 ORDER BY admitted_ms LIMIT 1
"""

#: The episode's voters, merged over its rounds' parts (one row per voter), then every figure
#: that needs distinct voters across rounds, in one statement: the counts in one pass over the
#: voters, then the distribution, the places and the profile segments.
MERGE_SQL = """
WITH u AS MATERIALIZED (
  SELECT user_id, sum(counted) AS counted, sum(free) AS free, sum(paid) AS paid,
         sum(sms) AS sms, sum(app) AS app, sum(web) AS web, sum(free_cast) AS free_cast,
         count(*) FILTER (WHERE counted > 0) AS rounds, min(first_gps) AS gps
    FROM report_round_voters WHERE round_id = ANY(%(rounds)s::uuid[]) GROUP BY user_id
), back AS (
  SELECT DISTINCT user_id FROM report_round_voters
   WHERE round_id = ANY(%(earlier)s::uuid[]) AND counted > 0
), figures AS (
  SELECT count(*) FILTER (WHERE counted > 0) AS voters,
         count(*) FILTER (WHERE counted > 0 AND free > 0) AS free_voters,
         count(*) FILTER (WHERE counted > 0 AND paid > 0) AS paid_voters,
         count(*) FILTER (WHERE counted > 0 AND sms > 0) AS sms_voters,
         count(*) FILTER (WHERE counted > 0 AND app > 0) AS app_voters,
         count(*) FILTER (WHERE counted > 0 AND web > 0) AS web_voters,
         count(*) FILTER (WHERE counted > 0 AND rounds > 1) AS multi_round,
         count(*) FILTER (WHERE counted > 0 AND %(quota)s > 0 AND free_cast >= %(quota)s)
           AS used_all_free,
         count(*) FILTER (WHERE free_cast > 0) AS free_casters,
         count(*) FILTER (WHERE free_cast > 0 AND paid > 0) AS free_to_paid,
         count(*) FILTER (WHERE counted > 0 AND b.user_id IS NOT NULL) AS returning
    FROM u LEFT JOIN back b USING (user_id)
), c AS (SELECT * FROM u WHERE counted > 0)
SELECT figures.*,
  (SELECT coalesce(jsonb_agg(jsonb_build_array(bucket, n)), '[]') FROM (
     SELECT CASE WHEN counted = 1 THEN '1' WHEN counted <= 5 THEN '2-5'
                 WHEN counted <= 10 THEN '6-10' WHEN counted <= 50 THEN '11-50'
                 WHEN counted <= 100 THEN '51-100' ELSE '101+' END AS bucket,
            count(*) AS n FROM c GROUP BY 1) d) AS distribution,
  (SELECT coalesce(jsonb_agg(jsonb_build_array(lat, lon, voters, votes)), '[]') FROM (
     SELECT round(gps[2]::numeric, 2)::float8 AS lat, round(gps[3]::numeric, 2)::float8 AS lon,
            count(*) AS voters, sum(counted) AS votes
       FROM c GROUP BY 1, 2) p) AS places,
  (SELECT coalesce(jsonb_agg(jsonb_build_array(dimension, value, voters, votes)), '[]') FROM (
     SELECT CASE WHEN GROUPING(p.age_band) = 0 THEN 'age_band'
                 WHEN GROUPING(p.gender) = 0 THEN 'gender' ELSE 'province' END AS dimension,
            coalesce(nullif(CASE WHEN GROUPING(p.age_band) = 0 THEN p.age_band
                                 WHEN GROUPING(p.gender) = 0 THEN p.gender
                                 ELSE p.province END, ''), 'unknown') AS value,
            count(*) AS voters, sum(c.counted) AS votes
       FROM c LEFT JOIN voter_profiles p USING (user_id)
      GROUP BY GROUPING SETS ((p.age_band), (p.gender), (p.province))) s) AS segments
  FROM figures
"""

#: Earlier episodes' finalized rounds of the same show (returning voters).
EARLIER_ROUNDS_SQL = """
SELECT r.round_id::text, r.episode_id::text, r.state
  FROM rounds r JOIN episodes e USING (episode_id)
 WHERE e.show_id = %(show)s::uuid AND e.episode_id <> %(episode)s::uuid
   AND e.created_at < (SELECT created_at FROM episodes WHERE episode_id = %(episode)s::uuid)
   AND r.state = 'FINALIZED'
"""

FRAUD_REVIEWS_SQL = """
SELECT state, count(*) AS n FROM fraud_reviews WHERE round_id = ANY(%(rounds)s::text[])
 GROUP BY state
"""

FRAUD_SIGNALS_SQL = """
SELECT signal, sum(blocked) AS blocked, sum(reviewed) AS reviewed, sum(rejected) AS rejected
  FROM (
    SELECT s ->> 'name' AS signal, 0 AS blocked, 1 AS reviewed,
           (r.state = 'REJECTED')::int AS rejected
      FROM fraud_reviews r, jsonb_array_elements(r.signals) s
     WHERE r.round_id = ANY(%(rounds)s::text[])
    UNION ALL
    SELECT s ->> 'name', 1, 0, 0
      FROM audit_log a, jsonb_array_elements(a.details -> 'attributes' -> 'signals') s
     WHERE a.action LIKE 'fraud.%%' AND a.action = 'fraud.score'
       AND a.details ->> 'round_id' = ANY(%(rounds)s::text[])
       AND a.details -> 'attributes' ->> 'action' = 'BLOCK'
  ) x GROUP BY signal
"""

FRAUD_BLOCKED_SQL = """
SELECT count(*) AS n FROM audit_log a
 WHERE a.action LIKE 'fraud.%%' AND a.action = 'fraud.score'
   AND a.details ->> 'round_id' = ANY(%(rounds)s::text[])
   AND a.details -> 'attributes' ->> 'action' = 'BLOCK'
"""


async def stored_report(connection: Connection, episode_id: str) -> bytes | None:
    cursor = await connection.execute(
        "SELECT report FROM episode_reports WHERE episode_id = %s", (episode_id,))
    row: Any = await cursor.fetchone()
    return None if row is None else bytes(row["report"])


async def store_report(connection: Connection, episode_id: str, report: bytes) -> bytes:
    """Store a final report unless one is stored; returns the stored one. The first stored
    wins: another replica's copy has the same figures, and every caller then gets the same
    bytes (generated_at included)."""
    await connection.execute(
        "INSERT INTO episode_reports (episode_id, report) VALUES (%s, %s)"
        " ON CONFLICT (episode_id) DO NOTHING", (episode_id, report))
    stored = await stored_report(connection, episode_id)
    assert stored is not None
    return stored


#: Finalized rounds whose part is not final yet (oldest first).
UNREPORTED_ROUNDS_SQL = """
SELECT r.round_id::text, r.episode_id::text FROM rounds r
 WHERE r.state = 'FINALIZED'
   AND NOT EXISTS (SELECT 1 FROM report_round_parts p WHERE p.round_id = r.round_id AND p.final)
 ORDER BY r.closed_at NULLS LAST LIMIT 1
"""

#: Ended episodes with every round settled and no stored report (most recent first).
UNREPORTED_EPISODES_SQL = """
SELECT e.episode_id::text FROM episodes e
 WHERE e.state = 'ENDED'
   AND NOT EXISTS (SELECT 1 FROM episode_reports x WHERE x.episode_id = e.episode_id)
   AND NOT EXISTS (SELECT 1 FROM rounds r WHERE r.episode_id = e.episode_id
                      AND r.state NOT IN ('FINALIZED', 'PENDING'))
 ORDER BY e.ended_at DESC NULLS LAST LIMIT 1
"""
