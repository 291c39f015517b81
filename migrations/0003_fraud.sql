-- Fraud: reviews, rejections (what the final result must exclude), blocks, traveller exemptions.
-- depends: 0001_foundation

-- Owner: fraud_svc.
-- Votes that scoring sent to review (FRAUD_ACTION_REVIEW). One row per reviewed vote.
-- vote_ref is VoteFacts.ref of the scored vote (vote_svc passes the vote's request_id, so it is
-- votes.request_id of the user's ledger row); decision_id is VoteScore.decision_id (a UUID,
-- kept by vote_svc as votes.fraud_decision_id; the decision's audit_log row has it in
-- details -> 'attributes' ->> 'decision_id').
CREATE TABLE fraud_reviews (
    review_id          uuid PRIMARY KEY,
    -- Insertion order: the queue's order (created_at is shared by a batch's reviews).
    seq                bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    vote_ref           text NOT NULL,
    decision_id        text NOT NULL,
    user_id            text NOT NULL,
    round_id           text NOT NULL,
    score              double precision NOT NULL,
    signals            jsonb NOT NULL,
    state              text NOT NULL DEFAULT 'PENDING'
                       CHECK (state IN ('PENDING', 'APPROVED', 'REJECTED')),
    created_at         timestamptz NOT NULL DEFAULT now(),
    resolved_by        text,
    resolved_at        timestamptz,
    note               text NOT NULL DEFAULT '',
    -- The ResolveReview call that resolved it, and what it asked (idempotent retries).
    resolve_request_id text UNIQUE,
    resolve_decision   text,
    resolve_scope      text,
    affected_votes     bigint
);
CREATE UNIQUE INDEX fraud_reviews_vote ON fraud_reviews (round_id, user_id, vote_ref);
CREATE INDEX fraud_reviews_queue ON fraud_reviews (state, seq);
CREATE INDEX fraud_reviews_user ON fraud_reviews (user_id, round_id);

-- Owner: fraud_svc.
-- THE TABLE THE FINAL RESULT READS: a ledger vote v is rejected (excluded from the round's
-- result) iff
--   EXISTS (SELECT 1 FROM fraud_rejections r
--           WHERE r.round_id = v.round_id::text AND r.user_id = v.user_id
--             AND (r.vote_ref IS NULL OR r.vote_ref = v.request_id))
-- vote_ref NULL rejects every vote of the user in the round, including votes recorded after
-- the decision (scope USER_ROUND). decision_id (= votes.fraud_decision_id) is kept for
-- cross-checks. Rows are never updated or deleted: a rejection cannot be undone.
CREATE TABLE fraud_rejections (
    rejection_id uuid PRIMARY KEY,
    round_id     text NOT NULL,
    user_id      text NOT NULL,
    vote_ref     text,
    decision_id  text,
    review_id    uuid NOT NULL REFERENCES fraud_reviews (review_id),
    rejected_by  text NOT NULL,
    rejected_at  timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX fraud_rejections_vote ON fraud_rejections (round_id, user_id, vote_ref)
    WHERE vote_ref IS NOT NULL;
CREATE UNIQUE INDEX fraud_rejections_user ON fraud_rejections (round_id, user_id)
    WHERE vote_ref IS NULL;

CREATE FUNCTION fraud_rejections_are_final() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'fraud_rejections is append-only';
END $$;
CREATE TRIGGER fraud_rejections_append_only BEFORE UPDATE OR DELETE OR TRUNCATE
    ON fraud_rejections FOR EACH STATEMENT EXECUTE FUNCTION fraud_rejections_are_final();

-- Owner: fraud_svc.
-- Blocks: operator blocks of a user, device, IP or network, and the automatic flag of a user
-- whose vote scored over the block threshold (created_by 'fraud_svc'). A block is active
-- while deleted_at is NULL and expire_at is NULL or in the future.
CREATE TABLE fraud_blocks (
    block_id          uuid PRIMARY KEY,
    kind              text NOT NULL CHECK (kind IN ('USER', 'DEVICE', 'IP', 'CIDR')),
    value             text NOT NULL,
    reason            text NOT NULL,
    created_by        text NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    expire_at         timestamptz,
    deleted_at        timestamptz,
    deleted_by        text,
    create_request_id text UNIQUE,
    delete_request_id text
);
CREATE UNIQUE INDEX fraud_blocks_active ON fraud_blocks (kind, value) WHERE deleted_at IS NULL;

-- Owner: fraud_svc.
-- Travellers: users allowed to vote from outside the allowed countries (the geo-fence).
-- countries NULL means from anywhere.
CREATE TABLE fraud_travellers (
    user_id    text PRIMARY KEY,
    countries  text[],
    expire_at  timestamptz,
    created_by text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    reason     text NOT NULL DEFAULT ''
);

-- fraud_svc's audit entries live in audit_log (0001) with action 'fraud.<what>' and details
-- {"user_id", "round_id", "target_id", "request_id", "attributes": {...}}. Scoring decisions
-- (action 'fraud.score', REVIEW and BLOCK only) carry attributes.decision_id, the
-- VoteScore.decision_id returned to vote_svc.
CREATE INDEX audit_log_fraud_user ON audit_log ((details ->> 'user_id'), audit_id)
    WHERE action LIKE 'fraud.%';
CREATE INDEX audit_log_fraud_recent ON audit_log (audit_id) WHERE action LIKE 'fraud.%';
CREATE INDEX audit_log_fraud_decision ON audit_log ((details -> 'attributes' ->> 'decision_id'))
    WHERE action = 'fraud.score';
