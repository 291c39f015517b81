"""The report's SQL: the rollups' steps (rollup.py), the episode's moments, fraud decisions,
viewers and stored final report.

Only results_svc's own tables are written (report_round_parts, report_round_voters,
report_episode_voters, report_episode_figures, report_rollup_resets, episode_reports); the
ledger, the checkpoints' and results' verdicts, rounds, performances, fraud records, viewer
samples and voter profiles are read.
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

_ROW = """v.user_id, v.vote_type, v.channel, v.count, v.contestant_id::text AS contestant_id,
       v.admitted_ms, v.latitude, v.longitude, v.ip_geo, v.vote_id, v.receipt_hash"""

#: A rollup step's ledger rows, judged, in ledger order: the round's rows in [lo, hi) by the
#: round's ledger-order index, and every row below lo of the voters judged again by the
#: voters' index ("IS TRUE" keeps the round's index out of that branch, as in
#: results_svc.store.STEP_SQL).
ROWS_SQL = f"""
SELECT j.* FROM (
  SELECT {_ROW}, coalesce(fi.reason, ci.reason) AS reason
    FROM votes v {_VERDICT}
   WHERE v.round_id = %(round)s::uuid AND v.admitted_ms >= %(lo)s AND v.admitted_ms < %(hi)s
  UNION ALL
  SELECT {_ROW}, coalesce(fi.reason, ci.reason) AS reason
    FROM votes v {_VERDICT}
   WHERE v.user_id = ANY(%(users)s::text[])
     AND (v.round_id = %(round)s::uuid AND v.admitted_ms < %(lo)s) IS TRUE
) j ORDER BY j.admitted_ms, j.vote_id, j.receipt_hash
"""

#: The episode's rounds that take or took votes, with their checkpoint's watermark and
#: whether their result is stored.
ROLLUP_ROUNDS_SQL = """
SELECT r.round_id::text, r.state, c.watermark_ms AS checkpoint_ms,
       EXISTS (SELECT 1 FROM round_results x WHERE x.round_id = r.round_id) AS stored
  FROM rounds r LEFT JOIN round_checkpoints c USING (round_id)
 WHERE r.episode_id = %s AND r.state IN ('OPEN', 'CLOSED', 'FINALIZED')
 ORDER BY r.opens_at NULLS LAST, r.created_at
"""

EPISODE_PARTS_SQL = """
SELECT round_id::text, episode_id::text, watermark_ms, final, ledger_votes, counted_votes,
       voters, invalid, minutes, contestants
  FROM report_round_parts WHERE episode_id = %s
"""

FIGURES_SQL = "SELECT figures FROM report_episode_figures WHERE episode_id = %s"

#: (The JSON as text: rollup.py parses it with orjson, a tenth of the standard decoder's cost.)
ROUND_VOTERS_SQL = """
SELECT user_id, counted, free, paid, sms, app, web, free_cast, first_gps, ip_geo_ms, ip_geo,
       buckets::text, contestants::text, invalid::text
  FROM report_round_voters WHERE round_id = %s AND user_id = ANY(%s::text[])
"""

EPISODE_VOTERS_SQL = """
SELECT user_id, counted, free, paid, sms, app, web, free_cast, rounds, first_gps, ip_geo_ms,
       ip_geo, place, returned
  FROM report_episode_voters WHERE episode_id = %s AND user_id = ANY(%s::text[])
"""

#: Which of these voters had a counted vote in one of these (earlier) episodes.
RETURNING_SQL = """
SELECT DISTINCT user_id FROM report_episode_voters
 WHERE episode_id = ANY(%s::uuid[]) AND user_id = ANY(%s::text[]) AND counted > 0
"""

#: Earlier episodes of the same show (returning voters).
EARLIER_EPISODES_SQL = """
SELECT e.episode_id::text FROM episodes e
 WHERE e.show_id = (SELECT show_id FROM episodes WHERE episode_id = %(episode)s::uuid)
   AND e.episode_id <> %(episode)s::uuid
   AND e.created_at < (SELECT created_at FROM episodes WHERE episode_id = %(episode)s::uuid)
"""

RESETS_SQL = """
SELECT round_id::text, user_id FROM report_rollup_resets WHERE round_id = ANY(%s::uuid[])
"""

FORGET_RESETS_SQL = "DELETE FROM report_rollup_resets WHERE round_id = ANY(%s::uuid[])"

#: Start an episode's rollups over (its parts' voter rows go with them: ON DELETE CASCADE).
FORGET_EPISODE_SQL = tuple(
    f"DELETE FROM {table} WHERE episode_id = %s"
    for table in ("report_round_parts", "report_episode_voters", "report_episode_figures"))

SAVE_PART_SQL = """
INSERT INTO report_round_parts (round_id, episode_id, final, watermark_ms, ledger_votes,
                                counted_votes, voters, invalid, minutes, contestants)
VALUES (%(round_id)s, %(episode_id)s, %(final)s, %(watermark_ms)s, %(ledger_votes)s,
        %(counted_votes)s, %(voters)s, %(invalid)s, %(minutes)s, %(contestants)s)
ON CONFLICT (round_id) DO UPDATE SET final = excluded.final,
  watermark_ms = excluded.watermark_ms, ledger_votes = excluded.ledger_votes,
  counted_votes = excluded.counted_votes, voters = excluded.voters,
  invalid = excluded.invalid, minutes = excluded.minutes, contestants = excluded.contestants,
  computed_at = now()
