-- Receipt lookups in O(log n): a finalized round's leaves in blocks of 1024 (by ledger order),
-- the key of each block's first leaf, and each block's subtree root. A receipt finds its block
-- by the key index, reads that block's leaves (a slice of one round_result_leaves chunk) and
-- builds its inclusion proof from them and the block roots; no replica keeps a whole tree.
-- depends: 0005_results

-- Owner: results_svc.
CREATE TABLE round_result_blocks (
    round_id      uuid NOT NULL REFERENCES round_results,
    block         integer NOT NULL,
    admitted_ms   bigint NOT NULL,
    vote_id       uuid NOT NULL,
    receipt_hash  bytea NOT NULL,
    PRIMARY KEY (round_id, admitted_ms, vote_id, receipt_hash)
);

-- Owner: results_svc.
CREATE TABLE round_result_block_roots (
    round_id      uuid PRIMARY KEY REFERENCES round_results,
    block_leaves  integer NOT NULL,
    -- The subtree roots of the blocks, 32 bytes each, in order (results_svc.merkle.TopTree).
    roots         bytea NOT NULL
);

-- Leaves are hashes (incompressible): stored uncompressed, a slice of a chunk reads only the
-- TOAST pages it covers.
ALTER TABLE round_result_leaves ALTER COLUMN leaves SET STORAGE EXTERNAL;

CREATE TRIGGER round_result_blocks_final BEFORE UPDATE OR DELETE ON round_result_blocks
    FOR EACH ROW EXECUTE FUNCTION round_results_are_final();
CREATE TRIGGER round_result_block_roots_final BEFORE UPDATE OR DELETE
    ON round_result_block_roots FOR EACH ROW EXECUTE FUNCTION round_results_are_final();
