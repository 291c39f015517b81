-- sms_reply_outbox (owner: sms_svc): each lease names the process that holds it, and a reply
-- that can never be sent ends in a final state with its reason.
-- A lease was only a time (due_at): a replica that had taken a reply could not tell that its
-- lease had ended and another replica had taken the reply meanwhile, so both sent it. Now a
-- replica sends a reply only while its own token holds the lease (sms_svc/outbox.py), and
-- marks only replies it holds. A reply whose subscriber's number was purged (`televote sms
-- purge`) stayed pending for ever; it is now dropped, with the reason, by the purge itself
-- and by any replica's poll that meets one.
-- depends: 0020_sms_reply_outbox

ALTER TABLE sms_reply_outbox
    -- The process holding the lease until due_at (sms_svc's per-process token).
    ADD COLUMN lease_token text,
    -- Final without being sent, and why (MSISDN_PURGED).
    ADD COLUMN dropped_at  timestamptz,
    ADD COLUMN drop_reason text NOT NULL DEFAULT '',
    ADD CHECK (sent_at IS NULL OR dropped_at IS NULL);

DROP INDEX sms_reply_outbox_pending;
CREATE INDEX sms_reply_outbox_pending ON sms_reply_outbox (due_at)
    WHERE sent_at IS NULL AND dropped_at IS NULL;
