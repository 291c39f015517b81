-- Alters sync_svc's rounds and vote_svc's votes: lines-open is judged by when the edge received
-- a vote, within a bounded lag, not by when it got through our queues to admission (issue 22).
-- depends: 0002_show_sync 0004_votes 0017_service_roles

-- sync_svc's table: how long after the edge received a vote it may still be admitted as
-- received then. A vote admitted at A with edge time R is judged at max(R, A - lag) (never
-- after A): one that waited in a queue across the close still counts, one that waited longer
-- than the lag is judged as if received at A - lag. results_svc finalizes a closed round only
-- once the Redis clock is past its close plus this lag (results_svc/README.md).
ALTER TABLE rounds ADD COLUMN receive_lag_ms integer NOT NULL DEFAULT 1000
    CHECK (receive_lag_ms BETWEEN 0 AND 60000);

-- vote_svc's table: the time the window was judged by (epoch ms; the edge's receive time,
-- or for an SMS the edge's time of the message, bounded as above by the admission script).
-- NULL for votes admitted before this migration: judged by admitted_ms, as they were.
ALTER TABLE votes ADD COLUMN received_ms bigint;
