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

#: A rollup step's ledger rows, judged: the round's rows in [lo, hi) by the round's
#: ledger-order index, and every row below lo of the voters judged again by the voters' index
#: ("IS TRUE" keeps the round's index out of that branch, as in results_svc.store.STEP_SQL).
_LEDGER_ROWS = f"""
SELECT {_ROW}, coalesce(fi.reason, ci.reason) AS reason
  FROM votes v {_VERDICT}
 WHERE v.round_id = %(round)s::uuid AND v.admitted_ms >= %(lo)s AND v.admitted_ms < %(hi)s
UNION ALL
SELECT {_ROW}, coalesce(fi.reason, ci.reason) AS reason
  FROM votes v {_VERDICT}
 WHERE v.user_id = ANY(%(users)s::text[])
   AND (v.round_id = %(round)s::uuid AND v.admitted_ms < %(lo)s) IS TRUE
"""

#: The round's last admission at or after a watermark (its ledger-order index, backwards).
LAST_ADMITTED_SQL = """
SELECT admitted_ms FROM votes WHERE round_id = %s AND admitted_ms >= %s
 ORDER BY admitted_ms DESC LIMIT 1
"""

#: A step's memory for its hashes and sorts: a step's rows and voters (tens of thousands) fit,
#: where the default (4 MB) spilled the per-voter aggregates and the step's voters to disk.
FOLD_WORK_MEM = "64MB"

#: A step's working tables, kept by the session and emptied at each step (and commit):
#: the episode voter rows it touches (of this episode, and of later episodes whose returning
#: voters it changes), and those rows as they were before it.
FOLD_TABLES_SQL = f"""
SET LOCAL work_mem = '{FOLD_WORK_MEM}';
CREATE TEMP TABLE IF NOT EXISTS fold_touched (
    episode_id uuid, user_id text, PRIMARY KEY (episode_id, user_id)) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS fold_old (LIKE report_episode_voters INCLUDING INDEXES)
    ON COMMIT DELETE ROWS;
DELETE FROM fold_touched; DELETE FROM fold_old
"""

#: The rollup's state of an episode (when its voters' profiles were last compared).
ROLLUP_STATE_SQL = """
SELECT profiles_at - interval '1 minute' AS since FROM report_episode_rollups
 WHERE episode_id = %s
"""
#: (A profile written by a transaction that started before this one and committed after its
#: snapshot has an `updated_at` before now(): the next step looks a minute further back; a
#: profile compared twice changes nothing the second time.)
SAVE_ROLLUP_STATE_SQL = """
INSERT INTO report_episode_rollups (episode_id, profiles_at) VALUES (%s, now())
ON CONFLICT (episode_id) DO UPDATE SET profiles_at = excluded.profiles_at
"""

#: The episode's voters whose declared profile changed since `since` and differs from the one
#: their row was folded with.
#: Their rows are looked up one by one (`LATERAL (... LIMIT 1)`: the planner cannot turn it
#: into a join): as a join, the planner hashed every voter row of the episode (its statistics
#: are from when the table was smaller), so a step cost as much as the episode had voters; the
#: step's statements that look up voters' rows do the same.
TOUCH_PROFILES_SQL = """
INSERT INTO fold_touched
SELECT e.episode_id, e.user_id FROM voter_profiles p
 CROSS JOIN LATERAL (SELECT * FROM report_episode_voters e
                      WHERE e.episode_id = %(episode)s::uuid AND e.user_id = p.user_id
                      LIMIT 1) e
 WHERE p.updated_at >= %(since)s
   AND (e.age_band, e.gender, e.province) IS DISTINCT FROM (p.age_band, p.gender, p.province)
ON CONFLICT DO NOTHING
"""

TOUCH_USERS_SQL = """
INSERT INTO fold_touched SELECT %(episode)s::uuid, unnest(%(users)s::text[])
ON CONFLICT DO NOTHING
"""

#: The touched rows as they are before the step changes them (once each).
KEEP_OLD_SQL = """
INSERT INTO fold_old
SELECT e.* FROM report_episode_voters e JOIN fold_touched t USING (episode_id, user_id)
 WHERE NOT EXISTS (SELECT 1 FROM fold_old o
                    WHERE o.episode_id = e.episode_id AND o.user_id = e.user_id)
"""

