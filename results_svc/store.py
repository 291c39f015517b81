"""results_svc's SQL, named: finalizing (the full recount `JUDGED_SQL` and the stored result),
the checkpoint's steps (`STEP_SQL`, `DELTA_SQL`), receipts' inclusion proofs, round reads and
the auditor's export.

The round's rules in SQL are composed from `judging` (one place for both recount paths); the
domain modules (final.py, checkpoint.py, proofs.py, audit.py, rounds.py) decide when each
statement runs and in which transaction.
"""

from __future__ import annotations

from results_svc import judging

# -- api.py -----------------------------------------------------------------------------------
LEDGER_KEY = "SELECT public_key, created_at FROM ledger_keys WHERE key_id = %s"


# -- audit.py ---------------------------------------------------------------------------------

#: The round's voters and their pseudonym (the "voter" of their leaves), for the export's
#: transaction.
EXPORT_VOTERS = """
CREATE TEMPORARY TABLE export_voters ON COMMIT DROP AS
SELECT user_id, convert_from(min(leaf_data), 'UTF8')::jsonb ->> 'voter' AS voter
  FROM votes WHERE round_id = %(round)s GROUP BY user_id
"""

#: Put in EXPORT_ROWS_COPY when rows committed after the tree was taken: only the signed ones.
SIGNED_ONLY = """
   AND v.receipt_hash IN (SELECT substring(l.leaves FROM i * 32 + 1 FOR 32)
                            FROM round_result_leaves l,
                                 generate_series(0, length(l.leaves) / 32 - 1) AS i
                           WHERE l.round_id = %(round)s)
"""

#: The export's rows (see the module's docstring), already as lines. CSV with a delimiter and
#: a quote character that no line contains, so PostgreSQL writes every line verbatim.
EXPORT_ROWS_COPY = """
COPY (
  WITH fraud AS (SELECT user_id, vote_ref FROM fraud_rejections WHERE round_id = %(round)s)
  SELECT line FROM (
    SELECT admitted_ms, vote_id, receipt_hash,
           CASE WHEN translate(voter, '0123456789abcdef', '') = ''
                 AND leaf_data = convert_to(CASE WHEN received_ms IS NULL
                     THEN format(%(template)s, admitted_ms, channel, contestant_id, count,
                                 round_id, vote_id, vote_type, voter)
                     ELSE format(%(template_received)s, admitted_ms, channel, contestant_id,
                                 count, received_ms, round_id, vote_id, vote_type, voter)
                     END, 'UTF8')
                THEN concat_ws(' ', 'L', fraud, admitted_ms, channel, contestant_id, count,
                               vote_id, vote_type, voter, coalesce(received_ms::text, '-'))
                ELSE concat_ws(' ', 'J', fraud, coalesce(received_ms::text, '-'),
                               convert_from(leaf_data, 'UTF8'))
           END AS line
      FROM (SELECT v.*,
                   -- What a canonical leaf's voter would be (the 32 bytes before its final
                   -- `"}`): the L form is used only if the leaf is the template's with it.
                   encode(substring(v.leaf_data FROM length(v.leaf_data) - 33 FOR 32),
                          'escape') AS voter,
                   CASE WHEN v.user_id IN (SELECT user_id FROM fraud WHERE vote_ref IS NULL)
                          OR (v.user_id, v.request_id) IN (
                             SELECT user_id, vote_ref FROM fraud WHERE vote_ref IS NOT NULL)
                        THEN 1 ELSE 0 END AS fraud
              FROM votes v WHERE v.round_id = %(round)s SIGNED_ONLY) leaves
    UNION ALL
    SELECT v.admitted_ms, v.vote_id, v.receipt_hash,
           concat_ws(' ', 'C', v.admitted_ms, v.vote_id, encode(v.receipt_hash, 'hex'),
                     coalesce(p.voter, ''), v.vote_type, v.count,
                     CASE WHEN v.episode_id = %(episode)s::uuid THEN 1 ELSE 0 END)
      FROM votes v JOIN export_voters p USING (user_id)
     WHERE v.round_id <> %(round)s
       AND (v.vote_type = 'PAID' OR (v.vote_type = 'FREE' AND v.episode_id = %(episode)s::uuid))
  ) rows ORDER BY admitted_ms, vote_id, receipt_hash
) TO STDOUT WITH (FORMAT csv, DELIMITER E'\\t', QUOTE E'\\x01')
"""

