-- Alters vote_svc's vote_packages and votes and fraud_svc's fraud_policies: the seed's rules
-- as the defaults (issue 16).
-- depends: 0001_foundation 0002_show_sync 0004_votes 0008_fraud_policies

-- vote_svc's table: the packages under the specification's ids and store SKUs. Prices, votes
-- and bonuses are unchanged; wallets hold votes, not packages, so no wallet changes. The
-- Google ids are renamed in an order in which no two rows ever share one (UNIQUE).
UPDATE vote_packages AS p
   SET package_id = n.package_id, apple_product_id = n.apple, google_product_id = n.google
  FROM (VALUES
        ('votes_10',   'vote_pack_10',   'com.hangmeas.votes.10',   'votes_10'),
        ('votes_60',   'vote_pack_50',   'com.hangmeas.votes.50',   'votes_50'),
        ('votes_250',  'vote_pack_200',  'com.hangmeas.votes.200',  'votes_200'),
        ('votes_1200', 'vote_pack_1000', 'com.hangmeas.votes.1000', 'votes_1000'))
       AS n(old_id, package_id, apple, google)
 WHERE p.package_id = n.old_id;

-- vote_svc's table: the ledger keeps a keyed hash of the voter's IP (HMAC-SHA256 with
-- VOTE_IP_HASH_KEY, hex, vote_svc/ingest.py), never the address. Rows written before this
-- migration had the raw address; there is no key here to hash them with, so they are
-- dropped with the column (PostgreSQL reclaims the bytes as the rows are rewritten).
ALTER TABLE votes ADD COLUMN ip_hash text NOT NULL DEFAULT '';
ALTER TABLE votes DROP COLUMN ip;

-- fraud_svc's table: a show chooses its scoring and what the geographic rules do. NULL: the
-- deployment's default (FRAUD_SCORING "seed", FRAUD_GEO_* "refuse").
ALTER TABLE fraud_policies
    ADD COLUMN scoring text CHECK (scoring IN ('seed', 'tuned')),
    ADD COLUMN foreign_country text CHECK (foreign_country IN ('refuse', 'score')),
    ADD COLUMN location_mismatch text CHECK (location_mismatch IN ('refuse', 'score'));