#: A part's row (its watermark and finality; its figures are its cells).
SAVE_PART_SQL = """
INSERT INTO report_round_parts (round_id, episode_id, final, watermark_ms)
VALUES (%(round)s, %(episode)s, %(final)s, %(watermark_ms)s)
ON CONFLICT (round_id) DO UPDATE SET final = excluded.final,
  watermark_ms = excluded.watermark_ms, computed_at = now()
"""

_SUMS = ("counted", "free", "paid", "sms", "app", "web", "free_cast")

#: Take the voters judged again (`users`) out of the round's part and of their episode rows,
#: and empty their round rows (their first GPS point and IP place stay: the same rows come
#: back), before their rows are folded again.
TAKE_OUT_SQL = (
    """
UPDATE report_round_cells c SET votes = c.votes - d.votes, voters = c.voters - d.voters
  FROM (SELECT left(x.key, 1)::"char" AS kind, substr(x.key, 3) AS key,
               sum(x.value::bigint) AS votes, count(*) AS voters
          FROM report_round_voters r, jsonb_each_text(r.cells) x
         WHERE r.round_id = %(round)s::uuid AND r.user_id = ANY(%(users)s::text[])
         GROUP BY 1, 2) d
 WHERE c.round_id = %(round)s::uuid AND c.kind = d.kind AND c.key = d.key
""",
    "UPDATE report_episode_voters e SET "
    + ", ".join(f"{name} = e.{name} - r.{name}" for name in _SUMS)
    + ", rounds = e.rounds - (r.counted > 0)::int"
    " FROM report_round_voters r"
    " WHERE r.round_id = %(round)s::uuid AND r.user_id = ANY(%(users)s::text[])"
    " AND e.episode_id = %(episode)s::uuid AND e.user_id = r.user_id",
    "UPDATE report_round_voters SET " + ", ".join(f"{name} = 0" for name in _SUMS)
    + ", cells = '{}' WHERE round_id = %(round)s::uuid AND user_id = ANY(%(users)s::text[])",
)


def _earliest_ip(old: str, new: str) -> str:
    """The IP place of the earlier of two (an equal time keeps the one folded first)."""
    return (f"CASE WHEN {new}.ip_geo_ms < {old}.ip_geo_ms OR {old}.ip_geo_ms IS NULL"
            f" THEN {new}.%s ELSE {old}.%s END")


_IP = _earliest_ip("t", "excluded")
_ADD = ", ".join(f"{name} = t.{name} + excluded.{name}" for name in _SUMS)
_COLUMNS = ", ".join(_SUMS)

