"""sync_svc's configuration: the seed's durations as defaults, every one overridable so tests
can run a whole show in seconds."""

from __future__ import annotations

from typing import ClassVar

from runtime.config import ServiceConfig


class SyncConfig(ServiceConfig):
    service_name: ClassVar[str] = "sync_svc"

    #: A round's voting window when CreateRound does not say (seed: 30 minutes).
    sync_default_window_ms: int = 30 * 60 * 1000
    sync_min_window_ms: int = 10_000
    sync_max_window_ms: int = 4 * 3600 * 1000
    #: How far a channel's close may sit from the broadcast close.
    sync_max_channel_offset_ms: int = 5 * 60 * 1000
    #: Free votes per user per episode when CreateEpisode does not say (seed: 5).
    sync_default_free_votes: int = 5
    #: Votes per user per minute when CreateEpisode does not say (seed: 100).
    sync_default_rate_limit_per_minute: int = 100
    #: Countdown ticks while a round is open (seed: TIME_UPDATE every 10 s, 60 s and 10 s
    #: included, beside a WARNING at 1 minute and a COUNTDOWN each second from 10).
    sync_time_update_every_s: int = 10
    sync_warning_at_s: int = 60
    sync_countdown_from_s: int = 10
    #: Events a watcher may fall behind by before it is sent a fresh snapshot instead.
    sync_watcher_queue: int = 32
    #: The longest the closer sleeps before looking for due rounds in PostgreSQL again, so a
    #: round opened by another replica whose announcement was lost is still closed on time.
    sync_close_poll_ms: int = 1000
    #: Show events still unpublished this long after their commit are published by the
    #: closer loop of any replica (their replica died before publishing them).
    sync_outbox_replay_after_ms: int = 2000
    #: How often every replica re-applies the committed windows of open and recently closed
    #: rounds to Redis (a window write lost between a commit and its Redis write).
    sync_window_repair_ms: int = 1000
    #: How often every replica records its open WatchShow streams per episode, for the
    #: report's peak of concurrent viewers (0: never).
    sync_viewer_sample_ms: int = 10_000