LEDGER_PUBLIC_KEY = "SELECT public_key FROM ledger_keys WHERE key_id = %s"

EXPORT_WORK_MEM = "SET LOCAL work_mem = '256MB'"

EXPORT_VOTER_CREDITS = (
    "SELECT p.voter, w.credited FROM wallets w JOIN export_voters p USING (user_id)"
    " WHERE w.credited > 0"
)

ROUND_VOTE_COUNT = "SELECT count(*) AS n FROM votes WHERE round_id = %s"


# -- checkpoint.py ----------------------------------------------------------------------------

# An earlier row of the round with the same vote id (only ids that occur twice: STEP_SQL).
_EARLIER_COPY = """m.vote_id = ANY(%(repeated)s::uuid[])
        AND EXISTS (SELECT 1 FROM votes d WHERE d.vote_id = m.vote_id AND d.round_id = m.round_id
                      AND (d.admitted_ms, d.receipt_hash, d.user_id, d.request_id)
                        < (m.admitted_ms, m.receipt_hash, m.user_id, m.request_id))"""

_DELTA_REJECTED = """m.user_id IN (SELECT user_id FROM rejected WHERE vote_ref IS NULL)
         OR (m.user_id, m.request_id) IN (SELECT user_id, vote_ref FROM rejected)"""

#: The round's rows in [lo, hi) and every row of `users` below lo, judged; in ledger order.
#: The same rules as store.JUDGED_SQL (results_svc.judging), over the rows' voters' (`voters`)
#: whole ledger history. No joins whose plan depends on statistics: a growing ledger's are
#: always stale.
DELTA_SQL = f"""
WITH rejected AS (  -- the round's rejections (few): hashed, not looked up row by row
  SELECT user_id, vote_ref FROM fraud_rejections WHERE round_id = %(round)s::text
),
mine AS (
  SELECT {judging.ROW_WITH_TOTALS}
    FROM unnest(%(voters)s::text[]) AS voter(user_id)
    JOIN votes v ON v.user_id = voter.user_id  -- one voter, one partition (pruned per voter)
   WHERE v.admitted_ms < %(hi)s
  {judging.WINDOW}
)
SELECT m.vote_id::text, m.user_id, m.request_id, m.contestant_id::text, m.count,
  m.receipt_hash, m.admitted_ms, m.admitted_ms >= %(lo)s AS fresh,
  {judging.reason("m", _EARLIER_COPY, _DELTA_REJECTED)} AS reason
  FROM mine m
 WHERE m.round_id = %(round)s::uuid
   AND (m.admitted_ms >= %(lo)s OR m.user_id = ANY(%(users)s::text[]))
 ORDER BY m.admitted_ms, m.vote_id, m.receipt_hash
"""

#: A step's voters, and the vote ids of its rows that occur more than once in the ledger (any
#: round, any voter): only those can be DUPLICATE, so DELTA_SQL looks for an earlier copy of
#: those alone. Vote ids are in one index per partition (the ledger is partitioned by voter):
#: probing all of them for every row cost ~100 us a row; one ScalarArrayOp scan per partition
#: with the step's ids, which are time-ordered (vote_svc.ingest.new_vote_ids) and so sit
#: together at the index's right edge, costs a few us.
STEP_SQL = """
WITH step AS MATERIALIZED (
  SELECT user_id, vote_id FROM votes WHERE round_id = %(round)s::uuid
     AND admitted_ms >= %(lo)s AND admitted_ms < %(hi)s
  UNION ALL
  -- The changed voters' rows, by the voters' index: "IS TRUE" keeps the round's index out of
  -- the plan (intersected with it, every row of the round below lo would be read).
  SELECT user_id, vote_id FROM votes WHERE user_id = ANY(%(users)s::text[])
     AND (round_id = %(round)s::uuid AND admitted_ms < %(lo)s) IS TRUE
)
SELECT coalesce((SELECT array_agg(DISTINCT user_id) FROM step), '{}') AS voters,
       coalesce((SELECT array_agg(vote_id) FROM (
         SELECT d.vote_id FROM votes d WHERE d.vote_id = ANY(ARRAY(SELECT vote_id FROM step))
          GROUP BY 1 HAVING count(*) > 1) r), '{}') AS repeated
"""