#: The step's rows into the round's cells, the voters' rows of the round and of the episode: a
#: cell's votes added, and a voter counted in a cell the first time their round row has it;
#: counted votes by type and channel, free votes cast, first GPS point ([ms, lat, lon], the
#: least), first IP place (by admission, then ledger order), and the rounds in which they have
#: a counted vote.
#: A new episode row is "returning" if the voter has a counted vote in an earlier episode of
#: the show, and takes the profile declared now; a row whose first point (or, without one,
#: IP place) moves is located again (`place` NULL until then: the statement returns those).
#: The rows as they were before, and the voters touched, are kept for `settle`.
#: A voter's cells are summed with their round row's (as the step's snapshot has it) from the
#: step's (voter, cell) rows, which also give the part's cells: no JSON is expanded per voter.
#: Lookups of one voter's row are `LATERAL (... LIMIT 1)`, a probe of the primary key per
#: voter of the step (see TOUCH_PROFILES_SQL).
FOLD_VOTERS_SQL = f"""
WITH rows AS ({_LEDGER_ROWS}
), cells AS (
  SELECT r.user_id, k.cell, sum(r.count)::bigint AS votes
    FROM rows r CROSS JOIN LATERAL (VALUES
         ('i|' || r.reason),
         (CASE WHEN r.reason IS NULL THEN 'v|' END),
         (CASE WHEN r.reason IS NULL THEN 'm|' || (r.admitted_ms - r.admitted_ms %% 60000)
                                          || '|' || r.channel || '|' || r.vote_type END),
         (CASE WHEN r.reason IS NULL THEN 'c|' || r.contestant_id END)) k(cell)
   WHERE k.cell IS NOT NULL
   GROUP BY 1, 2
), sums AS (
  SELECT user_id,
         coalesce(sum(count) FILTER (WHERE reason IS NULL), 0)::bigint AS counted,
         coalesce(sum(count) FILTER (WHERE reason IS NULL AND vote_type = 'FREE'), 0)::bigint
           AS free,
         coalesce(sum(count) FILTER (WHERE reason IS NULL AND vote_type = 'PAID'), 0)::bigint
           AS paid,
         coalesce(sum(count) FILTER (WHERE reason IS NULL AND vote_type = 'PREMIUM_SMS'),
                  0)::bigint AS sms,
         coalesce(sum(count) FILTER (WHERE reason IS NULL AND channel = 'APP'), 0)::bigint
           AS app,
         coalesce(sum(count) FILTER (WHERE reason IS NULL AND channel = 'WEB'), 0)::bigint
           AS web,
         coalesce(sum(count) FILTER (WHERE vote_type = 'FREE'), 0)::bigint AS free_cast,
         min(ARRAY[admitted_ms::float8, latitude, longitude])
           FILTER (WHERE latitude IS NOT NULL AND longitude IS NOT NULL) AS first_gps,
         min(admitted_ms) FILTER (WHERE ip_geo <> '') AS ip_geo_ms,
         (array_agg(ip_geo ORDER BY admitted_ms, vote_id, receipt_hash)
            FILTER (WHERE ip_geo <> ''))[1] AS ip_geo
    FROM rows GROUP BY user_id
), flagged AS (
  SELECT s.*, (coalesce(r.counted, 0) = 0 AND s.counted > 0)::int AS entered,
         r.cells AS old_cells FROM sums s
    LEFT JOIN LATERAL (SELECT r.counted, r.cells FROM report_round_voters r
                        WHERE r.round_id = %(round)s::uuid AND r.user_id = s.user_id
                        LIMIT 1) r ON true
), cell_rows AS (
  SELECT k.user_id, k.cell, k.votes, coalesce(f.old_cells ? k.cell, false) AS had,
         k.votes + coalesce((f.old_cells ->> k.cell)::bigint, 0) AS total
    FROM cells k JOIN flagged f USING (user_id)
), user_cells AS (
  SELECT user_id, jsonb_object_agg(cell, total) AS cells FROM cell_rows GROUP BY user_id
), round_cells AS (
  INSERT INTO report_round_cells AS c (round_id, kind, key, votes, voters)
  SELECT %(round)s::uuid, left(cell, 1)::"char", substr(cell, 3), sum(votes),
         count(*) FILTER (WHERE NOT had)
    FROM cell_rows GROUP BY cell
  ON CONFLICT (round_id, kind, key) DO UPDATE
    SET votes = c.votes + excluded.votes, voters = c.voters + excluded.voters
), round_rows AS (
  INSERT INTO report_round_voters AS t (round_id, user_id, {_COLUMNS}, first_gps, ip_geo_ms,
                                        ip_geo, cells)
  SELECT %(round)s::uuid, f.user_id, {", ".join(f"f.{n}" for n in _SUMS)}, f.first_gps,
         f.ip_geo_ms, f.ip_geo, c.cells
    FROM flagged f JOIN user_cells c USING (user_id)
  ON CONFLICT (round_id, user_id) DO UPDATE SET {_ADD},
    cells = t.cells || excluded.cells,
    first_gps = least(t.first_gps, excluded.first_gps),
    ip_geo_ms = {_IP % ("ip_geo_ms", "ip_geo_ms")}, ip_geo = {_IP % ("ip_geo", "ip_geo")}
), episode_rows AS (
INSERT INTO report_episode_voters AS t (episode_id, user_id, {_COLUMNS}, rounds, first_gps,
                                        ip_geo_ms, ip_geo, place, returned, age_band, gender,
                                        province)
SELECT %(episode)s::uuid, f.user_id, {", ".join(f"f.{n}" for n in _SUMS)}, f.entered,
       f.first_gps, f.ip_geo_ms, f.ip_geo, NULL,
       EXISTS (SELECT 1 FROM report_episode_voters x
                WHERE x.user_id = f.user_id AND x.episode_id = ANY(%(earlier)s::uuid[])
                  AND x.counted > 0),
       p.age_band, p.gender, p.province
  FROM flagged f LEFT JOIN LATERAL (SELECT * FROM voter_profiles p WHERE p.user_id = f.user_id
                                      LIMIT 1) p ON true
ON CONFLICT (episode_id, user_id) DO UPDATE SET {_ADD}, rounds = t.rounds + excluded.rounds,
  first_gps = least(t.first_gps, excluded.first_gps),
  ip_geo_ms = {_IP % ("ip_geo_ms", "ip_geo_ms")}, ip_geo = {_IP % ("ip_geo", "ip_geo")},
  place = CASE WHEN least(t.first_gps, excluded.first_gps) IS DISTINCT FROM t.first_gps
                 OR (t.first_gps IS NULL AND excluded.first_gps IS NULL
                     AND {_IP % ("ip_geo", "ip_geo")} IS DISTINCT FROM t.ip_geo)
               THEN NULL ELSE t.place END
RETURNING old AS old_row, new.episode_id, new.user_id, new.place, new.first_gps, new.ip_geo
), kept AS (
  INSERT INTO fold_old SELECT (old_row).* FROM episode_rows
   WHERE (old_row).user_id IS NOT NULL ON CONFLICT DO NOTHING
), touched AS (
  INSERT INTO fold_touched SELECT episode_id, user_id FROM episode_rows ON CONFLICT DO NOTHING
)
SELECT user_id, first_gps, ip_geo FROM episode_rows WHERE place IS NULL
"""

