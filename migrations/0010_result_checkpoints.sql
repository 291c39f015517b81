-- Result checkpoints: results_svc judges an open round's ledger as it grows (in ledger order, up
-- to a watermark), so the close only judges the last seconds of votes (results_svc.checkpoint).
-- Two logs say what changed behind a checkpoint, by the transaction that changed it: ledger rows
-- committed with an order key below a watermark, and fraud rejections or wallet credits that
-- change how rows already judged count.
-- depends: 0009_result_blocks

-- Owner: results_svc.
-- One row per round being checkpointed (removed when its final result is stored).
CREATE TABLE round_checkpoints (
    round_id      uuid PRIMARY KEY REFERENCES rounds,
    -- Every ledger row of the round admitted before this (ms) is judged, and no other.
    watermark_ms  bigint NOT NULL,
    -- The snapshot the checkpoint was last extended in; what committed after it is news.
    snapshot      pg_snapshot NOT NULL,
    snapshot_xmin xid8 NOT NULL,
    -- The round's rules as they judge rows below the watermark (a change means: start over).
    rules         jsonb NOT NULL,
    -- Leaves so far; the leaves of the last, unfinished block; where the unfinished chunk of
    -- round_result_leaves starts (ledger-order key of its first leaf).
    tree_size     bigint NOT NULL,
    block_leaves  integer NOT NULL,
    block_tail    bytea NOT NULL,
    chunk_start_ms   bigint,
    chunk_start_id   uuid,
    chunk_start_hash bytea,
    -- contestant_id -> votes counted / votes in the ledger, below the watermark.
    counts        jsonb NOT NULL,
    ledger        jsonb NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- Owner: results_svc.
-- The subtree roots of the completed blocks (becomes round_result_block_roots at close).
CREATE TABLE round_checkpoint_roots (
    round_id  uuid NOT NULL REFERENCES round_checkpoints ON DELETE CASCADE,
    block     integer NOT NULL,
    root      bytea NOT NULL,
    PRIMARY KEY (round_id, block)
);

-- Owner: results_svc.
-- The judged rows that do not count, by ledger row (user_id, request_id is its identity).
CREATE TABLE round_checkpoint_invalid (
    round_id      uuid NOT NULL REFERENCES round_checkpoints ON DELETE CASCADE,
    user_id       text NOT NULL,
    request_id    text NOT NULL,
    vote_id       uuid NOT NULL,
    contestant_id uuid NOT NULL,
    count         integer NOT NULL,
    admitted_ms   bigint NOT NULL,
    receipt_hash  bytea NOT NULL,
    reason        text NOT NULL,
    PRIMARY KEY (round_id, user_id, request_id)
);

-- Completed leaf chunks and block keys are written as the checkpoint goes, straight into the
-- tables receipts read (a round's rows there are only read once its result is stored). They
-- may be dropped and rewritten until then; after that they are final, as before.
ALTER TABLE round_result_leaves DROP CONSTRAINT round_result_leaves_round_id_fkey,
    ADD CONSTRAINT round_result_leaves_round_id_fkey FOREIGN KEY (round_id) REFERENCES rounds;
ALTER TABLE round_result_blocks DROP CONSTRAINT round_result_blocks_round_id_fkey,
    ADD CONSTRAINT round_result_blocks_round_id_fkey FOREIGN KEY (round_id) REFERENCES rounds;

CREATE FUNCTION round_result_parts_are_final() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM round_results WHERE round_id = OLD.round_id) THEN
        RAISE EXCEPTION 'final results are never changed';
    END IF;
    RETURN CASE TG_OP WHEN 'DELETE' THEN OLD ELSE NEW END;
END $$;
DROP TRIGGER round_result_leaves_final ON round_result_leaves;
CREATE TRIGGER round_result_leaves_final BEFORE UPDATE OR DELETE ON round_result_leaves
    FOR EACH ROW EXECUTE FUNCTION round_result_parts_are_final();
DROP TRIGGER round_result_blocks_final ON round_result_blocks;
CREATE TRIGGER round_result_blocks_final BEFORE UPDATE OR DELETE ON round_result_blocks
    FOR EACH ROW EXECUTE FUNCTION round_result_parts_are_final();

-- Owner: results_svc (filled by a trigger on votes, pruned by results_svc).
-- Every ledger insert, per statement and round, with the transaction that made it: a row
-- committed after a checkpoint's snapshot below its watermark is found here (its xid is not
-- visible in that snapshot), whatever the writer. Pruned by results_svc once no checkpoint's
-- snapshot can miss it.
CREATE TABLE ledger_appends (
    xid          xid8 NOT NULL DEFAULT pg_current_xact_id(),
    round_id     uuid NOT NULL,
    episode_id   uuid NOT NULL,
    first_ms     bigint NOT NULL,
    paid         boolean NOT NULL
);
CREATE INDEX ledger_appends_by_xid ON ledger_appends (xid);

CREATE FUNCTION ledger_appends_log() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO ledger_appends (round_id, episode_id, first_ms, paid)
    SELECT round_id, episode_id, min(admitted_ms), bool_or(vote_type = 'PAID')
      FROM new_votes GROUP BY round_id, episode_id;
    RETURN NULL;
END $$;
CREATE TRIGGER votes_appends AFTER INSERT ON votes REFERENCING NEW TABLE AS new_votes
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_appends_log();

-- Owner: results_svc (filled by triggers on fraud_rejections and wallets, pruned by results_svc).
-- Changes to what judges a voter's rows after they were judged: fraud rejections (of a round)
-- and paid credits (every round). Pruned like ledger_appends.
CREATE TABLE result_input_changes (
    xid       xid8 NOT NULL DEFAULT pg_current_xact_id(),
    user_id   text NOT NULL,
    -- NULL: every round of the user.
    round_id  text
);
CREATE INDEX result_input_changes_by_xid ON result_input_changes (xid);

CREATE FUNCTION result_input_changes_log() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 'fraud_rejections' THEN
        INSERT INTO result_input_changes (user_id, round_id) VALUES (NEW.user_id, NEW.round_id);
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO result_input_changes (user_id) VALUES (OLD.user_id);
    ELSE
        INSERT INTO result_input_changes (user_id) VALUES (NEW.user_id);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER fraud_rejections_changes AFTER INSERT ON fraud_rejections
    FOR EACH ROW EXECUTE FUNCTION result_input_changes_log();
CREATE TRIGGER wallets_credit_inserts AFTER INSERT OR DELETE ON wallets
    FOR EACH ROW EXECUTE FUNCTION result_input_changes_log();
CREATE TRIGGER wallets_credit_changes AFTER UPDATE OF credited ON wallets
    FOR EACH ROW WHEN (OLD.credited IS DISTINCT FROM NEW.credited)
    EXECUTE FUNCTION result_input_changes_log();
