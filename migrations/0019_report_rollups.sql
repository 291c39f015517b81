-- The post-show report kept as votes commit (issue 19): results_svc's rollups of each round and
-- episode, folded from the result checkpoint's verdicts; the IP's place recorded at admission
-- (vote_svc's ledger: `votes` is altered); the viewers of WatchShow sampled per replica
-- (sync_svc); an index for the report's purchases (vote_svc's `purchases` is indexed).
-- depends: 0016_reports 0017_service_roles

-- vote_svc: where the voter's IP is, looked up in the GeoIP database at admission (the ledger
-- keeps only the IP's keyed hash, so it cannot be looked up later): "KH-12" (a province, ISO
-- 3166-2), "KH" (Cambodia, province unknown), "FR" (a country abroad); NULL: no IP, no
-- database, or not found. Nullable without a default: adding it rewrites no partition.
ALTER TABLE votes ADD COLUMN ip_geo text;

-- results_svc: a round's part is now its rollup, extended as the checkpoint judges the ledger
-- (results_svc/report/rollup.py): every ledger row of the round admitted before
-- `watermark_ms` is in it, judged as the checkpoint (or, once `final`, the final result)
-- judged it. The parts and voter rows 0016 computed from whole rounds lack the per-voter
-- detail a rollup needs to take a voter out again, so they are recomputed.
DELETE FROM report_round_parts;
ALTER TABLE report_round_parts ADD COLUMN watermark_ms bigint NOT NULL DEFAULT -4611686018427387904;

-- results_svc: what one voter contributed to the round's part, so that a voter judged again
-- (a late fraud rejection, a credit) can be taken out and put back: counted votes per
-- timeline bucket {"minute_ms|channel|type": votes}, per contestant {id: votes}, votes not
-- counted per reason {reason: votes}; and the first IP place (by admission time).
ALTER TABLE report_round_voters
    ADD COLUMN buckets     jsonb NOT NULL DEFAULT '{}',
    ADD COLUMN contestants jsonb NOT NULL DEFAULT '{}',
    ADD COLUMN invalid     jsonb NOT NULL DEFAULT '{}',
    ADD COLUMN ip_geo_ms   bigint,
    ADD COLUMN ip_geo      text;

-- Owner: results_svc. One row per voter of an episode, the sum of their rows of its rounds:
-- what the episode's figures need per voter (distinct voters, distribution, place, returning).
-- `place` is where the voter voted from, resolved once: "KH/Phnom Penh", "FR/",
-- "unknown/" (first GPS point, else the first IP place).
CREATE TABLE report_episode_voters (
    episode_id  uuid NOT NULL,
    user_id     text NOT NULL,
    counted     bigint NOT NULL,
    free        bigint NOT NULL,
    paid        bigint NOT NULL,
    sms         bigint NOT NULL,
    app         bigint NOT NULL,
    web         bigint NOT NULL,
    free_cast   bigint NOT NULL,
    rounds      integer NOT NULL,
    first_gps   float8[],
    ip_geo_ms   bigint,
    ip_geo      text,
    place       text NOT NULL,
    returned    boolean NOT NULL,
    PRIMARY KEY (episode_id, user_id)
);

-- Owner: results_svc. The episode's figures over its voters, kept as the voter rows change:
-- {figure: [voters, votes]} (report/rollup.py `contributions`).
CREATE TABLE report_episode_figures (
    episode_id  uuid PRIMARY KEY,
    figures     jsonb NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Owner: results_svc. Voters the checkpoint judged again (user_id) or a checkpoint dropped
-- (user_id NULL: its verdicts start over), written in the checkpoint's transaction; the
-- rollup takes those voters (or the whole episode) out and puts them back, then deletes the
-- entries.
CREATE TABLE report_rollup_resets (
    round_id    uuid NOT NULL,
    user_id     text,
    logged_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX report_rollup_resets_by_round ON report_rollup_resets (round_id);

-- Owner: sync_svc. Open WatchShow streams of an episode on one replica at an instant
-- (sampled at the same instants on every replica, SYNC_VIEWER_SAMPLE_MS apart), so the
-- concurrent viewers at an instant are the sum over replicas.
CREATE TABLE episode_viewer_samples (
    episode_id  uuid NOT NULL,
    sample_ms   bigint NOT NULL,
    replica     text NOT NULL,
    viewers     integer NOT NULL CHECK (viewers >= 0),
    PRIMARY KEY (episode_id, sample_ms, replica)
);

-- vote_svc's purchases, read by the report by time (the episode's live hours): without it
-- the report scanned every purchase ever made.
CREATE INDEX purchases_by_time ON purchases (purchased_at);

GRANT SELECT, INSERT, UPDATE, DELETE ON report_episode_voters, report_episode_figures,
    report_rollup_resets
    TO televote_results_svc;
GRANT SELECT ON episode_viewer_samples TO televote_results_svc;
GRANT SELECT, INSERT, UPDATE ON episode_viewer_samples TO televote_sync_svc;