#: The touched voters (so far: those whose profile changed) whose declared profile is not the
#: one their row was folded with.
REFRESH_PROFILES_SQL = """
UPDATE report_episode_voters e
   SET age_band = p.age_band, gender = p.gender, province = p.province
  FROM fold_touched t
 CROSS JOIN LATERAL (SELECT * FROM voter_profiles p WHERE p.user_id = t.user_id LIMIT 1) p
 WHERE e.episode_id = t.episode_id AND e.user_id = t.user_id
   AND (e.age_band, e.gender, e.province) IS DISTINCT FROM (p.age_band, p.gender, p.province)
"""

#: (`ANY(users)`: the rows by the primary key, not the episode's rows hashed.)
SAVE_PLACES_SQL = """
UPDATE report_episode_voters e SET place = x.place
  FROM unnest(%(users)s::text[], %(places)s::text[]) x(user_id, place)
 WHERE e.episode_id = %(episode)s::uuid AND e.user_id = ANY(%(users)s::text[])
   AND e.user_id = x.user_id
"""

#: Later episodes of the same show (their returning voters are this one's voters).
LATER_EPISODES_SQL = """
SELECT e.episode_id::text FROM episodes e
 WHERE e.show_id = (SELECT show_id FROM episodes WHERE episode_id = %(episode)s::uuid)
   AND e.episode_id <> %(episode)s::uuid
   AND e.created_at > (SELECT created_at FROM episodes WHERE episode_id = %(episode)s::uuid)
"""

#: The rows, in later episodes, of the voters whose having a counted vote in this one changed
#: with the step: whether they are returning there may have changed too.
TOUCH_LATER_SQL = """
INSERT INTO fold_touched
SELECT l.episode_id, l.user_id FROM fold_touched t
  LEFT JOIN fold_old o USING (episode_id, user_id)
  LEFT JOIN report_episode_voters e USING (episode_id, user_id)
  JOIN report_episode_voters l ON l.user_id = t.user_id
                              AND l.episode_id = ANY(%(later)s::uuid[])
 WHERE t.episode_id = %(episode)s::uuid
   AND (coalesce(o.counted, 0) > 0) <> (coalesce(e.counted, 0) > 0)
ON CONFLICT DO NOTHING
"""

RECHECK_RETURNING_SQL = """
UPDATE report_episode_voters l SET returned = r.returned
  FROM (SELECT t.episode_id, t.user_id,
               EXISTS (SELECT 1 FROM report_episode_voters x JOIN episodes xe USING (episode_id)
                        WHERE x.user_id = t.user_id AND x.counted > 0
                          AND xe.show_id = le.show_id AND xe.episode_id <> le.episode_id
                          AND xe.created_at < le.created_at) AS returned
          FROM fold_touched t JOIN episodes le USING (episode_id)
         WHERE t.episode_id = ANY(%(later)s::uuid[])) r
 WHERE l.episode_id = r.episode_id AND l.user_id = r.user_id AND l.returned <> r.returned
"""

#: Free votes cast are counted per value up to this (figures "free_cast=N"), so the share of
#: voters who used a quota of up to this many free votes is exact whatever the quota is when
#: the report is read.
FREE_CAST_CAP = 100

#: The votes-per-voter buckets (report.DISTRIBUTION) by their top: 1, 2-5, ..., 101+.
DISTRIBUTION_TOPS = ((1, "1"), (5, "2-5"), (10, "6-10"), (50, "11-50"), (100, "51-100"))
DISTRIBUTION_OVER = "101+"
PROFILE_DIMENSIONS = ("age_band", "gender", "province")