CHECKPOINT = (
    "SELECT watermark_ms, snapshot::text AS snapshot, rules, tree_size, block_leaves,"
    " block_tail, chunk_start_ms, chunk_start_id::text AS chunk_start_id, chunk_start_hash,"
    " counts, ledger FROM round_checkpoints WHERE round_id = %s"
)

SAVE_CHECKPOINT = (
    "INSERT INTO round_checkpoints (round_id, watermark_ms, snapshot, snapshot_xmin, rules,"
    " tree_size, block_leaves, block_tail, chunk_start_ms, chunk_start_id, chunk_start_hash,"
    " counts, ledger) SELECT %(round)s, %(watermark)s, s, pg_snapshot_xmin(s), %(rules)s,"
    " %(size)s, %(block_leaves)s, %(tail)s, %(start_ms)s, %(start_id)s, %(start_hash)s,"
    " %(counts)s, %(ledger)s FROM pg_current_snapshot() AS s"
    " ON CONFLICT (round_id) DO UPDATE SET watermark_ms = excluded.watermark_ms,"
    " snapshot = excluded.snapshot, snapshot_xmin = excluded.snapshot_xmin,"
    " rules = excluded.rules, tree_size = excluded.tree_size,"
    " block_tail = excluded.block_tail, chunk_start_ms = excluded.chunk_start_ms,"
    " chunk_start_id = excluded.chunk_start_id,"
    " chunk_start_hash = excluded.chunk_start_hash, counts = excluded.counts,"
    " ledger = excluded.ledger, updated_at = now()"
)

#: Voters whose fraud rejections or credits changed since the checkpoint's snapshot.
CHANGED_VOTERS = """
SELECT DISTINCT i.user_id FROM result_input_changes i, round_checkpoints c
 WHERE c.round_id = %(round)s::uuid AND i.xid >= c.snapshot_xmin
   AND NOT pg_visible_in_snapshot(i.xid, c.snapshot)
   AND (i.round_id IS NULL OR i.round_id = %(round)s::text)
"""

CHANGED_VOTER_COUNT = f"SELECT count(*) AS n FROM ({CHANGED_VOTERS} LIMIT %(limit)s) c"

LEDGER_APPENDED_SINCE = (
    "SELECT 1 FROM ledger_appends a, round_checkpoints c WHERE c.round_id = %(round)s"
    " AND a.xid >= c.snapshot_xmin AND NOT pg_visible_in_snapshot(a.xid, c.snapshot)"
    " AND a.first_ms < c.watermark_ms AND (a.round_id = %(round)s::uuid"
    "   OR a.episode_id = %(episode)s::uuid OR a.paid) LIMIT 1"
)

CHANGED_VOTER_COUNTS = (
    "SELECT contestant_id::text AS contestant, sum(count)::bigint AS n FROM ("
    "  SELECT contestant_id, count FROM votes WHERE user_id = ANY(%(users)s)"
    "     AND (round_id = %(round)s AND admitted_ms < %(lo)s) IS TRUE"  # see STEP_SQL
    "  UNION ALL SELECT contestant_id, -count FROM round_checkpoint_invalid"
    "   WHERE round_id = %(round)s AND user_id = ANY(%(users)s)) c GROUP BY 1"
)

