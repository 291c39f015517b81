"""The whole mesh on one machine: what `televote up` runs and what the tests start.

PostgreSQL and Redis come from their wheels unless DATABASE_URL / REDIS_URL name servers to
use; migrations run; every service starts as its own process (as many replicas as asked);
Envoy starts from its wheel in front of them. Stopping goes in reverse: the edge first so no
new request comes in, then the services (each drains its in-flight RPCs), then Redis and
PostgreSQL, so an acknowledged vote is always on disk before its database stops.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ops import edge, tokens
from ops.addresses import remove_addresses, write_addresses
from ops.infra import start_postgres, start_redis
from ops.kannel import Kannel
from ops.migrate import migrate
from ops.processes import Child, free_port, wait_serving

log = logging.getLogger(__name__)

#: Start order: a service starts after those it calls (fraud before vote, vote before sms).
SERVICES = ("fraud_svc", "sync_svc", "vote_svc", "results_svc", "sms_svc")

#: Environment variable through which a service finds each service it calls.
TARGET_VARIABLES = {
    "fraud_svc": "FRAUD_TARGET",
    "sync_svc": "SYNC_TARGET",
    "vote_svc": "VOTE_TARGET",
    "results_svc": "RESULTS_TARGET",
}


@dataclass
class StackSettings:
    """What to start and where."""

    state_dir: Path
    edge_host: str = "127.0.0.1"
    edge_port: int = 8080
    #: Load balancers in front of the edge whose X-Forwarded-For is trusted (ops/edge.py).
    trusted_proxy_hops: int = 0
    admin_port: int = 0
    replicas: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SERVICES, 1))
    database_url: str | None = None
    redis_url: str | None = None
    #: Extra environment for every service (durations shortened by tests, log level, ...).
    service_env: dict[str, str] = field(default_factory=dict)
    #: Start Kannel (bearerbox, smsbox) in front of the edge, a fake SMSC link per carrier
    #: (ops/kannel.py), and send SMS replies through it.
    kannel: bool = False


@dataclass
class Stack:
    """A running mesh. `start()` returns once every upstream is healthy behind the edge."""

    settings: StackSettings
    database_url: str = ""
    redis_url: str = ""
    edge_port: int = 0
    admin_port: int = 0
    addresses: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    _infra: list[Child] = field(default_factory=list)
    _services: list[Child] = field(default_factory=list)
    _edge: Child | None = None
    kannel: Kannel | None = None
    #: Extra environment per service (fraud_svc's development GeoIP database).
    _service_extra: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def edge_target(self) -> str:
        """host:port of the edge, for gRPC channels."""
        return f"{self.settings.edge_host}:{self.edge_port}"

    @property
    def edge_url(self) -> str:
        return f"http://{self.edge_target}"

    def target(self, service: str) -> str:
        """A gRPC target naming every replica of a process, for round-robin inside the mesh."""
        return "ipv4:" + ",".join(f"{host}:{port}" for host, port in self.addresses[service])

    async def start(self) -> None:
        state_dir = self.settings.state_dir.resolve()
        state_dir.mkdir(parents=True, exist_ok=True)
        logs = state_dir / "logs"
        try:
            self.database_url = self.settings.database_url or await self._own_postgres(state_dir)
            self.redis_url = self.settings.redis_url or await self._own_redis(state_dir)
            applied = await asyncio.to_thread(migrate, self.database_url)
            log.info("migrations applied: %s", applied or "none pending")
            jwks = tokens.ensure_signing_key(state_dir)
            self._service_extra["fraud_svc"] = await asyncio.to_thread(
                dev_geoip_environment, state_dir, {**os.environ, **self.settings.service_env})

            # The edge's port first: Kannel calls it, and sms_svc gives Kannel URLs on it.
            self.edge_port = self.settings.edge_port or free_port()
            self.admin_port = self.settings.admin_port or free_port()
            if self.settings.kannel:
                # Kannel runs beside the edge: it calls it on loopback whatever its address.
                self.kannel = Kannel(state_dir, f"http://127.0.0.1:{self.edge_port}")
                self._service_extra["sms_svc"] = self.kannel.sms_env()
            for service in SERVICES:
                count = self.settings.replicas.get(service, 1)
                self.addresses[service] = [("127.0.0.1", free_port()) for _ in range(count)]
            for service in SERVICES:
                for replica in range(len(self.addresses[service])):
                    self._services.append(await self._spawn_replica(service, replica))
            await asyncio.gather(*(wait_serving(f"{address[0]}:{address[1]}", child)
                                   for child, address in zip(self._services, self._all_addresses(),
                                                             strict=True)))

            config_path = state_dir / "envoy.yaml"
            config_path.write_text(edge.render(edge.EdgeSettings(
                jwks_path=jwks, jwt_issuer=tokens.ISSUER, jwt_audience=tokens.AUDIENCE,
                host=self.settings.edge_host, port=self.edge_port, admin_port=self.admin_port,
                trusted_proxy_hops=self.settings.trusted_proxy_hops, upstreams=self.addresses)))
            self._edge = await Child.spawn("envoy", [
                str(Path(sys.executable).parent / "envoy"), "-c", str(config_path),
                "--use-dynamic-base-id", "--log-level", "warn"], logs)
            await self._wait_edge_ready()
            if self.kannel is not None:
                await self.kannel.start()
            write_addresses(state_dir, {
                "edge": self.edge_target, "envoy-admin": f"127.0.0.1:{self.admin_port}",
                "database": self.database_url, "redis": self.redis_url,
                **{service: [f"{host}:{port}" for host, port in self.addresses[service]]
                   for service in SERVICES}})
        except BaseException:
            await self.stop()
            raise

    async def _spawn_replica(self, service: str, replica: int) -> Child:
        state_dir = self.settings.state_dir.resolve()
        host, port = self.addresses[service][replica]
        env = {**self._service_environment(state_dir), **self._service_extra.get(service, {}),
               "TELEVOTE_HOST": host, "TELEVOTE_PORT": str(port),
               "TELEVOTE_REPLICA": str(replica)}
        return await Child.spawn(f"{service}-{replica}", [sys.executable, "-m", service],
                                 state_dir / "logs", env=env)

    def child(self, service: str, replica: int) -> Child:
        name = f"{service}-{replica}"
        return next(child for child in self._services if child.name == name)

    async def kill(self, service: str, replica: int = 0,
                   signum: signal.Signals = signal.SIGKILL) -> int | None:
        """Stop one replica the hard way (or with `signum`), as a crash or a deploy would."""
        child = self.child(service, replica)
        child.stop_signal = signum
        return await child.stop()

    async def restart(self, service: str, replica: int = 0) -> None:
        """Start a stopped replica again on its old address and wait until it is SERVING."""
        old = self.child(service, replica)
        if old.running:
            raise RuntimeError(f"{old.name} is still running")
        child = await self._spawn_replica(service, replica)
        self._services[self._services.index(old)] = child
        host, port = self.addresses[service][replica]
        await wait_serving(f"{host}:{port}", child)

    def _service_environment(self, state_dir: Path) -> dict[str, str]:
        env = {"DATABASE_URL": self.database_url, "REDIS_URL": self.redis_url,
               "TELEVOTE_STATE_DIR": str(state_dir), "PYTHONUNBUFFERED": "1",
               "VOTE_PSEUDONYM_SALT": _secret(state_dir / "pseudonym-salt"),
               "VOTE_IP_HASH_KEY": _secret(state_dir / "ip-hash-key"),
               "SMS_MSISDN_SECRET": _secret(state_dir / "msisdn-secret")}
        env.update({variable: self.target(service)
                    for service, variable in TARGET_VARIABLES.items()})
        env.update(self.settings.service_env)
        return env

    def _all_addresses(self) -> list[tuple[str, int]]:
        return [address for service in SERVICES for address in self.addresses[service]]

    async def _own_postgres(self, state_dir: Path) -> str:
        child, url = await start_postgres(state_dir)
        self._infra.append(child)
        return url

    async def _own_redis(self, state_dir: Path) -> str:
        child, url = await start_redis(state_dir)
        self._infra.append(child)
        return url

    async def _wait_edge_ready(self, timeout: float = 30.0) -> None:
        """Ready when Envoy is live and has seen every upstream replica pass a health check."""
        assert self._edge is not None
        expected = sum(len(addresses) for addresses in self.addresses.values())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._edge.running:
                raise RuntimeError(f"envoy exited at start:\n{self._edge.log_tail()}")
            clusters = await asyncio.to_thread(self._admin_get, "/clusters")
            healthy = clusters.count("::health_flags::healthy") if clusters else 0
            if healthy >= expected:
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"edge upstreams not healthy after {timeout:.0f}s:\n"
                           f"{self._edge.log_tail()}")

    def _admin_get(self, path: str) -> str | None:
        try:
            with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.admin_port}{path}", timeout=1) as response:
                return str(response.read().decode())
        except OSError:
            return None

    async def stop(self) -> None:
        """Stop in reverse dependency order; leaves no process behind."""
        remove_addresses(self.settings.state_dir.resolve())
        if self.kannel is not None:
            await self.kannel.stop()
        if self._edge is not None:
            await self._edge.stop()
        for child in reversed(self._services):
            await child.stop()
        for child in reversed(self._infra):
            await child.stop()

    def describe(self) -> str:
        """What is where, for the operator who just ran `televote up`."""
        lines = [f"edge (gRPC, gRPC-Web, JSON/SSE)  {self.edge_url}",
                 f"envoy admin (loopback only)      http://127.0.0.1:{self.admin_port}",
                 f"PostgreSQL                       {self.database_url}",
                 f"Redis                            {self.redis_url}"]
        for service in SERVICES:
            replicas = ", ".join(f"{h}:{p}" for h, p in self.addresses.get(service, []))
            lines.append(f"{service:<33}{replicas}")
        if self.kannel is not None:
            ports = ", ".join(f"{carrier} {port}"
                              for carrier, port in self.kannel.smsc_ports.items())
            lines.append(f"Kannel sendsms                   {self.kannel.sendsms_url}")
            lines.append(f"Kannel fake SMSC links           {ports} (fakesmsc -r PORT)")
        state_dir = self.settings.state_dir.resolve()
        lines.append(f"data, keys (state directory)     {state_dir}")
        lines.append(f"logs                             {state_dir / 'logs'}")
        return "\n".join(lines)


def dev_geoip_environment(state_dir: Path, environ: Mapping[str, str]) -> dict[str, str]:
    """fraud_svc's GeoIP database for a local mesh: FRAUD_GEOIP_DB when it is configured
    (production, or a real GeoLite2 file), else a development database of the synthetic
    network plan (fraud_svc/devgeo.py), written into the state directory on first start, so
    country, location and VPN/hosting signals are scored for real. Without the dev extra
    (mmdb-writer) there is none and those signals say unknown, as fraud_svc logs."""
    if environ.get("FRAUD_GEOIP_DB"):
        return {}
    path = state_dir / "dev-geoip.mmdb"
    if not path.exists():
        try:
            from fraud_svc.devgeo import write_database
            partial = path.with_suffix(".partial")
            write_database(partial)
            partial.replace(path)  # never a half-written database at the final path
        except ImportError:
            log.warning("no development GeoIP database (install the dev extra, or set "
                        "FRAUD_GEOIP_DB)")
            return {}
    return {"FRAUD_GEOIP_DB": str(path)}


def _secret(path: Path) -> str:
    """A random secret kept in the state directory, made on first use."""
    if not path.exists():
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
    return path.read_text().strip()