_KINDS = ("free", "paid", "sms", "app", "web")
#: The figures of voters with a counted vote and a property: (figure, when).
_FLAGS = (("free_voters", "free > 0"), ("paid_voters", "paid > 0"), ("sms_voters", "sms > 0"),
          ("app_voters", "app > 0"), ("web_voters", "web > 0"),
          ("multi_round", "rounds > 1"), ("returning", "returned"))
#: The keyed figures of voters with a counted vote: (figure prefix, key, whether they count
#: there besides (None: always), whether their votes are added), each a grouping set of
#: `figures_sql`.
_KEYED: tuple[tuple[str, str, str | None, bool], ...] = (
    ("free_cast=", f"least(free_cast, {FREE_CAST_CAP})", None, False),
    ("dist:", "CASE " + " ".join(f"WHEN counted <= {top} THEN '{label}'"
                                  for top, label in DISTRIBUTION_TOPS)
     + f" ELSE '{DISTRIBUTION_OVER}' END", None, True),
    ("place:", "place", None, True),
    *((f"profile:{d}=", d, f"{d} <> ''", True) for d in PROFILE_DIMENSIONS),
)


def figures_sql(voter_rows: str) -> str:
    """The episode figures (episode_id, figure, voters, votes) that the rows of
    `voter_rows` (report_episode_voters' columns and `sign`: 1 to add a row, -1 to take it
    away) add up to; figures that add up to nothing are left out. The figures are these
    over the episode's voter rows: kept by `FIGURES_DELTA_SQL`, from scratch by
    `DERIVED_FIGURES_SQL`. A voter's profile values counted are those told ('' is not told:
    "unknown" in the report); a voter counts in a keyed figure when the key is known (a voter
    row's place is NULL only within a step, before it is located).

    Two passes over the rows: the fixed figures as one aggregate, the keyed ones grouped by
    each key at once (GROUPING SETS): each voter row costs a few sums and a lookup per keyed
    figure, and the figures' names are built per group, not per voter."""
    fixed = ",\n         ".join(
        ["coalesce(sum(sign) FILTER (WHERE free_cast > 0), 0) AS free_casters",
         "coalesce(sum(sign) FILTER (WHERE free_cast > 0 AND paid > 0), 0) AS free_to_paid",
         "coalesce(sum(sign) FILTER (WHERE counted > 0), 0) AS voters",
         "coalesce(sum(sign * counted), 0) AS votes"]
        + [f"coalesce(sum(sign) FILTER (WHERE counted > 0 AND {when}), 0) AS {name}"
           for name, when in _FLAGS])
    fixed_rows = ",\n    ".join(
        ["('free_casters', g.free_casters, 0)", "('free_to_paid', g.free_to_paid, 0)",
         "('voters', g.voters, g.votes)"]
        + [f"('{name}', g.{name}, 0)" for name, _ in _FLAGS])
    keys = ", ".join(f"k{i}" for i in range(len(_KEYED)))
    key_columns = ",\n         ".join(
        f"CASE WHEN counted > 0{'' if when is None else f' AND {when}'} THEN {key} END AS k{i}"
        for i, (_, key, when, _) in enumerate(_KEYED))
    everything = (1 << len(_KEYED)) - 1
    keyed_rows = ",\n    ".join(
        f"(g.grouped = {everything & ~(1 << (len(_KEYED) - 1 - i))} AND g.k{i} IS NOT NULL,"
        f" '{prefix}' || g.k{i}, g.voters, {'g.votes' if votes else '0'})"
        for i, (prefix, _, _, votes) in enumerate(_KEYED))
    return f"""
WITH v AS MATERIALIZED (
  SELECT episode_id, sign, counted, free_cast, {", ".join(_KINDS)}, rounds, returned,
         {key_columns}
    FROM ({voter_rows}) v
)
SELECT g.episode_id, f.figure, f.voters::bigint, f.votes::bigint FROM (
  SELECT episode_id,
         {fixed}
    FROM v GROUP BY episode_id
) g CROSS JOIN LATERAL (VALUES
    {fixed_rows}
) f(figure, voters, votes)
 WHERE f.voters <> 0 OR f.votes <> 0
UNION ALL
SELECT g.episode_id, f.figure, f.voters::bigint, f.votes::bigint FROM (
  SELECT episode_id, {keys}, GROUPING({keys}) AS grouped,
         sum(sign) AS voters, sum(sign * counted) AS votes
    FROM v GROUP BY episode_id, GROUPING SETS ({", ".join(f"(k{i})" for i in range(len(_KEYED)))})
) g CROSS JOIN LATERAL (VALUES
    {keyed_rows}
) f(here, figure, voters, votes)
 WHERE f.here AND (f.voters <> 0 OR f.votes <> 0)"""