#: Voters whose verdicts changed, and checkpoints dropped (user NULL; only one that existed:
#: the rollups never fold rows of a round without one), for the report's rollups
#: (results_svc/report/rollup.py), in the checkpoint's own transaction.
LOG_ROLLUP_RESET = (
    "INSERT INTO report_rollup_resets (round_id, user_id) SELECT %s, NULL"
    " WHERE EXISTS (SELECT 1 FROM round_checkpoints WHERE round_id = %s)"
)
LOG_ROLLUP_RESETS = ("INSERT INTO report_rollup_resets (round_id, user_id)"
                     " SELECT %s, unnest(%s::text[])")

FORGET_INVALID = "DELETE FROM round_checkpoint_invalid WHERE round_id = %s AND user_id = ANY(%s)"

ADMITTED_BETWEEN = (
    "SELECT admitted_ms FROM votes WHERE round_id = %s AND admitted_ms >= %s"
    " AND admitted_ms < %s ORDER BY admitted_ms OFFSET %s LIMIT 1"
)

STEP_PLANNER_SETTINGS = (
    "SET LOCAL work_mem = '64MB'; SET LOCAL enable_seqscan = off;"
    " SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off;"
    " SET LOCAL max_parallel_workers_per_gather = 0"
)

COPY_INVALID = (
    "COPY round_checkpoint_invalid (round_id, user_id, request_id, vote_id,"
    " contestant_id, count, admitted_ms, receipt_hash, reason) FROM STDIN"
)

INSERT_BLOCK_START = (
    "INSERT INTO round_result_blocks (round_id, block, admitted_ms, vote_id,"
    " receipt_hash) VALUES (%s, %s, %s, %s, %s)"
)

INSERT_BLOCK_ROOT = (
    "INSERT INTO round_checkpoint_roots (round_id, block, root)"
    " VALUES (%s, %s, %s)"
)

BLOCK_ROOTS = (
    "SELECT root FROM round_checkpoint_roots WHERE round_id = %s"
    " ORDER BY block"
)

DROP_FINALIZED_CHECKPOINTS = (
    "DELETE FROM round_checkpoints c USING round_results r"
    " WHERE c.round_id = r.round_id"
)


#: A round's checkpoint and the tree parts it wrote, table by table (`checkpoint.discard`).
DISCARD_CHECKPOINT = tuple(
    f"DELETE FROM {table} WHERE round_id = %s"
    for table in ("round_result_blocks", "round_result_leaves", "round_checkpoints"))

_KEY = "(admitted_ms, vote_id, receipt_hash)"
#: A chunk's leaves from the ledger rows from its first leaf's key on (parameters: round,
#: chunk, round, then the first key's admitted_ms and the key).
INSERT_CHUNK_LEAVES = (
    "INSERT INTO round_result_leaves (round_id, chunk, leaves)"
    f" SELECT %s, %s, string_agg(receipt_hash, ''::bytea ORDER BY {_KEY}) FROM votes"
    f" WHERE round_id = %s AND admitted_ms >= %s AND {_KEY} >= (%s, %s::uuid, %s)"
)
#: INSERT_CHUNK_LEAVES's upper bound, where the chunk's last leaf is known (its admitted_ms and
#: key follow the other parameters).
CHUNK_LEAVES_UPTO = f" AND admitted_ms <= %s AND {_KEY} <= (%s, %s::uuid, %s)"

#: Log entries that every live checkpoint's snapshot, and every later one, can see.
FORGET_SEEN_CHANGES = tuple(
    f"DELETE FROM {table} WHERE xid < (SELECT least(min(c.snapshot_xmin),"
    " pg_snapshot_xmin(pg_current_snapshot())) FROM round_checkpoints c"
    " JOIN rounds r USING (round_id) WHERE r.state IN ('OPEN', 'CLOSED'))"
    for table in ("ledger_appends", "result_input_changes"))


# -- final.py ---------------------------------------------------------------------------------

