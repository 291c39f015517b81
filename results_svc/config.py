"""results_svc's configuration."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator

from results_svc.signing import KEY_FILE
from runtime.config import ConfigError, ServiceConfig


class ResultsConfig(ServiceConfig):
    service_name: ClassVar[str] = "results_svc"

    #: sync_svc, told when a final result is stored (ShowInternalService.PublishResultsReady).
    sync_target: str
    #: The Ed25519 ledger signing key (PKCS#8 PEM). Every replica, on whatever host, must
    #: sign with the same key, so a deployment gives each the same file; it must exist.
    results_signing_key_file: Path | None = None
    #: Without RESULTS_SIGNING_KEY_FILE: a directory of this host where the key is kept,
    #: created on first start (one machine: development, tests).
    televote_state_dir: Path | None = None
    #: One live update per round per replica every this many ms (seed: 1 s).
    results_tick_ms: int = 1000
    #: The trend of a contestant with no votes in the five minutes before and some since:
    #: "stable" (the specification: nothing to compare) or "rising_fast" (shows a surge from
    #: nothing, e.g. a contestant who had no votes until their performance, as surging).
    results_trend_after_silence: Literal["stable", "rising_fast"] = "stable"
    #: After a round closes, wait this long for vote batches in flight to commit before
    #: recounting. Longer than vote_svc's commit timeout (VOTE_COMMIT_TIMEOUT_MS, 2 s): a batch
    #: admitted before the close either commits within it or is undone and refused.
    results_settle_ms: int = 3000
    #: Then also wait (up to this long after the close) for the live counters to match the
    #: ledger; a difference that remains is logged and measured at reconciliation.
    results_settle_max_ms: int = 8000
    #: How often an open round's checkpoint is extended (results_svc.checkpoint); 0: never
    #: (every close recounts the whole round). A step has a fixed cost of a dozen statements:
    #: every 250 ms it took ~10 % of the vote path's CPU at a thousand votes/s; every second,
    #: the close judges at most about a second of votes more (tens of ms at a peak).
    results_checkpoint_ms: int = Field(default=1000, ge=0)
    #: The checkpoint's watermark stays this far before the oldest admission still waiting
    #: for its ledger commit (and before the Redis clock): slack for clocks of several Redis
    #: nodes. (A vote that commits below the watermark anyway is detected and costs a rebuild,
    #: never a wrong result.)
    results_checkpoint_lag_ms: int = Field(default=100, ge=0)
    #: At most about this many ledger rows are judged in one step (one transaction).
    results_checkpoint_rows: int = Field(default=100_000, ge=1000)
    #: How often closed rounds are looked for in PostgreSQL.
    results_poll_ms: int = 500
    #: Final results whose whole tree is kept in memory for inclusion proofs (only results
    #: stored before block roots were: see Finalizer.inclusion).
    results_cached_trees: int = 4
    #: Leaves per receipt-lookup block: a receipt reads one block of leaves and the block
    #: roots. A power of two that divides the 65,536 leaves of a stored chunk.
    results_receipt_block_leaves: int = Field(default=1024, ge=1, le=65_536)

    #: The report's privacy threshold: a bucket of fewer voters (a place, a profile segment)
    #: is merged into "other".
    results_report_min_voters: int = Field(default=10, ge=1)
    #: A provisional report (the episode live, a round not finalized) is recomputed at most
    #: this often; a final one is computed once.
    results_report_provisional_ms: int = Field(default=5000, ge=0)
    #: How often a replica looks for ended episodes whose final report is not stored yet,
    #: and stores it (0: only on request).
    results_report_precompute_ms: int = Field(default=5000, ge=0)
    #: How often a replica extends the report's rollups behind the result checkpoints (0:
    #: never; a report then folds every row itself), and how many ledger rows one step (one
    #: transaction) folds at most.
    results_report_rollup_ms: int = Field(default=1000, ge=0)
    results_report_rollup_rows: int = Field(default=20_000, ge=1)
    #: The show's warning moment, this long before a round's broadcast close (sync_svc's
    #: SYNC_WARNING_AT_S).
    results_report_warning_s: int = Field(default=60, ge=0)

    def signing_key_path(self) -> tuple[Path, bool]:
        """Where the ledger signing key is, and whether it may be created there."""
        if self.results_signing_key_file is not None:
            return self.results_signing_key_file, False
        if self.televote_state_dir is not None:
            return self.televote_state_dir / KEY_FILE, True
        raise ConfigError("results_svc: set RESULTS_SIGNING_KEY_FILE (or TELEVOTE_STATE_DIR)")

    @field_validator("results_receipt_block_leaves")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError("must be a power of two")
        return value