#: The touched voter rows as they are (added) and as they were before the step (taken away).
_TOUCHED_ROWS = """
  SELECT 1 AS sign, e.* FROM fold_touched t
   CROSS JOIN LATERAL (SELECT * FROM report_episode_voters e
                        WHERE e.episode_id = t.episode_id AND e.user_id = t.user_id
                        LIMIT 1) e
  UNION ALL
  SELECT -1, o.* FROM fold_old o"""

#: The touched voters' figures moved by the difference of their rows after and before.
FIGURES_DELTA_SQL = f"""
INSERT INTO report_episode_figures AS f (episode_id, figure, voters, votes)
{figures_sql(_TOUCHED_ROWS)}
ON CONFLICT (episode_id, figure) DO UPDATE
  SET voters = f.voters + excluded.voters, votes = f.votes + excluded.votes
"""

#: The episode's figures summed from its voter rows from scratch (what FIGURES_DELTA_SQL
#: keeps; a check, and what a test compares with).
DERIVED_FIGURES_SQL = f"""
SELECT figure, voters, votes FROM ({figures_sql(
    "SELECT 1 AS sign, * FROM report_episode_voters WHERE episode_id = %s")}) d
"""

FIGURES_SQL = """
SELECT figure, voters, votes FROM report_episode_figures
 WHERE episode_id = %s AND (voters <> 0 OR votes <> 0)
"""

#: The episode's parts with their cells.
PARTS_SQL = """
SELECT p.round_id::text, p.watermark_ms, p.final, c.kind, c.key, c.votes, c.voters
  FROM report_round_parts p LEFT JOIN report_round_cells c USING (round_id)
 WHERE p.episode_id = %s
"""

PART_HEADERS_SQL = """
SELECT round_id::text, watermark_ms, final FROM report_round_parts WHERE episode_id = %s
"""

#: Start an episode's rollups over (the parts' cells and voter rows go with them: ON DELETE
#: CASCADE); the touched voter rows (all of the episode's) are kept first so that later
#: episodes' returning voters follow.
FORGET_EPISODE_SQL = (
    "INSERT INTO fold_touched SELECT episode_id, user_id FROM report_episode_voters"
    " WHERE episode_id = %(episode)s::uuid ON CONFLICT DO NOTHING",
    KEEP_OLD_SQL,
    *(f"DELETE FROM {table} WHERE episode_id = %(episode)s::uuid"
      for table in ("report_round_parts", "report_episode_voters", "report_episode_rollups")),
)
#: After the touched rows' figures were moved (to zero for this episode).
FORGET_FIGURES_SQL = "DELETE FROM report_episode_figures WHERE episode_id = %(episode)s::uuid"

#: The episode's rounds that take or took votes, with their checkpoint's watermark and
#: whether their result is stored.
ROLLUP_ROUNDS_SQL = """
SELECT r.round_id::text, r.state, c.watermark_ms AS checkpoint_ms,
       EXISTS (SELECT 1 FROM round_results x WHERE x.round_id = r.round_id) AS stored
  FROM rounds r LEFT JOIN round_checkpoints c USING (round_id)
 WHERE r.episode_id = %s AND r.state IN ('OPEN', 'CLOSED', 'FINALIZED')
 ORDER BY r.opens_at NULLS LAST, r.created_at
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


#: The peak of concurrent WatchShow streams: the sample instant with the most, summed over
#: the replicas (each samples at the same instants).
PEAK_VIEWERS_SQL = """
SELECT sample_ms, sum(viewers)::bigint AS viewers FROM episode_viewer_samples
 WHERE episode_id = %s GROUP BY sample_ms ORDER BY 2 DESC, 1 LIMIT 1
"""

#: Episodes whose rollups are behind: a round taking or having taken votes without a final
#: part whose checkpoint (or result) is ahead of it, or with resets logged, or live (its
#: voters' profiles may change); oldest first
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
        OR EXISTS (SELECT 1 FROM report_rollup_resets x WHERE x.round_id = r.round_id)
        OR e.state = 'LIVE')
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
