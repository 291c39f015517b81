-- Fraud decisions made after a vote was recorded: votes admitted UNSCORED while fraud_svc was
-- unreachable are scored again once it is back (vote_svc/rescore.py). The ledger is
-- append-only, so the outcome is recorded here, never in votes.
-- depends: 0003_fraud 0004_votes 0005_results

-- Owner: vote_svc.
-- One row per re-scored vote (the first decision wins; a re-run changes nothing).
-- action is what FraudScoringService answered. A BLOCK of a vote already in the ledger is
-- carried out as a fraud_rejections row (vote_ref = the vote's request_id), with an
-- automatically REJECTED fraud_reviews row as its review, so the final result's
-- FRAUD_REJECTED rule applies to it; a REVIEW queues a fraud_reviews row (by fraud_svc, as
-- for a live vote) that operators resolve. round_finalized: the round's final result was
-- already stored when the decision was made, so it was recorded but could not be applied.
CREATE TABLE vote_fraud_decisions (
    vote_id          uuid PRIMARY KEY,
    user_id          text NOT NULL,
    request_id       text NOT NULL,
    round_id         uuid NOT NULL,
    action           text NOT NULL CHECK (action IN ('ALLOW', 'REVIEW', 'BLOCK')),
    score            real,
    decision_id      text NOT NULL DEFAULT '',
    round_finalized  boolean NOT NULL DEFAULT false,
    scored_by        text NOT NULL,
    scored_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX vote_fraud_decisions_by_round ON vote_fraud_decisions (round_id);

CREATE FUNCTION vote_fraud_decisions_are_final() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'vote_fraud_decisions is append-only';
END $$;
CREATE TRIGGER vote_fraud_decisions_append_only BEFORE UPDATE OR DELETE OR TRUNCATE
    ON vote_fraud_decisions FOR EACH STATEMENT EXECUTE FUNCTION vote_fraud_decisions_are_final();

-- The re-scorer's work list: the few UNSCORED votes among many.
CREATE INDEX votes_unscored ON votes (admitted_ms, vote_id) WHERE fraud_action = 'UNSCORED';
