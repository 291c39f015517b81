-- Alters show_events (owner: sync_svc).
-- Show events as an outbox: a change's event row is written in the change's transaction and
-- marked published once it has gone out on Redis pub/sub; any sync_svc replica's closer loop
-- publishes rows still unmarked (the replica that committed them died before publishing).
-- depends: 0002_show_sync

ALTER TABLE show_events ADD COLUMN published_at timestamptz;
UPDATE show_events SET published_at = recorded_at;
CREATE INDEX show_events_unpublished ON show_events (recorded_at) WHERE published_at IS NULL;
