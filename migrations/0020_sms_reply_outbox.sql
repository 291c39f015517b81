-- SMS replies as an outbox (owner: sms_svc): a message's reply is written in the statement
-- that records its outcome, so a replica that dies after recording it cannot lose the reply;
-- a sender hands pending replies to the SMS gateway (Kannel's sendsms) and marks them sent,
-- and any replica resumes the ones a dead replica left pending (sms_svc/outbox.py).
-- depends: 0014_sms 0017_service_roles

-- Owner: sms_svc
CREATE TABLE sms_reply_outbox (
    -- The reply is the outcome's (sms_outcomes.reply_text), to the message's sender
    -- (sms_reply_addresses) on its carrier.
    message_id      uuid PRIMARY KEY REFERENCES sms_outcomes,
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- Not before this moment may a sender take the reply: a replica takes its own replies
    -- at once; another takes them only when the lease has ended (the replica died, or the
    -- gateway refused them and they wait for their next try).
    due_at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    attempts        integer NOT NULL DEFAULT 0,
    sent_at         timestamptz,
    last_error      text NOT NULL DEFAULT ''
);
CREATE INDEX sms_reply_outbox_pending ON sms_reply_outbox (due_at) WHERE sent_at IS NULL;

GRANT SELECT, INSERT, UPDATE ON sms_reply_outbox TO televote_sms_svc;
