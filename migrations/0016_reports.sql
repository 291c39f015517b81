-- The post-show report (ReportService): the voters' self-declared profiles, and what the
-- report keeps so that it never reads a finished round's ledger twice.
-- depends: 0005_results 0010_result_checkpoints 0012_round_tally_slots 0013_seed_defaults

-- Owner: vote_svc (VoteService.SetVoterProfile). One row per voter who told us anything; an
-- empty field is "not told" and the report says "unknown" for it, never a guess.
CREATE TABLE voter_profiles (
    user_id     text PRIMARY KEY,
    age_band    text NOT NULL DEFAULT '',
    gender      text NOT NULL DEFAULT '',
    province    text NOT NULL DEFAULT '',
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Owner: results_svc. A round's share of the report, computed from its ledger rows in one
-- indexed read of the round (votes_by_round_order) and the final result's invalid votes. A
-- finalized round's part is final (computed once, never again: its ledger and its result no
-- longer change); an open or closing round's part is provisional and replaced when a report
-- older than RESULTS_REPORT_PROVISIONAL_MS is asked for. The report of an episode is a merge
-- of its rounds' parts, so its cost is the number of voters, not of votes.
CREATE TABLE report_round_parts (
    round_id     uuid PRIMARY KEY REFERENCES rounds,
    episode_id   uuid NOT NULL,
    final        boolean NOT NULL,
    computed_at  timestamptz NOT NULL DEFAULT now(),
    -- Votes in the ledger and counted; votes not counted by reason {reason: votes};
    -- [[minute epoch ms, channel, vote type, votes, voters], ...] (counted votes);
    -- {contestant_id: [votes, voters]} (counted votes).
    ledger_votes bigint NOT NULL,
    counted_votes bigint NOT NULL,
    -- Distinct voters with a counted vote in the round.
    voters       bigint NOT NULL,
    invalid      jsonb NOT NULL,
    minutes      jsonb NOT NULL,
    contestants  jsonb NOT NULL
);
CREATE INDEX report_round_parts_by_episode ON report_round_parts (episode_id);

-- Owner: results_svc. One row per voter of a round (any ledger row): their counted votes by
-- type and by channel (app, web; sms is its type), every free vote they cast (counted or
-- not), and their first vote with a GPS point ([ms, lat, lon], ordered by admission time so
-- the episode's first is a min over rounds). No IP: the ledger keeps only its keyed hash.
CREATE TABLE report_round_voters (
    round_id     uuid NOT NULL REFERENCES report_round_parts ON DELETE CASCADE,
    user_id      text NOT NULL,
    counted      bigint NOT NULL,
    free         bigint NOT NULL,
    paid         bigint NOT NULL,
    sms          bigint NOT NULL,
    app          bigint NOT NULL,
    web          bigint NOT NULL,
    free_cast    bigint NOT NULL,
    first_gps    float8[],
    PRIMARY KEY (round_id, user_id)
);
-- No index by voter: returning voters are found by the earlier rounds' keys (a hash join),
-- and an index here would cost every part's insert of a row per voter.

-- Owner: results_svc. The final report of an episode (every round finalized, the episode
-- ENDED), serialized GetEpisodeReportResponse: computed once, then served as stored.
CREATE TABLE episode_reports (
    episode_id   uuid PRIMARY KEY REFERENCES episodes,
    report       bytea NOT NULL,
    computed_at  timestamptz NOT NULL DEFAULT now()
);
