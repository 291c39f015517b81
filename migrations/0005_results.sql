-- Results: the final result of each round (exactly one), the votes it did not count, and the
-- keys that sign ledger digests.
-- depends: 0003_fraud 0004_votes

-- Owner: results_svc.
-- Public keys that have signed ledger digests (the private key stays in results_svc's state
-- directory). Never removed, so old digests stay verifiable.
CREATE TABLE ledger_keys (
    key_id      text PRIMARY KEY,
    public_key  bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Owner: results_svc.
-- One row per finalized round; the primary key is what makes several replicas store one
-- result (INSERT ... ON CONFLICT DO NOTHING: the first commit wins, the others change nothing).
CREATE TABLE round_results (
    round_id           uuid PRIMARY KEY REFERENCES rounds,
    -- Votes (sum of counts) in the ledger for the round, not counted, counted.
    ledger_votes       bigint NOT NULL,
    invalidated_votes  bigint NOT NULL,
    total_votes        bigint NOT NULL,
    -- contestant_id -> counted votes
    counts             jsonb NOT NULL,
    winner_ids         uuid[] NOT NULL,
    -- The signed digest (televote.results.v1.LedgerDigest).
    tree_size          bigint NOT NULL,
    root_hash          bytea NOT NULL,
    signed_tree_head   bytea NOT NULL,
    signature          bytea NOT NULL,
    key_id             text NOT NULL REFERENCES ledger_keys,
    signed_at          timestamptz NOT NULL,
    finalized_at       timestamptz NOT NULL DEFAULT now(),
    -- Provisional counters at close against the recount: {"provisional": {...}, "ledger":
    -- {...}, "differences": [...]}.
    reconciliation     jsonb NOT NULL DEFAULT '{}'::jsonb,
    computed_by        text NOT NULL DEFAULT ''
);

-- Owner: results_svc.
-- The tree's leaves (receipt hashes, 32 bytes each, concatenated in ledger order) in chunks:
-- inclusion proofs are served from exactly the leaves that were signed.
CREATE TABLE round_result_leaves (
    round_id  uuid NOT NULL REFERENCES round_results,
    chunk     integer NOT NULL,
    leaves    bytea NOT NULL,
    PRIMARY KEY (round_id, chunk)
);

-- Owner: results_svc.
-- The round's ledger rows that the final result does not count, and why (results_svc.rules).
CREATE TABLE round_result_invalid_votes (
    round_id  uuid NOT NULL REFERENCES round_results,
    vote_id   uuid NOT NULL,
    reason    text NOT NULL,
    PRIMARY KEY (round_id, vote_id)
);

CREATE FUNCTION round_results_are_final() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'final results are never changed';
END $$;
CREATE TRIGGER round_results_final BEFORE UPDATE OR DELETE ON round_results
    FOR EACH ROW EXECUTE FUNCTION round_results_are_final();
CREATE TRIGGER round_result_leaves_final BEFORE UPDATE OR DELETE ON round_result_leaves
    FOR EACH ROW EXECUTE FUNCTION round_results_are_final();
CREATE TRIGGER round_result_invalid_votes_final BEFORE UPDATE OR DELETE
    ON round_result_invalid_votes FOR EACH ROW EXECUTE FUNCTION round_results_are_final();

-- The ledger in tree order, per round.
CREATE INDEX votes_by_round_order ON votes (round_id, admitted_ms, vote_id);
