-- Vote ingestion: the append-only vote ledger, per-round tallies, free-vote usage and wallets.
-- depends: 0002_show_sync

-- Owner: vote_svc.
-- The ledger. One row per accepted submission (a paid vote of count 5 is one row).
-- Partitioned by HASH(user_id): the idempotency constraint is per user (user_id, request_id)
-- and a unique constraint on a partitioned table must contain the partition key; hash
-- partitions also need no DDL at run time (no partition to create when a round opens, so no
-- race between replicas). Readers by round use the (round_id, ...) index of each partition.
CREATE TABLE votes (
    vote_id        uuid NOT NULL,
    request_id     text NOT NULL,
    user_id        text NOT NULL,
    -- shard_of(user_id) (runtime.keys): lets a Redis shard's counters be rebuilt from here.
    shard          smallint NOT NULL,
    round_id       uuid NOT NULL,
    episode_id     uuid NOT NULL,
    contestant_id  uuid NOT NULL,
    vote_type      text NOT NULL CHECK (vote_type IN ('FREE', 'PAID', 'PREMIUM_SMS')),
    count          integer NOT NULL CHECK (count BETWEEN 1 AND 100),
    channel        text NOT NULL CHECK (channel IN ('APP', 'WEB', 'SMS')),
    -- When the admission script accepted it, by the Redis server clock (epoch ms and as a time).
    admitted_ms    bigint NOT NULL,
    admitted_at    timestamptz NOT NULL,
    -- ALLOW, REVIEW, or UNSCORED when fraud scoring was unavailable (scored later).
    fraud_action   text NOT NULL CHECK (fraud_action IN ('ALLOW', 'REVIEW', 'UNSCORED')),
    fraud_score    real,
    fraud_decision_id text NOT NULL DEFAULT '',
    ip             text NOT NULL DEFAULT '',
    device_id      text NOT NULL DEFAULT '',
    app_version    text NOT NULL DEFAULT '',
    latitude       double precision,
    longitude      double precision,
    -- When a gateway received it (SMS receive time), audit only.
    received_at    timestamptz,
    -- SHA-256 of the fields that make a retry "the same vote" (IDEMPOTENCY_MISMATCH otherwise).
    fingerprint    bytea NOT NULL,
    -- The receipt: leaf_data is the canonical JSON committed to the round's Merkle tree,
    -- receipt_hash = SHA-256(0x00 || leaf_data).
    leaf_data      bytea NOT NULL,
    receipt_hash   bytea NOT NULL,
    committed_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (user_id, request_id)
) PARTITION BY HASH (user_id);

CREATE TABLE votes_p0 PARTITION OF votes FOR VALUES WITH (MODULUS 8, REMAINDER 0);
CREATE TABLE votes_p1 PARTITION OF votes FOR VALUES WITH (MODULUS 8, REMAINDER 1);
CREATE TABLE votes_p2 PARTITION OF votes FOR VALUES WITH (MODULUS 8, REMAINDER 2);
CREATE TABLE votes_p3 PARTITION OF votes FOR VALUES WITH (MODULUS 8, REMAINDER 3);
CREATE TABLE votes_p4 PARTITION OF votes FOR VALUES WITH (MODULUS 8, REMAINDER 4);
CREATE TABLE votes_p5 PARTITION OF votes FOR VALUES WITH (MODULUS 8, REMAINDER 5);
CREATE TABLE votes_p6 PARTITION OF votes FOR VALUES WITH (MODULUS 8, REMAINDER 6);
CREATE TABLE votes_p7 PARTITION OF votes FOR VALUES WITH (MODULUS 8, REMAINDER 7);
CREATE INDEX votes_by_round ON votes (round_id, contestant_id);
CREATE INDEX votes_by_vote_id ON votes (vote_id);

-- Append-only: a vote is never changed or removed (fraud rejections are recorded elsewhere).
CREATE FUNCTION votes_are_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'votes is append-only';
END $$;
CREATE TRIGGER votes_append_only BEFORE UPDATE OR DELETE ON votes
    FOR EACH ROW EXECUTE FUNCTION votes_are_append_only();
CREATE TRIGGER votes_append_only_truncate BEFORE TRUNCATE ON votes
    FOR EACH STATEMENT EXECUTE FUNCTION votes_are_append_only();

-- Owner: vote_svc.
-- Per-round tallies, bumped in the same transaction as the ledger rows they count.
CREATE TABLE round_tallies (
    round_id       uuid NOT NULL,
    contestant_id  uuid NOT NULL,
    vote_type      text NOT NULL,
    channel        text NOT NULL,
    votes          bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (round_id, contestant_id, vote_type, channel)
);

-- Owner: vote_svc.
-- Free votes used per user per episode. The CHECK makes PostgreSQL the last line of
-- invariant 4 whatever happened to the Redis admission cache.
CREATE TABLE free_vote_usage (
    user_id     text NOT NULL,
    episode_id  uuid NOT NULL,
    used        integer NOT NULL,
    quota       integer NOT NULL,
    PRIMARY KEY (user_id, episode_id),
    CONSTRAINT free_votes_within_quota CHECK (used <= quota)
);

-- Owner: vote_svc.
-- Paid balance = credited - spent. Same reasoning: overspending is impossible in the ledger.
CREATE TABLE wallets (
    user_id    text PRIMARY KEY,
    credited   bigint NOT NULL DEFAULT 0,
    spent      bigint NOT NULL DEFAULT 0,
    CONSTRAINT wallet_not_overspent CHECK (spent <= credited)
);

-- Owner: vote_svc.
-- Every credit (operator grants now; store purchases later). Idempotent on request_id.
CREATE TABLE wallet_credits (
    credit_id    uuid PRIMARY KEY,
    request_id   text NOT NULL UNIQUE,
    user_id      text NOT NULL,
    votes        integer NOT NULL CHECK (votes > 0),
    source       text NOT NULL,
    reason       text NOT NULL,
    granted_by   text NOT NULL,
    fingerprint  bytea NOT NULL,
    balance_after bigint NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX wallet_credits_by_user ON wallet_credits (user_id);
