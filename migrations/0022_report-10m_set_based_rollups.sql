-- The report's rollups folded by set-based SQL (issue 19's 10 M target): a step folds its
-- ledger rows with one INSERT ... SELECT ... GROUP BY ... ON CONFLICT per table; the round's
-- part is the sum of its cells (rows); the episode's figures are rows, moved by a GROUP BY of
-- the touched voter rows' contributions (results_svc/report/rollup.py); the voter's declared
-- profile is kept on their episode row, so the demographic segments are figures too.
-- depends: 0019_report_rollups

-- Every rollup starts over (the folded JSON is not converted): results_svc folds the ledger
-- again behind the checkpoints; stored final reports stay.
DELETE FROM report_round_parts;
DELETE FROM report_episode_voters;
DROP TABLE report_episode_figures;

ALTER TABLE report_round_parts
    DROP COLUMN ledger_votes, DROP COLUMN counted_votes, DROP COLUMN voters,
    DROP COLUMN invalid, DROP COLUMN minutes, DROP COLUMN contestants;

-- What one voter added to each cell of the round's part, {cell: votes}: "v|" (their counted
-- votes; there while they have one), "m|minute_ms|channel|type" (a timeline bucket, counted
-- votes), "c|contestant_id" (counted votes), "i|reason" (votes not counted); so that a voter
-- is counted once per cell, and a voter judged again can be taken out and folded again.
ALTER TABLE report_round_voters
    DROP COLUMN buckets, DROP COLUMN contestants, DROP COLUMN invalid,
    ADD COLUMN cells jsonb NOT NULL DEFAULT '{}';

-- Owner: results_svc. A round's part by cell (kind: the cell's first letter as above, key: the
-- rest): votes, and distinct voters whose row has the cell. A few hundred rows a round.
CREATE TABLE report_round_cells (
    round_id    uuid NOT NULL REFERENCES report_round_parts ON DELETE CASCADE,
    kind        "char" NOT NULL,
    key         text NOT NULL,
    votes       bigint NOT NULL,
    voters      bigint NOT NULL,
    PRIMARY KEY (round_id, kind, key)
);

-- The voter's declared profile as the rollup last folded it (NULL: none declared; '' a field
-- not told), so that a change moves them between segments; `place` NULL: not located yet
-- (within a step only). Indexed by voter: a voter's earlier and later episodes of the show
-- (returning voters, kept right when an earlier episode's rows change).
ALTER TABLE report_episode_voters
    ADD COLUMN age_band text, ADD COLUMN gender text, ADD COLUMN province text,
    ALTER COLUMN place DROP NOT NULL;
CREATE INDEX report_episode_voters_by_user ON report_episode_voters (user_id);

-- Owner: results_svc. The episode's figures, one row each (report/store.py `contributions_sql`).
CREATE TABLE report_episode_figures (
    episode_id  uuid NOT NULL,
    figure      text NOT NULL,
    voters      bigint NOT NULL,
    votes       bigint NOT NULL,
    PRIMARY KEY (episode_id, figure)
);

-- Owner: results_svc. Per episode: profiles changed since `profiles_at` (less a margin for
-- transactions still committing) are compared with the episode's voter rows at each step.
CREATE TABLE report_episode_rollups (
    episode_id   uuid PRIMARY KEY,
    profiles_at  timestamptz NOT NULL
);

-- vote_svc's profiles, read by the rollup by time of change.
CREATE INDEX voter_profiles_by_change ON voter_profiles (updated_at);

GRANT SELECT, INSERT, UPDATE, DELETE ON report_round_cells,
    report_episode_figures, report_episode_rollups
    TO televote_results_svc;
