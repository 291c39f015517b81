-- Show sync: shows, episodes, contestants, performances, voting rounds, the show's event log
-- and the outcomes of operators' mutating requests (idempotency).
-- depends: 0001_foundation

-- Owner: sync_svc.
CREATE TABLE shows (
    show_id      uuid PRIMARY KEY,
    name         text NOT NULL,
    broadcaster  text NOT NULL DEFAULT '',
    time_zone    text NOT NULL DEFAULT 'Asia/Phnom_Penh',
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- Owner: sync_svc.
CREATE TABLE episodes (
    episode_id              uuid PRIMARY KEY,
    show_id                 uuid NOT NULL REFERENCES shows,
    title                   text NOT NULL,
    scheduled_start_time    timestamptz,
    -- SCHEDULED -> LIVE -> ENDED
    state                   text NOT NULL DEFAULT 'SCHEDULED',
    free_vote_quota         integer NOT NULL CHECK (free_vote_quota >= 0),
    rate_limit_per_minute   integer NOT NULL CHECK (rate_limit_per_minute > 0),
    started_at              timestamptz,
    ended_at                timestamptz,
    -- Bumped by every change of the episode or its rounds; events carry it, so a watcher can
    -- drop what its snapshot already includes.
    version                 bigint NOT NULL DEFAULT 0,
    created_at              timestamptz NOT NULL DEFAULT now()
);

-- Owner: sync_svc.
CREATE TABLE contestants (
    contestant_id  uuid PRIMARY KEY,
    episode_id     uuid NOT NULL REFERENCES episodes,
    name           text NOT NULL,
    photo_url      text NOT NULL DEFAULT '',
    sms_number     integer NOT NULL CHECK (sms_number BETWEEN 1 AND 12),
    UNIQUE (episode_id, sms_number)
);

-- Owner: sync_svc.
CREATE TABLE performances (
    performance_id  uuid PRIMARY KEY,
    episode_id      uuid NOT NULL REFERENCES episodes,
    contestant_id   uuid NOT NULL REFERENCES contestants,
    song_title      text NOT NULL DEFAULT '',
    song_artist     text NOT NULL DEFAULT '',
    started_at      timestamptz NOT NULL,
    ended_at        timestamptz
);
-- At most one performance on stage per episode.
CREATE UNIQUE INDEX performances_one_on_stage ON performances (episode_id) WHERE ended_at IS NULL;

-- Owner: sync_svc.
CREATE TABLE rounds (
    round_id             uuid PRIMARY KEY,
    episode_id           uuid NOT NULL REFERENCES episodes,
    name                 text NOT NULL,
    contestant_ids       uuid[] NOT NULL,
    window_ms            bigint NOT NULL CHECK (window_ms > 0),
    -- Extra cap on free votes per user in this round; 0 = only the episode quota applies.
    free_vote_cap        integer NOT NULL DEFAULT 0 CHECK (free_vote_cap >= 0),
    visibility           text NOT NULL,
    -- When each channel stops taking votes, relative to the broadcast close (closes_at): an
    -- SMS grace for carrier delay, a later close for viewers on a delayed stream.
    app_close_offset_ms  bigint NOT NULL DEFAULT 0,
    web_close_offset_ms  bigint NOT NULL DEFAULT 0,
    sms_close_offset_ms  bigint NOT NULL DEFAULT 0,
    -- PENDING -> OPEN -> CLOSED -> FINALIZED (the final result is published)
    state                text NOT NULL DEFAULT 'PENDING',
    -- Window bounds by the Redis server clock, the clock vote admission judges by.
    opens_at             timestamptz,
    closes_at            timestamptz,
    -- When the last channel closes: the moment the round closes by itself.
    lines_close_at       timestamptz,
    closed_at            timestamptz,
    close_cause          text,
    created_at           timestamptz NOT NULL DEFAULT now()
);
-- At most one open window per episode, whatever the replicas race to do.
CREATE UNIQUE INDEX rounds_one_open_per_episode ON rounds (episode_id) WHERE state = 'OPEN';
CREATE INDEX rounds_open_by_close ON rounds (lines_close_at) WHERE state = 'OPEN';

-- Owner: runtime (runtime/idempotency.py; every service writes through it).
-- The outcome of every mutating request, so a retry with the same request id gets the same
-- answer and changes nothing.
CREATE TABLE request_outcomes (
    request_id   text PRIMARY KEY,
    method       text NOT NULL,
    fingerprint  bytea NOT NULL,
    response     bytea NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now()
);

-- Owner: sync_svc.
-- Every show event, in order per episode: what was announced and when, for auditors and for
-- replicas that missed a pub/sub message.
CREATE TABLE show_events (
    episode_id   uuid NOT NULL REFERENCES episodes,
    version      bigint NOT NULL,
    event_type   text NOT NULL,
    payload      bytea NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (episode_id, version)
);
