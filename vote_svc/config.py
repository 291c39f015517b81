"""vote_svc's configuration (environment variables, read once at start)."""

from __future__ import annotations

from typing import ClassVar

from runtime import overload
from runtime.config import ServiceConfig


class VoteConfig(ServiceConfig):
    service_name: ClassVar[str] = "vote_svc"

    #: Every statement of the vote path inserts rows or looks them up by key (the voter, the
    #: request id, the wallet): a plan per execution only cost PostgreSQL CPU.
    database_generic_plans: bool = True

    #: fraud_svc replicas ("ipv4:host:port,..."); empty means every vote is admitted unscored.
    fraud_target: str = ""
    #: Scoring requests of this many ms are sent as one batch (fewer messages, one hop); with
    #: scoring on, this is where a vote waits for company (see vote_admit_wait_ms).
    vote_fraud_batch_ms: float = 4.0
    #: A scoring call slower than this counts as "scoring unavailable" (voting must not stall).
    vote_fraud_timeout_ms: float = 300.0
    #: When scoring is unavailable: True admits votes as UNSCORED (recorded, to be scored
    #: later; a broadcaster would rather not stop voting), False refuses with UNAVAILABLE.
    vote_fraud_fail_open: bool = True
    #: After a failed scoring call, skip fraud_svc for this long instead of paying its
    #: timeout on every batch (a crude circuit breaker).
    vote_fraud_retry_ms: float = 1000.0

    #: An admission waits up to this long for other calls' votes, to go to Redis in the same
    #: pipeline (unless they were scored together, which gathered them already). Behind the
    #: edge a replica's pipeline holds only a few votes at once, and on a small machine each
    #: round trip costs more CPU than a vote's own work: waiting a few ms gathers enough
    #: votes per round trip to carry about a third more votes on the same CPU, for ~10 ms of
    #: latency (bench/RESULTS.md, vote_bench 2026-12-02). A gateway's call of 50 votes or
    #: more does not wait: its votes fill a pipeline (runtime.coalesce.company_wait_ms).
    vote_admit_wait_ms: float = 2.0
    #: Admission pipelines to Redis (and voters' first-vote reads from PostgreSQL) out at
    #: once per replica; 0: no limit. At the limit the next one waits for one to return and
    #: takes every call that queued meanwhile ("smart batching", runtime/coalesce.py): it
    #: holds what arrived during a round trip, so it grows with the load by itself. With
    #: VOTE_ADMIT_WAIT_MS=0, VOTE_BATCH_INTERVAL_MS=0 and VOTE_MAX_INFLIGHT_BATCHES=1 (the
    #: ledger the same way) nothing waits on a timer; measured so far it costs more CPU per
    #: vote than the timed waits with a few votes in the pipeline, and the same with 16-64
    #: (bench/RESULTS.md, vote_bench, 2026-12-04 unary-cost): an option, not the default.
    vote_admit_max_inflight: int = 0

    #: Group commit: a batch is written when it has this many votes ...
    vote_batch_max: int = 1000
    #: ... or when its oldest vote has waited this long (a ledger statement costs PostgreSQL
    #: ~300 µs of CPU whatever its size, plus ~30 µs a vote).
    vote_batch_interval_ms: float = 5.0
    #: Batches being written at once (each on its own PostgreSQL connection).
    vote_max_inflight_batches: int = 4
    #: A batch commit slower than this fails (clients get UNAVAILABLE, admissions are undone).
    vote_commit_timeout_ms: float = 2000.0

    #: Load shedding (vote_svc/ingest.py): votes one replica works on at once; once there, new
    #: calls (a gateway's batch counts its votes) are refused at once with UNAVAILABLE
    #: `OVERLOADED` instead of queueing. About what a replica commits in a second.
    vote_max_inflight_votes: int = 500
    #: What one vote of a gateway batch weighs against that limit, a unary vote weighing 1:
    #: a batch vote cost 146-166 µs of CPU against 919-1,595 for a unary gRPC or JSON vote
    #: (vote_svc/README.md, Performance), so about a sixth.
    vote_gateway_vote_cost: float = 0.15
    #: A gateway's own `received_at` may be at most this much older than when the edge
    #: received the call (carrier delay), and never later (runtime/gateway_time.py).
    vote_gateway_max_age_ms: int = 120_000
    #: For a call from inside the mesh (sms_svc forwards the edge's time), how far the
    #: vote's time may be ahead of this host's clock.
    vote_gateway_clock_tolerance_ms: int = 1_000
    #: A call with this little of its deadline left is not started (DEADLINE_EXCEEDED).
    vote_min_time_left_ms: float = 5.0
    #: Admission by queue time (vote_svc/overload.py; the numbers and why in
    #: runtime/overload.py, the one overload budget): while calls have waited (on this host,
    #: since they reached it) more than the target for a whole interval, a call that waited
    #: more than the target is refused at once with UNAVAILABLE `OVERLOADED`; otherwise only
    #: past half the budget. A vote not admitted in Redis within the budget is refused before
    #: it is admitted. The budget must stay below the rounds' receive lag
    #: (migrations/0018), so that a vote received before the close is admitted, or refused,
    #: within it.
    vote_queue_target_ms: float = overload.QUEUE_TARGET_MS
    vote_queue_interval_ms: float = overload.QUEUE_INTERVAL_MS
    vote_queue_budget_ms: float = overload.QUEUE_BUDGET_MS
    #: The retry delay an OVERLOADED refusal asks for, on average: each refusal asks for a
    #: random delay between half and one and a half times this, so the refused clients of one
    #: burst come back spread out instead of as the same burst again.
    vote_overload_retry_ms: float = overload.RETRY_MS

    #: How long an admitted-but-uncommitted vote holds its request id. A retry arriving later
    #: than this (the replica that admitted it died) checks the ledger and takes over. Must be
    #: well above the commit timeout plus the batch interval.
    vote_lease_ms: int = 10_000
    #: How often each replica looks for admissions whose replica died before committing them
    #: (leases ended, vote_svc/reconcile.py) and gives their quota and balance back.
    vote_reconcile_interval_ms: float = 2000.0
    #: How often UNSCORED ledger votes are looked for and scored again (vote_svc/rescore.py;
    #: one replica at a time), and how many go to fraud_svc in one ScoreVotes call.
    vote_rescore_interval_ms: float = 1000.0
    vote_rescore_batch: int = 500
    #: A re-scoring call slower than this fails; the batch is tried again later.
    vote_rescore_timeout_ms: float = 10_000.0
    #: How long Redis remembers a committed request id (the ledger remembers forever).
    vote_idempotency_ttl_s: int = 86_400
    #: Votes (sum of counts) per user per minute, by the Redis clock.
    vote_rate_limit_per_minute: int = 100
    #: After Redis lost a shard's state, wait this long before rebuilding it from the ledger so
    #: that votes admitted before the loss have been committed (or undone). Must exceed the
    #: commit timeout plus the batch interval.
    vote_rebuild_settle_ms: int = 2500
    # -- Purchases (vote_svc/purchases.py, vote_svc/stores.py) ------------------------------
    #: Apple root certificates (DER or PEM files, comma-separated) a signed transaction or
    #: notification must chain to: Apple Root CA - G3 in production. Empty: no Apple sales.
    vote_apple_root_certs: str = ""
    #: The app whose purchases count (a broadcaster's own app has its own).
    vote_apple_bundle_id: str = "com.hangmeas.xfactor"
    #: "Production" or "Sandbox": a transaction from the other environment is refused.
    vote_apple_environment: str = "Production"
    #: The app's Apple id; required in Production (notifications are checked against it).
    vote_apple_app_apple_id: int | None = None
    #: Ask Apple's OCSP responders whether the signing certificates were revoked (network
    #: calls, run off the event loop under the store timeout like every store call).
    vote_apple_online_checks: bool = True
    #: The Android app (package name) whose purchases count.
    vote_google_package_name: str = "com.hangmeas.xfactor"
    #: Service-account key file (JSON) with access to the Play Developer API. Empty: no
    #: Google Play sales.
    vote_google_credentials: str = ""
    #: The Play Developer API's base URL; empty is Google's (tests point it at a stand-in).
    vote_google_api_url: str = ""
    #: "Production" refuses license testers' purchases (no money moved); "Sandbox" only
    #: accepts those.
    vote_google_environment: str = "Production"
    #: The token a Pub/Sub push of Play notifications must carry (`?token=`); empty refuses
    #: every push (the Voided Purchases poll still finds refunds).
    vote_google_push_token: str = ""
    #: A store call slower than this answers STORE_UNAVAILABLE (nothing credited).
    vote_store_timeout_ms: float = 5000.0
    #: Threads that run the stores' synchronous libraries, away from the event loop that
    #: serves votes; and store calls in flight per replica beyond which purchases are refused
    #: at once with STORE_UNAVAILABLE instead of queueing behind a slow store.
    vote_store_threads: int = 4
    vote_store_max_inflight: int = 32
    #: How often one replica polls Google's Voided Purchases API and retries consumptions.
    vote_voided_poll_interval_s: float = 300.0

    #: Secret salt of the voter pseudonym in receipts (the ledger tree names no user). No
    #: default: a salt anyone can read would let anyone find a user's votes in an export.
    #: `televote up` keeps a random one in its state directory.
    vote_pseudonym_salt: str
    #: Secret key of the IP hash the ledger keeps instead of the address (HMAC-SHA256): the
    #: same IP gives the same hash, so votes from one address can still be grouped, but the
    #: address cannot be read back or guessed without the key. No default, like the salt.
    vote_ip_hash_key: str
    #: A MaxMind-format GeoIP2/GeoLite2 City (or Country) database: each vote's IP place
    #: (province or country) is looked up in it at admission and kept in the ledger
    #: (`votes.ip_geo`; the IP itself is not kept). Empty: no IP place, the report says
    #: "unknown" for voters without GPS.
    vote_geoip_db: str = ""