"""

_ROUND_VOTER_COLUMNS = ("round_id, user_id, counted, free, paid, sms, app, web, free_cast,"
                        " first_gps, ip_geo_ms, ip_geo, buckets, contestants, invalid")
SAVE_ROUND_VOTERS_SQL = f"""
INSERT INTO report_round_voters ({_ROUND_VOTER_COLUMNS})
SELECT {_ROUND_VOTER_COLUMNS} FROM json_populate_recordset(NULL::report_round_voters, %s::json)
ON CONFLICT (round_id, user_id) DO UPDATE SET counted = excluded.counted,
  free = excluded.free, paid = excluded.paid, sms = excluded.sms, app = excluded.app,
  web = excluded.web, free_cast = excluded.free_cast, first_gps = excluded.first_gps,
  ip_geo_ms = excluded.ip_geo_ms, ip_geo = excluded.ip_geo, buckets = excluded.buckets,
  contestants = excluded.contestants, invalid = excluded.invalid
"""

_EPISODE_VOTER_COLUMNS = ("episode_id, user_id, counted, free, paid, sms, app, web,"
                          " free_cast, rounds, first_gps, ip_geo_ms, ip_geo, place, returned")
SAVE_EPISODE_VOTERS_SQL = f"""
INSERT INTO report_episode_voters ({_EPISODE_VOTER_COLUMNS})
SELECT {_EPISODE_VOTER_COLUMNS}
  FROM json_populate_recordset(NULL::report_episode_voters, %s::json)
ON CONFLICT (episode_id, user_id) DO UPDATE SET counted = excluded.counted,
  free = excluded.free, paid = excluded.paid, sms = excluded.sms, app = excluded.app,
  web = excluded.web, free_cast = excluded.free_cast, rounds = excluded.rounds,
  first_gps = excluded.first_gps, ip_geo_ms = excluded.ip_geo_ms, ip_geo = excluded.ip_geo,
  place = excluded.place, returned = excluded.returned
"""

SAVE_FIGURES_SQL = """
INSERT INTO report_episode_figures (episode_id, figures) VALUES (%s, %s)
ON CONFLICT (episode_id) DO UPDATE SET figures = excluded.figures, updated_at = now()
"""

#: Voters and votes per declared profile value of the episode's voters with a counted vote
#: (the rest are "unknown": the figures' voters less these): one probe of the episode's voter
#: rows per declared profile, aggregated here.
SEGMENTS_SQL = """
SELECT CASE WHEN GROUPING(p.age_band) = 0 THEN 'age_band'
            WHEN GROUPING(p.gender) = 0 THEN 'gender' ELSE 'province' END AS dimension,
       CASE WHEN GROUPING(p.age_band) = 0 THEN p.age_band
            WHEN GROUPING(p.gender) = 0 THEN p.gender ELSE p.province END AS value,
       count(*) AS voters, sum(v.counted)::bigint AS votes
  FROM voter_profiles p
  JOIN report_episode_voters v ON v.episode_id = %s AND v.user_id = p.user_id
 WHERE v.counted > 0
 GROUP BY GROUPING SETS ((p.age_band), (p.gender), (p.province))
"""

PROFILES_SQL = """
SELECT user_id, age_band, gender, province FROM voter_profiles WHERE user_id = ANY(%s::text[])
"""

#: The peak of concurrent WatchShow streams: the sample instant with the most, summed over
#: the replicas (each samples at the same instants).
PEAK_VIEWERS_SQL = """
SELECT sample_ms, sum(viewers)::bigint AS viewers FROM episode_viewer_samples
 WHERE episode_id = %s GROUP BY sample_ms ORDER BY 2 DESC, 1 LIMIT 1
"""

#: Episodes whose rollups are behind: a round taking or having taken votes without a final
#: part whose checkpoint (or result) is ahead of it, or with resets logged; oldest first
#: (an episode's returning voters are found in the earlier episodes' rollups).
BEHIND_SQL = """
SELECT DISTINCT e.episode_id::text, e.created_at FROM rounds r
  JOIN episodes e USING (episode_id)
  LEFT JOIN report_round_parts p USING (round_id)
  LEFT JOIN round_checkpoints c USING (round_id)
 WHERE r.state IN ('OPEN', 'CLOSED', 'FINALIZED')
   AND (p.round_id IS NULL
        OR (NOT p.final AND (c.watermark_ms > p.watermark_ms
                             OR EXISTS (SELECT 1 FROM round_results x
                                         WHERE x.round_id = r.round_id)))
        OR EXISTS (SELECT 1 FROM report_rollup_resets x WHERE x.round_id = r.round_id))
 ORDER BY e.created_at LIMIT 20
"""


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


#: Ended episodes with every round settled and no stored report (most recent first).
UNREPORTED_EPISODES_SQL = """
SELECT e.episode_id::text FROM episodes e
 WHERE e.state = 'ENDED'
   AND NOT EXISTS (SELECT 1 FROM episode_reports x WHERE x.episode_id = e.episode_id)
   AND NOT EXISTS (SELECT 1 FROM rounds r WHERE r.episode_id = e.episode_id
                      AND r.state NOT IN ('FINALIZED', 'PENDING'))
 ORDER BY e.ended_at DESC NULLS LAST LIMIT 1
"""
