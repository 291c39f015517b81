"""vote_svc's SQL, named: the group commit's one statement (`WRITE_BATCH`), the reads that
resolve admissions (`USER_CACHE`, `EXISTING_VOTES`), wallets, packages, Redis-loss recovery,
the reconciler and the re-scoring of UNSCORED votes.

The domain modules (ledger.py, ingest.py, wallet.py, recovery.py, ...) decide when each runs
and in which transaction; a statement's comment says what its parameters are where it is not
plain.
"""

from __future__ import annotations

# -- ingest.py --------------------------------------------------------------------------------

USER_CACHE = (
    "SELECT w.user_id, w.episode_id::text AS episode_id,"
    "       w.round_id::text AS round_id,"
    "       coalesce(p.credited, 0) AS credited, coalesce(p.spent, 0) AS spent,"
    "       coalesce((SELECT f.used FROM free_vote_usage f"
    "                  WHERE f.user_id = w.user_id"
    "                    AND f.episode_id = w.episode_id), 0) AS episode_used,"
    "       coalesce((SELECT sum(CASE WHEN v.round_id = w.round_id"
    "                                 AND v.vote_type = 'FREE' THEN v.count END)"
    "                   FROM votes v WHERE v.user_id = w.user_id), 0)"
    "         AS round_used"
    "  FROM unnest(%s::text[], %s::uuid[], %s::uuid[])"
    "       AS w(user_id, episode_id, round_id)"
    "  LEFT JOIN wallets p ON p.user_id = w.user_id"
)


# -- ledger.py --------------------------------------------------------------------------------

#: The columns of a ledger row that LedgerVote.record() gives (admitted_at is derived).
COLUMNS = ("vote_id", "request_id", "user_id", "shard", "round_id", "episode_id",
           "contestant_id", "vote_type", "count", "channel", "admitted_ms", "fraud_action",
           "fraud_score", "fraud_decision_id", "ip_hash", "device_id", "app_version", "latitude",
           "longitude", "received_at", "fingerprint", "leaf_data", "receipt_hash")

# A whole batch in ONE statement, run as its own transaction (one round trip, where a
# transaction of COPY and three statements took six): the rows arrive as one JSON array, and
# the tallies, free-vote usage and wallet spends are summed from the rows actually inserted,
# each in key order (no deadlocks between replicas' batches: `locked` takes the wallets' row
# locks in user order before the update can touch them). Tallies go to the writing
# connection's own rows (`slot`, migrations/0012): batches in flight at once never wait on
# each other's tally rows. A request id already in the ledger is skipped (ON CONFLICT), which
# the count of inserted rows shows; its caller gets the ledger's original. A user without a
# wallet row has no credits: `unfunded` writes them one with nothing credited, which fails
# the CHECK like any other overspend. Its one parameter is batch_rows(votes).
WRITE_BATCH = f"""
WITH inserted AS (
    INSERT INTO votes ({", ".join(COLUMNS)}, admitted_at)
    SELECT {", ".join(COLUMNS)}, timestamptz 'epoch' + admitted_ms * interval '1 millisecond'
      FROM json_populate_recordset(NULL::votes, %s::json)
    ON CONFLICT (user_id, request_id) DO NOTHING
    RETURNING vote_id, user_id, round_id, episode_id, contestant_id, vote_type, channel, count
), tallies AS (
    INSERT INTO round_tallies (round_id, contestant_id, vote_type, channel, slot, votes)
    SELECT round_id, contestant_id, vote_type, channel, pg_backend_pid(), sum(count)
      FROM inserted GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
    ON CONFLICT (round_id, contestant_id, vote_type, channel, slot)
    DO UPDATE SET votes = round_tallies.votes + excluded.votes
), free AS (
    INSERT INTO free_vote_usage (user_id, episode_id, used, quota)
    SELECT i.user_id, i.episode_id, sum(i.count), e.free_vote_quota
      FROM inserted i JOIN episodes e USING (episode_id)
     WHERE i.vote_type = 'FREE' GROUP BY 1, 2, 4 ORDER BY 1, 2
    ON CONFLICT (user_id, episode_id) DO UPDATE SET used = free_vote_usage.used + excluded.used
), paid AS (
    SELECT user_id, sum(count) AS n FROM inserted WHERE vote_type = 'PAID' GROUP BY 1
), locked AS (
    SELECT w.user_id FROM wallets w JOIN paid USING (user_id) ORDER BY 1 FOR UPDATE OF w
), spent AS (
    UPDATE wallets w SET spent = w.spent + p.n FROM paid p JOIN locked l USING (user_id)
     WHERE w.user_id = p.user_id
), unfunded AS (
    INSERT INTO wallets (user_id, credited, spent)
    SELECT user_id, 0, n FROM paid WHERE user_id NOT IN (SELECT user_id FROM locked)
)
SELECT count(*) AS inserted FROM inserted
"""

