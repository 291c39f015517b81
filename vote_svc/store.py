"""vote_svc's SQL, named: the group commit's one statement (`WRITE_BATCH`), the reads that
resolve admissions (`USER_CACHE`, `EXISTING_VOTES`), wallets, packages, Redis-loss recovery,
the reconciler, the re-scoring of UNSCORED votes, and store purchases and their refunds.

The domain modules (ledger.py, ingest.py, wallet.py, recovery.py, ...) decide when each runs
and in which transaction; a statement's comment says what its parameters are where it is not
plain.
"""

from __future__ import annotations

from runtime import audit

# -- ingest.py --------------------------------------------------------------------------------

USER_CACHE = (
    "SELECT w.user_id, w.episode_id::text AS episode_id,"
    "       w.round_id::text AS round_id,"
    "       coalesce(p.credited, 0) AS credited,"
    # The cache's `spent` includes the votes refunds clawed back (purchases.py).
    "       coalesce(p.spent + p.clawed_back, 0) AS spent,"
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
           "longitude", "received_at", "fingerprint", "leaf_data", "receipt_hash",
           "received_ms", "ip_geo")

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
       v.episode_id::text, v.leaf_data
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
    " RETURNING credited - spent - clawed_back AS balance"
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
    "       (SELECT credited - spent - clawed_back FROM wallets w WHERE w.user_id = %s)"
    "         AS paid"
    "  FROM episodes e WHERE e.episode_id = %s"
)


# -- purchases.py -----------------------------------------------------------------------------

_PURCHASE = (
    "SELECT purchase_id::text, request_id, user_id, store_transaction_id,"
    "       votes + bonus_votes AS votes, balance_after, price_micros, currency_code,"
    "       credited_at, fingerprint FROM purchases")
PURCHASE_BY_REQUEST = _PURCHASE + " WHERE request_id = %s"
# request id, store, store transaction id: this request's purchase, or the receipt's.
PURCHASE_BY_REQUEST_OR_RECEIPT = (
    _PURCHASE + " WHERE request_id = %s OR (store = %s AND store_transaction_id = %s)")

# The credit, the purchase and its audit entry as one statement (atomic in autocommit): the
# wallet's new balance goes into the purchase row (a retry's answer) and the audit entry.
CREDIT_PURCHASE = """
WITH w AS (
    INSERT INTO wallets (user_id, credited) VALUES (%(user)s, %(votes)s)
    ON CONFLICT (user_id) DO UPDATE SET credited = wallets.credited + excluded.credited
    RETURNING credited, credited - spent - clawed_back AS balance
), p AS (
    INSERT INTO purchases (purchase_id, request_id, user_id, store, store_transaction_id,
        store_reference, environment, package_id, product_id, votes, bonus_votes,
        price_micros, currency_code, store_price_micros, store_currency, purchased_at,
        balance_after, fingerprint)
    SELECT %(purchase)s, %(request)s, %(user)s, %(store)s, %(transaction)s, %(reference)s,
        %(environment)s, %(package)s, %(product)s, %(bought)s, %(bonus)s, %(price)s,
        %(currency)s, %(store_price)s, %(store_currency)s, %(purchased_at)s, w.balance,
        %(fingerprint)s
      FROM w
    RETURNING credited_at
), a AS (
    """ + audit.insert_sql("""(SELECT jsonb_build_array(jsonb_build_object(
        'actor_role', 'voter', 'actor', %(user)s, 'action', 'purchase.credit',
        'target', 'user:' || %(user)s, 'reason', %(store)s,
        'details', %(details)s::jsonb || jsonb_build_object('balance_after', w.balance)))
      FROM w)""") + """
)
SELECT w.credited, w.balance, p.credited_at FROM w, p
"""

# A Google purchase consumed, and its audit entry (none when it was recorded before).
RECORD_CONSUMPTION = (
    "WITH c AS (INSERT INTO purchase_consumptions (purchase_id) VALUES (%(p)s)"
    "           ON CONFLICT DO NOTHING RETURNING purchase_id) "
    + audit.insert_sql(
        "(SELECT jsonb_agg(jsonb_build_object('actor_role', 'internal', 'actor',"
        " 'vote_svc', 'action', 'purchase.consume', 'target', 'purchase:' || %(p)s,"
        " 'reason', 'GOOGLE', 'details', jsonb_build_object('purchase_id', %(p)s)))"
        " FROM c)"))

# Google purchases credited more than (interval) ago, within Google's three days, neither
# consumed nor refunded.
UNCONSUMED = (
    "SELECT p.purchase_id::text, p.product_id, p.store_reference FROM purchases p"
    " WHERE p.store = 'GOOGLE' AND p.credited_at < now() - %s"
    "   AND p.credited_at > now() - interval '3 days'"
    "   AND NOT EXISTS (SELECT 1 FROM purchase_consumptions c"
    "                    WHERE c.purchase_id = p.purchase_id)"
    "   AND NOT EXISTS (SELECT 1 FROM purchase_refunds r"
    "                    WHERE r.purchase_id = p.purchase_id)"
    " LIMIT 500")

PURCHASE_TO_REFUND = (
    "SELECT purchase_id::text, user_id, votes + bonus_votes AS votes"
    "  FROM purchases WHERE store = %s AND store_transaction_id = %s")
LOCK_WALLET = "SELECT credited, spent, clawed_back FROM wallets WHERE user_id = %s FOR UPDATE"
REFUNDED = "SELECT 1 FROM purchase_refunds WHERE purchase_id = %s"
INSERT_REFUND = (
    "INSERT INTO purchase_refunds (refund_id, purchase_id, user_id, source, store_reason,"
    "   refunded_at, votes_credited, clawed_back, already_spent, flagged_for_review)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)")
CLAW_BACK = "UPDATE wallets SET clawed_back = clawed_back + %s WHERE user_id = %s"

VOIDED_POLLED_TO = "SELECT polled_to FROM purchase_poll_state WHERE name = 'google_voided'"
SET_VOIDED_POLLED_TO = (
    "INSERT INTO purchase_poll_state (name, polled_to) VALUES ('google_voided', %s)"
    " ON CONFLICT (name) DO UPDATE SET polled_to = excluded.polled_to")

# `televote refunds`: every refund recorded since a time, with its purchase.
REFUNDS_SINCE = (
    "SELECT r.recorded_at, r.refunded_at, r.user_id, p.store, p.store_transaction_id,"
    "       p.package_id, p.price_micros, p.currency_code, r.source, r.store_reason,"
    "       r.votes_credited, r.clawed_back, r.already_spent, r.flagged_for_review"
    "  FROM purchase_refunds r JOIN purchases p USING (purchase_id)"
    " WHERE r.recorded_at >= %s ORDER BY r.recorded_at")