_JUDGED_REJECTED = """EXISTS (SELECT 1 FROM fraud_rejections f
                      WHERE f.round_id = j.round_id::text AND f.user_id = j.user_id
                        AND (f.vote_ref IS NULL OR f.vote_ref = j.request_id))"""

#: Every ledger row of the round with the reason it does not count (NULL: it counts), in
#: ledger (= tree) order. Parameters: results_svc.judging. See results_svc.rules for the rules
#: in words.
JUDGED_SQL = f"""
WITH voters AS (SELECT DISTINCT user_id FROM votes WHERE round_id = %(round)s::uuid),
mine AS (
  SELECT {judging.ROW_WITH_TOTALS}
    FROM votes v WHERE v.user_id IN (SELECT user_id FROM voters)
  {judging.WINDOW}
),
judged AS (
  SELECT m.*, row_number() OVER (PARTITION BY m.vote_id
                                 ORDER BY m.admitted_ms, m.receipt_hash) AS copy
    FROM mine m WHERE m.round_id = %(round)s::uuid
)
SELECT j.vote_id::text, j.user_id, j.contestant_id::text, j.count, j.receipt_hash,
  j.admitted_ms, j.vote_id AS vote_key,
  {judging.reason("j", "j.copy > 1", _JUDGED_REJECTED)} AS reason
  FROM judged j
 ORDER BY j.admitted_ms, j.vote_id, j.receipt_hash
"""

FINAL_RESULT = (
    "SELECT round_id::text, ledger_votes, invalidated_votes, total_votes, counts,"
    " winner_ids::text[] AS winner_ids, tree_size, root_hash, signed_tree_head, signature,"
    " key_id, signed_at, finalized_at, reconciliation FROM round_results"
    " WHERE round_id = %s"
)

INSERT_LEDGER_KEY = (
    "INSERT INTO ledger_keys (key_id, public_key, created_at) VALUES (%s, %s, %s)"
    " ON CONFLICT (key_id) DO NOTHING"
)

ROUNDS_TO_FINALIZE = (
    "SELECT r.round_id::text, r.state, (rr.round_id IS NOT NULL) AS stored,"
    " floor(extract(epoch FROM coalesce(r.closed_at, r.lines_close_at)) * 1000)"
    "::bigint AS closed_ms, r.receive_lag_ms"
    " FROM rounds r LEFT JOIN round_results rr USING (round_id)"
    " WHERE r.state IN ('OPEN', 'CLOSED') ORDER BY r.closed_at"
)

TALLIES = (
    "SELECT contestant_id::text, sum(votes)::bigint AS n FROM round_tallies"
    " WHERE round_id = %s GROUP BY 1"
)

INVALID_REASON_COUNTS = (
    "SELECT reason, count(*) AS n FROM round_checkpoint_invalid WHERE round_id = %s"
    " GROUP BY 1"
)

INSERT_BLOCK_ROOTS = (
    "INSERT INTO round_result_block_roots (round_id, block_leaves, roots)"
    " VALUES (%s, %s, %s)"
)

COPY_INVALID_VOTES = (
    "INSERT INTO round_result_invalid_votes (round_id, vote_id, reason)"
    " SELECT DISTINCT ON (vote_id) round_id, vote_id, reason"
    " FROM round_checkpoint_invalid WHERE round_id = %s"
    " ORDER BY vote_id, admitted_ms, receipt_hash"
)

INSERT_RESULT = (
    "INSERT INTO round_results (round_id, ledger_votes, invalidated_votes, total_votes,"
    " counts, winner_ids, tree_size, root_hash, signed_tree_head, signature, key_id,"
    " signed_at, reconciliation, computed_by)"
    " VALUES (%s, %s, %s, %s, %s, %s::uuid[], %s, %s, %s, %s, %s, %s, %s, %s)"
    " ON CONFLICT (round_id) DO NOTHING RETURNING round_id"
)

CREATE_JUDGED = (
    "CREATE TEMPORARY TABLE judged ON COMMIT DROP AS SELECT row_number() OVER ("
    f"ORDER BY admitted_ms, vote_key, receipt_hash) - 1 AS leaf_index, j.* FROM"
    f" ({JUDGED_SQL}) j"
)

