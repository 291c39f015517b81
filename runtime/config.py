"""Typed, frozen service configuration read once from the environment.

A missing or malformed variable stops the process at start with a message that names the
variable, instead of failing on the first request that needs it.

Secrets may come as files instead: with TELEVOTE_SECRETS_DIR set, a file there named after a
variable (DATABASE_URL, VOTE_IP_HASH_KEY, ...) gives its value when the environment does not
(a Kubernetes Secret mounted as a volume, deploy/), so passwords and keys stay out of the
process environment.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar, Self

from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict


class ConfigError(SystemExit):
    """Raised (and exits the process) when the environment does not describe a valid config."""


class ServiceConfig(BaseSettings):
    """What every service needs. Services subclass it to add their own variables."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore", case_sensitive=False)

    #: Name used in logs, traces and metrics; each service overrides the default.
    service_name: ClassVar[str] = "televote"

    televote_host: str = "127.0.0.1"
    #: 0 lets the OS pick a free port (tests); `televote up` assigns one per replica.
    televote_port: int = 0
    #: A label for this process among the replicas of its service.
    televote_replica: str = "0"
    #: Seconds SIGTERM waits for in-flight RPCs before cancelling them.
    televote_grace_seconds: float = 10.0
    #: Seconds between saying NOT_SERVING and refusing new RPCs, so load balancers (Envoy
    #: health-checks every 2 s) move traffic away before the listener closes.
    televote_drain_announce_seconds: float = 1.0
    televote_log_level: str = "INFO"
    #: Server streams one client address may hold open without a token on one replica
    #: (runtime/interceptors.AnonymousStreams); 0: no cap. A mobile carrier's NAT puts
    #: thousands of viewers behind one address: the cap is for floods, not for them.
    televote_anonymous_streams_per_ip: int = 2000
    #: This process's mesh certificate, key and CA (runtime/mesh.py); unset: plaintext.
    televote_tls_dir: Path | None = None
    #: A second, plaintext port on TELEVOTE_HOST that serves grpc.health.v1 and nothing else,
    #: for probes that cannot present a mesh certificate (Kubernetes' `grpc:` probes,
    #: deploy/); unset: none. It tells only whether the process is serving.
    televote_health_port: int | None = None
    database_url: str
    redis_url: str
    #: Talk to Redis Cluster instead of a single Redis (same keys, same scripts); a URL with
    #: `?cluster=yes` says so too (runtime/storage.py), see `on_redis_cluster`.
    redis_cluster: bool = False
    #: Connections to Redis per process; callers wait for one when all are busy.
    redis_max_connections: int = 200
    database_pool_min: int = 1
    database_pool_max: int = 10
    #: PostgreSQL plans a prepared statement once (plan_cache_mode=force_generic_plan) instead
    #: of for each execution's values: for a service whose statements look rows up by key, or
    #: insert them, whatever the values (vote_svc's write path, where planning was a third of
    #: PostgreSQL's CPU per vote).
    database_generic_plans: bool = False
    #: Pooled connections in autocommit: each statement commits by itself, and code that
    #: needs several in one transaction opens it (`connection.transaction()`). For a service
    #: whose writes are single statements, which otherwise paid a COMMIT round trip each
    #: (sms_svc).
    database_autocommit: bool = False

    @property
    def on_redis_cluster(self) -> bool:
        """Whether REDIS_URL names a Redis Cluster, by REDIS_CLUSTER or by the URL itself."""
        from runtime.storage import redis_target  # storage imports this module

        return self.redis_cluster or redis_target(self.redis_url)[1]

    @classmethod
    def load(cls) -> Self:
        """Read the config from the environment, or exit naming every bad variable."""
        secrets_dir = os.environ.get("TELEVOTE_SECRETS_DIR")
        try:
            return cls(_secrets_dir=secrets_dir) if secrets_dir else cls()
        except ValidationError as error:
            problems = [
                f"{'_'.join(str(part) for part in issue['loc']).upper()}: {issue['msg']}"
                for issue in error.errors()
            ]
            raise ConfigError(
                f"{cls.service_name}: invalid configuration: " + "; ".join(problems)
            ) from None
