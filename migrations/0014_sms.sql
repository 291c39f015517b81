-- Premium SMS (owner: sms_svc; no other service writes these tables): which show each
-- carrier's short code votes for, and the records of every message a carrier delivered, what
-- became of it and what the carrier reported about our reply.
--
-- A message's record is written in facts, each once, never changed: the message as received
-- (sms_messages, written before the vote so 200 concurrent redeliveries agree on one first
-- receipt), its outcome (sms_outcomes, the charge), delivery reports (sms_deliveries).
-- sms_records joins them into the one row per message that settlement and auditors read.
-- The raw MSISDN is not in them: only in sms_reply_addresses, kept for replies and removed
-- by `televote sms purge --before DATE`.
-- depends: 0002_show_sync 0004_votes

-- Owner: sms_svc
CREATE TABLE sms_short_codes (
    carrier       text NOT NULL CHECK (carrier IN ('SMART', 'CELLCARD', 'METFONE')),
    short_code    text NOT NULL CHECK (short_code ~ '^[0-9]{3,8}$'),
    show_id       uuid NOT NULL REFERENCES shows,
    price_micros  bigint NOT NULL CHECK (price_micros >= 0),
    currency_code char(3) NOT NULL,
    bound_by      text NOT NULL,
    bound_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (carrier, short_code)
);

-- Owner: sms_svc
CREATE TABLE sms_messages (
    message_id          uuid PRIMARY KEY,
    carrier             text NOT NULL,
    carrier_message_id  text NOT NULL,
    -- SHA-256 of (msisdn, short code, text): a redelivery must carry the same content.
    content_hash        bytea NOT NULL,
    -- Keyed pseudonym of the MSISDN (HMAC-SHA256); the vote's user is "sms:" || pseudonym.
    pseudonym           text NOT NULL,
    short_code          text NOT NULL,
    text                text NOT NULL,
    language            text NOT NULL,
    -- When the edge received the first delivery: what decides whether lines were open.
    received_at         timestamptz NOT NULL,
    -- What the carrier said, audit only.
    gateway_received_at timestamptz,
    UNIQUE (carrier, carrier_message_id)
);
CREATE INDEX sms_messages_received ON sms_messages (received_at);

-- Owner: sms_svc
CREATE TABLE sms_outcomes (
    message_id        uuid PRIMARY KEY REFERENCES sms_messages,
    outcome           text NOT NULL CHECK (outcome IN ('COUNTED', 'CLOSED', 'INVALID_FORMAT',
                          'UNKNOWN_CONTESTANT', 'RATE_LIMITED', 'BLOCKED')),
    contestant_number integer NOT NULL DEFAULT 0,
    show_id           uuid,
    episode_id        uuid,
    round_id          uuid,
    vote_id           uuid,
    charged           boolean NOT NULL,
    price_micros      bigint NOT NULL DEFAULT 0,
    currency_code     char(3) NOT NULL DEFAULT 'USD',
    reply_text        text NOT NULL,
    answered_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- Only a counted vote is charged, and it always names its vote.
    CHECK (charged = (outcome = 'COUNTED')),
    CHECK (NOT charged OR vote_id IS NOT NULL)
);
CREATE INDEX sms_outcomes_episode ON sms_outcomes (episode_id) WHERE charged;

-- Owner: sms_svc
CREATE TABLE sms_deliveries (
    delivery_id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id         uuid NOT NULL REFERENCES sms_messages,
    status             text NOT NULL,
    carrier_charged    boolean NOT NULL DEFAULT false,
    charged_micros     bigint NOT NULL DEFAULT 0,
    carrier_error_code text NOT NULL DEFAULT '',
    -- The carrier charged a message we did not mark chargeable.
    disputed           boolean NOT NULL DEFAULT false,
    reported_at        timestamptz,
    recorded_at        timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX sms_deliveries_message ON sms_deliveries (message_id, delivery_id);

CREATE FUNCTION sms_records_are_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only', TG_TABLE_NAME;
END $$;
CREATE TRIGGER sms_messages_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON sms_messages
    FOR EACH STATEMENT EXECUTE FUNCTION sms_records_are_append_only();
CREATE TRIGGER sms_outcomes_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON sms_outcomes
    FOR EACH STATEMENT EXECUTE FUNCTION sms_records_are_append_only();
CREATE TRIGGER sms_deliveries_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON sms_deliveries
    FOR EACH STATEMENT EXECUTE FUNCTION sms_records_are_append_only();

-- Owner: sms_svc
-- The sender of each message, only to address the reply (and its DLR); purged by date.
CREATE TABLE sms_reply_addresses (
    message_id   uuid PRIMARY KEY REFERENCES sms_messages,
    msisdn       text NOT NULL,
    received_at  timestamptz NOT NULL
);
CREATE INDEX sms_reply_addresses_received ON sms_reply_addresses (received_at);

-- Owner: sms_svc. One row per message: the record a carrier reconciles against.
CREATE VIEW sms_records AS
SELECT m.message_id, m.carrier, m.carrier_message_id, m.pseudonym, m.short_code, m.text,
       m.language, m.received_at, m.gateway_received_at,
       o.outcome, o.contestant_number, o.show_id, o.episode_id, o.round_id, o.vote_id,
       coalesce(o.charged, false) AS charged, coalesce(o.price_micros, 0) AS price_micros,
       o.currency_code, o.reply_text, o.answered_at,
       d.status AS delivery_status, d.recorded_at AS delivered_at
  FROM sms_messages m
  LEFT JOIN sms_outcomes o USING (message_id)
  -- The latest final report (delivered, failed, expired, rejected), else the latest: a
  -- gateway's reports may arrive out of order (Kannel's "SMSC accepted" after "delivered").
  LEFT JOIN LATERAL (SELECT status, recorded_at FROM sms_deliveries s
                      WHERE s.message_id = m.message_id
                      ORDER BY status = 'ACCEPTED', delivery_id DESC LIMIT 1) d ON true;