EXISTING_VOTES = """
SELECT v.user_id, v.request_id, v.vote_id::text, v.fingerprint, v.admitted_ms, v.receipt_hash,
       v.episode_id::text
  FROM votes v JOIN unnest(%s::text[], %s::text[]) AS k(user_id, request_id)
       ON v.user_id = k.user_id AND v.request_id = k.request_id
"""


# -- packages.py ------------------------------------------------------------------------------

ACTIVE_PACKAGES = (
    "SELECT package_id, display_name, votes, bonus_votes, price_micros, currency_code,"
    "       apple_product_id, google_product_id"
    "  FROM vote_packages WHERE active ORDER BY price_micros, sort_order"
)


# -- reconcile.py -----------------------------------------------------------------------------

COMMITTED_ADMISSIONS = (
    "SELECT v.user_id, v.request_id, v.vote_id::text AS vote_id"
    "  FROM unnest(%s::text[], %s::text[]) AS w(user_id, request_id)"
    "  JOIN votes v USING (user_id, request_id)"
)


# -- recovery.py ------------------------------------------------------------------------------

ROUND_WINDOW = (
    "SELECT r.*, e.free_vote_quota, e.rate_limit_per_minute, e.version"
    "  FROM rounds r JOIN episodes e USING (episode_id) WHERE r.round_id = %s"
)

USER_ROUND_VOTES = (
    "SELECT v.round_id::text AS round_id, v.contestant_id::text AS contestant,"
    "       v.admitted_ms - v.admitted_ms %% %s AS minute, sum(v.count) AS n"
    "  FROM votes v JOIN rounds r USING (round_id)"
    " WHERE v.shard = %s AND r.state = 'OPEN' GROUP BY 1, 2, 3"
)

VOTE_OF_REQUEST = "SELECT vote_id::text FROM votes WHERE user_id = %s AND request_id = %s"


# -- rescore.py -------------------------------------------------------------------------------

UNSCORED_VOTES = """
SELECT v.vote_id::text AS vote_id, v.user_id, v.request_id, v.round_id::text AS round_id,
       v.contestant_id::text AS contestant_id, v.count, v.channel, v.admitted_ms, v.ip_hash,
       v.device_id, v.app_version, v.latitude, v.longitude
  FROM votes v
 WHERE v.fraud_action = 'UNSCORED'
   AND NOT EXISTS (SELECT 1 FROM vote_fraud_decisions d WHERE d.vote_id = v.vote_id)
 ORDER BY v.admitted_ms, v.vote_id
 LIMIT %s
"""

INSERT_DECISIONS = """
INSERT INTO vote_fraud_decisions (vote_id, user_id, request_id, round_id, action, score,
                                  decision_id, round_finalized, scored_by)
SELECT * FROM unnest(%s::uuid[], %s::text[], %s::text[], %s::uuid[], %s::text[], %s::real[],
                     %s::text[], %s::boolean[], %s::text[])
ON CONFLICT (vote_id) DO NOTHING
RETURNING vote_id::text
"""

FINALIZED_ROUNDS = (
    "SELECT round_id::text AS round_id FROM round_results"
    " WHERE round_id = ANY(%s::uuid[])"
)


# -- wallet.py --------------------------------------------------------------------------------
WALLET_CREDITED = "SELECT credited FROM wallets WHERE user_id = %s"

CREDIT_WALLET = (
    "INSERT INTO wallets (user_id, credited) VALUES (%s, %s)"
    " ON CONFLICT (user_id) DO UPDATE SET credited = wallets.credited + excluded.credited"
    " RETURNING credited - spent AS balance"
)

INSERT_WALLET_CREDIT = (
    "INSERT INTO wallet_credits (credit_id, request_id, user_id, votes, source, reason,"
    "                            granted_by, fingerprint, balance_after)"
    " VALUES (%s, %s, %s, %s, 'grant', %s, %s, %s, %s) RETURNING created_at"
)

BALANCE = (
    "SELECT e.free_vote_quota AS quota,"
    "       (SELECT used FROM free_vote_usage f"
    "         WHERE f.user_id = %s AND f.episode_id = e.episode_id) AS used,"
    "       (SELECT credited - spent FROM wallets w WHERE w.user_id = %s) AS paid"
    "  FROM episodes e WHERE e.episode_id = %s"
)
