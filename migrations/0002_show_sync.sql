-- Show sync: shows, episodes, contestants, voting rounds and the show's event log.
-- depends: 0001_foundation

CREATE TABLE shows (
    show_id     uuid PRIMARY KEY,
    name        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE episodes (
    episode_id               uuid PRIMARY KEY,
    show_id                  uuid NOT NULL REFERENCES shows,
    name                     text NOT NULL,
    -- SCHEDULED -> LIVE -> ENDED
    state                    text NOT NULL DEFAULT 'SCHEDULED',
    free_votes_per_user      integer NOT NULL CHECK (free_votes_per_user >= 0),
    current_contestant_id    uuid,
    current_song             text NOT NULL DEFAULT '',
    performance_started_at   timestamptz,
    -- Bumped by every state change; events carry it so clients can order what they see.
    version                  bigint NOT NULL DEFAULT 0,
    created_at               timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE contestants (
    contestant_id  uuid PRIMARY KEY,
    episode_id     uuid NOT NULL REFERENCES episodes,
    name           text NOT NULL,
    photo_url      text NOT NULL DEFAULT '',
    sms_number     integer NOT NULL CHECK (sms_number BETWEEN 1 AND 12),
    UNIQUE (episode_id, sms_number)
);

CREATE TABLE rounds (
    round_id             uuid PRIMARY KEY,
    episode_id           uuid NOT NULL REFERENCES episodes,
    name                 text NOT NULL,
    contestant_ids       uuid[] NOT NULL,
    window_ms            bigint NOT NULL CHECK (window_ms > 0),
    results_visibility   text NOT NULL,
    -- How long after the broadcast close each channel keeps taking votes.
    app_close_offset_ms  bigint NOT NULL DEFAULT 0 CHECK (app_close_offset_ms >= 0),
    web_close_offset_ms  bigint NOT NULL DEFAULT 0 CHECK (web_close_offset_ms >= 0),
    sms_close_offset_ms  bigint NOT NULL DEFAULT 0 CHECK (sms_close_offset_ms >= 0),
    -- PENDING -> OPEN -> CLOSED
    state                text NOT NULL DEFAULT 'PENDING',
    opens_at             timestamptz,
    closes_at            timestamptz,
    closed_at            timestamptz,
    close_cause          text,
    created_at           timestamptz NOT NULL DEFAULT now()
);
-- At most one open window per episode, whatever the replicas race to do.
CREATE UNIQUE INDEX rounds_one_open_per_episode ON rounds (episode_id) WHERE state = 'OPEN';
CREATE INDEX rounds_open_by_close ON rounds (closes_at) WHERE state = 'OPEN';

-- The outcome of every mutating request, so a retry with the same request id gets the same
-- answer and changes nothing.
CREATE TABLE request_outcomes (
    request_id   text PRIMARY KEY,
    method       text NOT NULL,
    fingerprint  bytea NOT NULL,
    response     bytea NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now()
);

-- Every event a watcher of the show is sent, in order; the snapshot a (re)connecting client
-- gets is read from the tables above, the events after it from pub/sub.
CREATE TABLE show_events (
    episode_id   uuid NOT NULL REFERENCES episodes,
    version      bigint NOT NULL,
    event_type   text NOT NULL,
    payload      bytea NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (episode_id, version)
);
