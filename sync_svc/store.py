"""sync_svc's SQL: the statements of the show's state machine (show.py), named.

Each change in show.py runs several of these in one transaction that locks the episode row;
this module only names them, so the transaction's order and locks stay readable where they
are taken.
"""

from __future__ import annotations

# -- show.py ----------------------------------------------------------------------------------

EPISODE_WINDOW_FIELDS = (
    "SELECT free_vote_quota, rate_limit_per_minute,"
    " version FROM episodes WHERE episode_id = %s"
)

MARK_EVENTS_PUBLISHED = (
    "UPDATE show_events SET published_at = now() FROM unnest(%s::uuid[],"
    " %s::bigint[]) AS e(episode_id, version) WHERE show_events.episode_id ="
    " e.episode_id AND show_events.version = e.version"
)

WINDOWS_TO_REPAIR = (
    "SELECT r.*, e.free_vote_quota, e.rate_limit_per_minute, e.version"
    " FROM rounds r JOIN episodes e USING (episode_id) WHERE r.state = 'OPEN'"
    " OR (r.state = 'CLOSED' AND r.closed_at > %s)"
)

UNPUBLISHED_EVENTS = (
    "SELECT episode_id::text, version, payload FROM show_events"
    " WHERE published_at IS NULL AND recorded_at < now() - %s"
    " ORDER BY recorded_at, episode_id, version LIMIT %s FOR UPDATE SKIP LOCKED"
)

BUMP_EPISODE_VERSION = (
    "UPDATE episodes SET version = version + 1"
    " WHERE episode_id = %s RETURNING version"
)

INSERT_SHOW_EVENT = (
    "INSERT INTO show_events (episode_id, version, event_type, payload)"
    " VALUES (%s, %s, %s, %s)"
)

INSERT_SHOW = (
    "INSERT INTO shows (show_id, name, broadcaster, time_zone)"
    " VALUES (%s, %s, %s, %s) RETURNING *"
)

SHOW_EXISTS = "SELECT 1 FROM shows WHERE show_id = %s"

INSERT_EPISODE = (
    "INSERT INTO episodes (episode_id, show_id, title,"
    " scheduled_start_time, free_vote_quota, rate_limit_per_minute)"
    " VALUES (%s, %s, %s, %s, %s, %s) RETURNING *"
)

SMS_NUMBER_TAKEN = "SELECT 1 FROM contestants WHERE episode_id = %s AND sms_number = %s"

INSERT_CONTESTANT = (
    "INSERT INTO contestants (contestant_id, episode_id, name,"
    " photo_url, sms_number) VALUES (%s, %s, %s, %s, %s) RETURNING *"
)

EPISODE_CONTESTANT_IDS = "SELECT contestant_id FROM contestants WHERE episode_id = %s"

INSERT_ROUND = (
    "INSERT INTO rounds (round_id, episode_id, name, contestant_ids, window_ms,"
    " free_vote_cap, visibility, app_close_offset_ms, web_close_offset_ms,"
    " sms_close_offset_ms) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
    " RETURNING *"
)

START_EPISODE = (
    "UPDATE episodes SET state = 'LIVE', started_at = %s"
    " WHERE episode_id = %s"
)

CONTESTANT_IN_EPISODE = (
    "SELECT 1 FROM contestants WHERE contestant_id = %s"
    " AND episode_id = %s"
)

INSERT_PERFORMANCE = (
    "INSERT INTO performances (performance_id, episode_id, contestant_id,"
    " song_title, song_artist, started_at) VALUES (%s, %s, %s, %s, %s, %s)"
    " RETURNING *"
)

END_PERFORMANCE = (
    "UPDATE performances SET ended_at = %s WHERE episode_id = %s"
    " AND ended_at IS NULL RETURNING *"
)

OPEN_ROUND_EXISTS = (
    "SELECT 1 FROM rounds WHERE episode_id = %s"
    " AND state = 'OPEN'"
)

OPEN_ROUND = (
    "UPDATE rounds SET state = 'OPEN', window_ms = %s, opens_at = %s, closes_at = %s,"
    " lines_close_at = %s WHERE round_id = %s RETURNING *"
)

EXTEND_ROUND = (
    "UPDATE rounds SET closes_at = closes_at + %s, lines_close_at = lines_close_at"
    " + %s, window_ms = window_ms + %s WHERE round_id = %s RETURNING *"
)

CLOSE_ROUND = (
    "UPDATE rounds SET state = 'CLOSED', closed_at = %s, close_cause = %s"
    " WHERE round_id = %s AND state = 'OPEN' RETURNING *"
)

OPEN_ROUND_OF_EPISODE = (
    "SELECT * FROM rounds WHERE episode_id = %s"
    " AND state = 'OPEN'"
)

END_EPISODE = (
    "UPDATE episodes SET state = 'ENDED', ended_at = %s"
    " WHERE episode_id = %s"
)

NEXT_PENDING_ROUND = (
    "SELECT round_id FROM rounds WHERE episode_id = %s"
    " AND state = 'PENDING' ORDER BY created_at LIMIT 1"
)

NEXT_LINES_CLOSE = (
    "SELECT min(lines_close_at) AS due FROM rounds"
    " WHERE state = 'OPEN'"
)

ROUNDS_DUE_TO_CLOSE = (
    "SELECT round_id, episode_id FROM rounds WHERE state = 'OPEN'"
    " AND lines_close_at <= %s"
)

FINALIZE_ROUND = (
    "UPDATE rounds SET state = 'FINALIZED'"
    " WHERE round_id = %s RETURNING *"
)

CURRENT_ROUND = (
    "SELECT * FROM rounds WHERE episode_id = %s AND opens_at IS NOT NULL"
    " ORDER BY (state = 'OPEN') DESC, opens_at DESC LIMIT 1"
)

CONTESTANTS_BY_ID = "SELECT * FROM contestants WHERE contestant_id = ANY(%s)"

EPISODE_FINISHED = (
    "SELECT e.state = 'ENDED' AND NOT EXISTS (SELECT 1 FROM rounds r"
    " WHERE r.episode_id = e.episode_id AND r.state IN"
    " ('OPEN', 'CLOSED')) AS finished FROM episodes e"
    " WHERE e.episode_id = %s"
)

EPISODE = "SELECT * FROM episodes WHERE episode_id = %s"

EPISODE_FOR_UPDATE = (
    "SELECT * FROM episodes WHERE episode_id = %s"
    " FOR UPDATE"
)

ROUND = "SELECT * FROM rounds WHERE round_id = %s"

CURRENT_PERFORMANCE = (
    "SELECT * FROM performances WHERE episode_id = %s"
    " AND ended_at IS NULL"
)

#: One replica's open WatchShow streams per episode at a sample instant (migrations/0019).
RECORD_VIEWERS = (
    "INSERT INTO episode_viewer_samples (episode_id, sample_ms, replica, viewers)"
    " SELECT s.episode_id::uuid, %s, %s, viewers FROM unnest(%s::text[], %s::int[])"
    "   AS s(episode_id, viewers)"
    # WatchShow takes any well-formed id; only episodes that exist are sampled.
    " JOIN episodes e ON e.episode_id = s.episode_id::uuid"
    " ON CONFLICT (episode_id, sample_ms, replica)"
    " DO UPDATE SET viewers = excluded.viewers"
)
