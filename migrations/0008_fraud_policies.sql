-- Per-show fraud policy: a show's own block and review thresholds and geo-fence, in place of
-- the deployment's FRAUD_BLOCK_THRESHOLD / FRAUD_REVIEW_THRESHOLD / FRAUD_ALLOWED_COUNTRIES.
-- Set by operators (FraudReviewService.SetFraudPolicy, audited as 'fraud.policy.set'); read by
-- every fraud_svc replica with its blocklist (reloaded every FRAUD_REFRESH_SECONDS).
-- depends: 0002_show_sync 0003_fraud

-- Owner: fraud_svc.
CREATE TABLE fraud_policies (
    show_id            uuid PRIMARY KEY REFERENCES shows,
    block_threshold    double precision NOT NULL,
    review_threshold   double precision NOT NULL,
    -- ISO 3166-1 alpha-2 codes, upper case; at least one.
    allowed_countries  text[] NOT NULL CHECK (cardinality(allowed_countries) > 0),
    note               text NOT NULL DEFAULT '',
    updated_by         text NOT NULL,
    updated_at         timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT fraud_policy_thresholds
        CHECK (0 < review_threshold AND review_threshold <= block_threshold
               AND block_threshold <= 1)
);