JUDGED_COUNTS = (
    "SELECT contestant_id, sum(count) FILTER (WHERE reason IS NULL)::bigint AS counted,"
    " sum(count)::bigint AS ledger FROM judged GROUP BY contestant_id"
)

JUDGED_REASON_COUNTS = (
    "SELECT reason, count(*) AS n FROM judged WHERE reason IS NOT NULL GROUP BY 1"
)

JUDGED_LEAF_CHUNKS = (
    "SELECT leaf_index / %s AS chunk, string_agg(receipt_hash, ''::bytea ORDER BY"
    " leaf_index) AS leaves FROM judged GROUP BY 1 ORDER BY 1"
)

INSERT_LEAF_CHUNK = "INSERT INTO round_result_leaves (round_id, chunk, leaves) VALUES (%s, %s, %s)"

INSERT_JUDGED_BLOCKS = (
    "INSERT INTO round_result_blocks (round_id, block, admitted_ms, vote_id,"
    " receipt_hash) SELECT %s, leaf_index / %s, admitted_ms, vote_key, receipt_hash"
    " FROM judged WHERE leaf_index %% %s = 0"
)

INSERT_JUDGED_INVALID_VOTES = (
    "INSERT INTO round_result_invalid_votes (round_id, vote_id, reason)"
    " SELECT DISTINCT ON (vote_key) %s, vote_key, reason FROM judged"
    " WHERE reason IS NOT NULL ORDER BY vote_key, leaf_index"
)


# -- proofs.py --------------------------------------------------------------------------------

VOTE_RECEIPT = (
    "SELECT round_id::text, leaf_data, receipt_hash, admitted_ms FROM votes"
    " WHERE vote_id = %s"
    " ORDER BY admitted_ms, receipt_hash LIMIT 1"
)

INVALID_REASON = (
    "SELECT reason FROM round_result_invalid_votes"
    " WHERE round_id = %s AND vote_id = %s"
)

BLOCK_OF_VOTE = (
    "SELECT block FROM round_result_blocks WHERE round_id = %s"
    " AND (admitted_ms, vote_id, receipt_hash) <= (%s, %s, %s)"
    " ORDER BY admitted_ms DESC, vote_id DESC, receipt_hash DESC LIMIT 1"
)

LEAVES_OF_CHUNK = (
    "SELECT substring(leaves FROM %s FOR %s) AS leaves FROM round_result_leaves"
    " WHERE round_id = %s AND chunk = %s"
)

BLOCK_ROOTS_OF_RESULT = (
    "SELECT b.block_leaves, b.roots, r.tree_size FROM round_result_block_roots b"
    " JOIN round_results r USING (round_id) WHERE b.round_id = %s"
)

ALL_LEAVES = "SELECT leaves FROM round_result_leaves WHERE round_id = %s ORDER BY chunk"


# -- rounds.py --------------------------------------------------------------------------------
_MS = "floor(extract(epoch FROM {}) * 1000)::bigint"

ROUND_SQL = f"""
SELECT r.round_id::text, r.episode_id::text, r.name, r.contestant_ids::text[] AS contestant_ids,
       r.free_vote_cap, r.visibility, r.state, r.closes_at, e.free_vote_quota,
       e.state AS episode_state,
       {_MS.format("r.opens_at")} AS opens_ms, {_MS.format("r.closes_at")} AS closes_ms,
       {_MS.format("r.closed_at")} AS closed_ms, {_MS.format("r.lines_close_at")} AS lines_ms,
       r.app_close_offset_ms, r.web_close_offset_ms, r.sms_close_offset_ms, r.receive_lag_ms
  FROM rounds r JOIN episodes e USING (episode_id)
 WHERE r.round_id = %s
"""

CONTESTANTS_SQL = """
SELECT contestant_id::text, name, photo_url, sms_number FROM contestants
 WHERE contestant_id = ANY(%s::uuid[])
"""
