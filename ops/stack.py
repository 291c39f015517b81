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
import signal
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import redis

from ops import edge, pki, roles, tokens
from ops.addresses import remove_addresses, write_addresses
from ops.hosts import EDGE, STORES, Host, install
from ops.hosts import SERVICES as SERVICES_HOST
from ops.infra import start_postgres, start_redis
from ops.kannel import Kannel
from ops.migrate import migrate
from ops.processes import Child, free_port, wait_serving
from ops.redis_cluster import OwnRedisCluster
from results_svc.signing import KEY_FILE as LEDGER_KEY_FILE
from results_svc.signing import Signer
from runtime import mesh
from runtime.mesh import MeshTls
from runtime.secrets import private_dir, read_or_create_secret
from runtime.storage import cluster_url

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
    #: Mutual TLS from the edge to every service and between services (runtime/mesh.py);
    #: off only to measure what it costs (bench/mtls_bench.py).
    mtls: bool = True
    #: Envoy's worker threads. Envoy's own default, one per hardware thread, has every
    #: worker contend with the services for the cores of a host it shares with them; half the
    #: cores (at least one) answers a surge's refusals sooner at the same goodput: on 2
    #: cores the overload test's refusals had p99 51-93 ms with one worker against 103-156
    #: ms with two (bench/RESULTS.md, 2026-12-05). deploy/ gives the edge cores of its own.
    edge_workers: int = field(default_factory=lambda: max(1, (os.cpu_count() or 2) // 2))
    #: EdgeSettings fields to override (its abuse limits, for a load generator that is one
    #: client address: edge.ONE_LOAD_GENERATOR).
    edge: dict[str, Any] = field(default_factory=dict)
    #: Start a Redis Cluster of this many masters, each with a replica (ops/redis_cluster.py),
    #: instead of one Redis; 0: one Redis. Ignored when `redis_url` names one to use.
    redis_cluster: int = 0
    #: Start Kannel (bearerbox, smsbox) in front of the edge, a fake SMSC link per carrier
    #: (ops/kannel.py), and send SMS replies through it.
    kannel: bool = False
    #: Where the edge, the services and the stores run (ops/hosts.py): unset, on this
    #: machine's loopback (the edge on `edge_host`), keeping their files in `state_dir`.
    hosts: dict[str, Host] = field(default_factory=dict)

    def host(self, part: str) -> Host:
        """The host of `part` (ops.hosts.EDGE, SERVICES or STORES)."""
        if part in self.hosts:
            return self.hosts[part]
        return Host(address=self.edge_host) if part == EDGE else Host()


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
    #: The Redis Cluster the stack started (`StackSettings.redis_cluster`), for tests that
    #: kill one of its nodes.
    redis_nodes: OwnRedisCluster | None = None
    #: Extra environment per service (fraud_svc's development GeoIP database).
    _service_extra: dict[str, dict[str, str]] = field(default_factory=dict)
    #: Each service's own DATABASE_URL and REDIS_URL (ops/roles.py).
    service_urls: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def edge_target(self) -> str:
        """host:port of the edge, for gRPC channels."""
        return f"{self.settings.host(EDGE).address}:{self.edge_port}"

    @property
    def edge_url(self) -> str:
        return f"http://{self.edge_target}"

    def target(self, service: str) -> str:
        """A gRPC target naming every replica of a process, for round-robin inside the mesh."""
        return "ipv4:" + ",".join(f"{host}:{port}" for host, port in self.addresses[service])

    async def start(self) -> None:
        state_dir = self.settings.state_dir.resolve()
        # Keys, passwords and the database live below: nobody else may even look inside (as
        # root, PostgreSQL's system user gets to traverse it through the group, ops/infra.py).
        state_dir.mkdir(parents=True, exist_ok=True)
        state_dir.chmod(state_dir.stat().st_mode & 0o710)
        logs = state_dir / "logs"
        try:
            self.database_url = self.settings.database_url or await self._own_postgres(state_dir)
            self.redis_url = self.settings.redis_url or await self._own_redis(state_dir)
            applied = await asyncio.to_thread(migrate, self.database_url)
            log.info("migrations applied: %s", applied or "none pending")
            await asyncio.to_thread(self._provision_roles, state_dir)
            jwks = tokens.ensure_signing_key(state_dir)
            environ = {**os.environ, **self.settings.service_env}
            self._service_extra["fraud_svc"] = await asyncio.to_thread(
                dev_geoip_environment, state_dir, environ)
            # vote_svc records the IP's place at admission from the same database.
            geoip = self._service_extra["fraud_svc"].get(DEV_GEOIP_VARIABLE)
            if geoip and not environ.get(VOTE_GEOIP_VARIABLE):
                self._service_extra["vote_svc"] = {VOTE_GEOIP_VARIABLE: geoip}

            if self.settings.mtls:
                for holder in (*SERVICES, pki.OPERATOR, pki.EDGE):
                    pki.issue(state_dir, holder, self.tls_dir(holder))
            edge_host = self.settings.host(EDGE)
            # The edge's port first: Kannel calls it, and sms_svc gives Kannel URLs on it.
            self.edge_port = self.settings.edge_port or await asyncio.to_thread(
                edge_host.call, lambda: free_port(edge_host.address))
            self.admin_port = self.settings.admin_port or await asyncio.to_thread(
                edge_host.call, free_port)
            if self.settings.kannel:
                if edge_host.netns is not None:
                    raise ValueError("Kannel runs beside an edge on this machine only")
                # Kannel runs beside the edge: it calls it on loopback whatever its address.
                self.kannel = Kannel(state_dir, f"http://127.0.0.1:{self.edge_port}")
                self._service_extra["sms_svc"] = self.kannel.sms_env()
            services_host = self.settings.host(SERVICES_HOST)
            for service in SERVICES:
                count = self.settings.replicas.get(service, 1)
                self.addresses[service] = [
                    (services_host.address, await asyncio.to_thread(
                        services_host.call, lambda: free_port(services_host.address)))
                    for _ in range(count)]
            for service in SERVICES:
                for replica in range(len(self.addresses[service])):
                    self._services.append(await self._spawn_replica(service, replica))
            await asyncio.gather(*(
                self._wait_serving(service, child, address)
                for (service, child, address) in zip(
                    [service for service in SERVICES for _ in self.addresses[service]],
                    self._services, self._all_addresses(), strict=True)))

            # The edge's own files, where it runs: its config, the token keys it verifies
            # with (public only) and its mesh certificate.
            edge_dir = edge_host.files(state_dir)
            if edge_dir != state_dir:
                edge_dir = private_dir(edge_dir / "edge")
            config_path = edge_dir / "envoy.yaml"
            config_path.write_text(edge.render(edge.EdgeSettings(
                jwks_path=install(jwks, edge_dir / jwks.relative_to(state_dir)),
                jwt_issuer=tokens.ISSUER, jwt_audience=tokens.AUDIENCE,
                host=edge_host.address, port=self.edge_port, admin_port=self.admin_port,
                trusted_proxy_hops=self.settings.trusted_proxy_hops, upstreams=self.addresses,
                upstream_tls=pki.Identity(install(
                    self.tls_dir(pki.EDGE), edge_dir / "pki" / pki.EDGE))
                if self.settings.mtls else None,
                **self.settings.edge)))
            self._edge = await Child.spawn("envoy", [
                str(Path(sys.executable).parent / "envoy"), "-c", str(config_path),
                "--use-dynamic-base-id", "--log-level", "warn",
                "--concurrency", str(self.settings.edge_workers)], logs, host=edge_host)
            await self._wait_edge_ready()
            if self.kannel is not None:
                await self.kannel.start()
            write_addresses(state_dir, {
                "edge": self.edge_target, "envoy-admin": f"127.0.0.1:{self.admin_port}",
                "database": self.database_url, "redis": self.redis_url,
                **({"kannel-smsc": self.kannel.smsc_ports} if self.kannel else {}),
                **{service: [f"{host}:{port}" for host, port in self.addresses[service]]
                   for service in SERVICES}})
        except BaseException:
            await self.stop()
            raise

    async def _spawn_replica(self, service: str, replica: int) -> Child:
        state_dir = self.settings.state_dir.resolve()
        address, port = self.addresses[service][replica]
        services_host = self.settings.host(SERVICES_HOST)
        own = service_dir(services_host.files(state_dir), service)
        env = {**self._service_environment(state_dir), **self._service_extra.get(service, {}),
               **self._service_secrets(state_dir, service),
               **{variable: str(install(source, own / source.name))
                  for variable, source in self._service_files(state_dir, service).items()},
               "TELEVOTE_STATE_DIR": str(own),
               "TELEVOTE_HOST": address, "TELEVOTE_PORT": str(port),
               "TELEVOTE_REPLICA": str(replica)}
        return await Child.spawn(f"{service}-{replica}", [sys.executable, "-m", service],
                                 state_dir / "logs", env=env, host=services_host)

    @property
    def processes(self) -> list[Child]:
        """Every process this stack started: stores, services, the edge."""
        return [*self._infra, *self._services, *([self._edge] if self._edge else [])]

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
        await self._wait_serving(service, child, self.addresses[service][replica])

    async def _wait_serving(self, service: str, child: Child, address: tuple[str, int]) -> None:
        host, port = address
        await wait_serving(f"{host}:{port}", child,
                           channel=self.channel(service, replica_address=address))

    def channel(self, service: str, *, as_holder: str = pki.OPERATOR,
                replica_address: tuple[str, int] | None = None) -> grpc.aio.Channel:
        """A channel straight to `service`'s replicas (or one of them), past the edge,
        presenting `as_holder`'s certificate: the operator's (health and reflection only),
        the edge's (then the claims header is believed) or a service's (the calls that
        service makes); plaintext when the mesh runs without mutual TLS."""
        target = (f"{replica_address[0]}:{replica_address[1]}" if replica_address
                  else self.target(service))
        if not self.settings.mtls:
            return mesh.channel(target, service, None)
        return mesh.channel(target, service, MeshTls.load(self.tls_dir(as_holder)))

    def tls_dir(self, holder: str) -> Path:
        """Where `holder`'s mesh certificate is: a service's, the edge's or the operator's."""
        state_dir = self.settings.state_dir.resolve()
        if holder in SERVICES:
            return service_dir(state_dir, holder) / "tls"
        return state_dir / "pki" / holder

    def _provision_roles(self, state_dir: Path) -> None:
        """Each service connects as itself: its own PostgreSQL login in its group role (only
        its grants) and its own Redis user, never as the owner the stack was given."""
        dirs = {service: service_dir(state_dir, service) for service in SERVICES}
        databases = roles.provision_postgres(self.database_url, state_dir, SERVICES, dirs)
        try:
            caches = roles.provision_redis(self.redis_url, state_dir, SERVICES, dirs)
        except redis.exceptions.NoPermissionError:
            # A Redis we were handed without ACL rights: the services share its user.
            log.warning("cannot create Redis users with %s; services use it too",
                        self.redis_url)
            caches = dict.fromkeys(SERVICES, self.redis_url)
        self.service_urls = {service: {"DATABASE_URL": databases[service],
                                       "REDIS_URL": caches[service]} for service in SERVICES}

    def _service_files(self, state_dir: Path, service: str) -> dict[str, Path]:
        """The files `service` reads, by the variable that names them: the stack's copies,
        each installed into the service's own directory where it runs (its mesh certificate,
        results_svc's ledger signing key, fraud_svc's and vote_svc's development GeoIP
        database)."""
        own = service_dir(state_dir, service)
        files = {}
        if self.settings.mtls:
            files["TELEVOTE_TLS_DIR"] = own / "tls"
        if service == "results_svc":
            key = _adopt(state_dir / LEDGER_KEY_FILE, own / LEDGER_KEY_FILE)
            # Made here, once: replicas on several hosts must all sign with the same key.
            Signer.load(key, create=True)
            files["RESULTS_SIGNING_KEY_FILE"] = key
        for variable in (DEV_GEOIP_VARIABLE, VOTE_GEOIP_VARIABLE):
            geoip = self._service_extra.get(service, {}).get(variable)
            if geoip:
                files[variable] = Path(geoip)
        return files

    def _service_secrets(self, state_dir: Path, service: str) -> dict[str, str]:
        """What only `service` is given: its own database and Redis logins and the secrets
        it alone uses. No service is told where the token signing key is."""
        own = service_dir(state_dir, service)
        env = dict(self.service_urls.get(service, {}))
        if service == "vote_svc":
            env["VOTE_PSEUDONYM_SALT"] = read_or_create_secret(
                _adopt(state_dir / "pseudonym-salt", own / "pseudonym-salt"))
            env["VOTE_IP_HASH_KEY"] = read_or_create_secret(
                _adopt(state_dir / "ip-hash-key", own / "ip-hash-key"))
        if service == "sms_svc":
            env["SMS_MSISDN_SECRET"] = read_or_create_secret(
                _adopt(state_dir / "msisdn-secret", own / "msisdn-secret"))
        return env

    def _service_environment(self, state_dir: Path) -> dict[str, str]:
        env = {"DATABASE_URL": self.database_url, "REDIS_URL": self.redis_url,
               "PYTHONUNBUFFERED": "1"}
        env.update({variable: self.target(service)
                    for service, variable in TARGET_VARIABLES.items()})
        env.update(self.settings.service_env)
        return env

    def _all_addresses(self) -> list[tuple[str, int]]:
        return [address for service in SERVICES for address in self.addresses[service]]

    async def _own_postgres(self, state_dir: Path) -> str:
        stores = self.settings.host(STORES)
        child, url = await start_postgres(stores.files(state_dir), stores, state_dir / "logs")
        self._infra.append(child)
        return url

    async def _own_redis(self, state_dir: Path) -> str:
        stores = self.settings.host(STORES)
        if self.settings.redis_cluster:
            self.redis_nodes = OwnRedisCluster(stores.files(state_dir), self.settings.redis_cluster,
                                               host=stores, log_dir=state_dir / "logs")
            await self.redis_nodes.start()
            return cluster_url(self.redis_nodes.url)
        child, url = await start_redis(stores.files(state_dir), stores, state_dir / "logs")
        self._infra.append(child)
        return url

    async def _wait_edge_ready(self, timeout: float = 60.0) -> None:
        """Ready when Envoy is live and has seen every upstream replica pass a health check."""
        assert self._edge is not None
        expected = sum(len(addresses) for addresses in self.addresses.values())
        # Votes reach vote_svc's replicas through a cluster of their own too (ops/edge.py).
        expected += len(self.addresses.get("vote_svc", []))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._edge.running:
                raise RuntimeError(f"envoy exited at start:\n{self._edge.log_tail()}")
            # The admin listens on the edge host's loopback only: asked from inside it.
            clusters = await asyncio.to_thread(
                self.settings.host(EDGE).call, lambda: self._admin_get("/clusters"))
            healthy = clusters.count("::health_flags::healthy") if clusters else 0
            if healthy >= expected:
                return
            await asyncio.sleep(0.1)
        # Which replicas never passed, so the failure names its cause (a busy machine or a
        # service that did not start).
        unhealthy = sorted({" ".join(line.split("::")[:2])
                            for line in (clusters or "").splitlines()
                            if "::health_flags::" in line
                            and "::health_flags::healthy" not in line})
        raise RuntimeError(f"edge upstreams not healthy after {timeout:.0f}s: "
                           f"{', '.join(unhealthy) or 'none listed'}\n{self._edge.log_tail()}")

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
        if self.redis_nodes is not None:
            await self.redis_nodes.stop()
        for child in reversed(self._infra):
            await child.stop()

    def describe(self) -> str:
        """What is where, for the operator who just ran `televote up`."""
        lines = [f"edge (gRPC, gRPC-Web, JSON/SSE)  {self.edge_url}",
                 f"envoy admin (loopback only)      http://127.0.0.1:{self.admin_port}",
                 f"PostgreSQL                       {self.database_url}",
                 f"Redis                            {self.redis_url}"]
        if self.redis_nodes is not None:
            nodes = ", ".join(node.address for node in self.redis_nodes.nodes)
            lines.append(f"Redis Cluster nodes              {nodes}")
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


#: fraud_svc's GeoIP database.
DEV_GEOIP_VARIABLE = "FRAUD_GEOIP_DB"
#: vote_svc's GeoIP database (the IP's place kept in the ledger): the same file in a local mesh.
VOTE_GEOIP_VARIABLE = "VOTE_GEOIP_DB"


def dev_geoip_environment(state_dir: Path, environ: Mapping[str, str]) -> dict[str, str]:
    """fraud_svc's GeoIP database for a local mesh: FRAUD_GEOIP_DB when it is configured
    (production, or a real GeoLite2 file), else a development database of the synthetic
    network plan (fraud_svc/devgeo.py), written into the state directory on first start, so
    country, location and VPN/hosting signals are scored for real. Without the dev extra
    (mmdb-writer) there is none and those signals say unknown, as fraud_svc logs."""
    if environ.get(DEV_GEOIP_VARIABLE):
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
    return {DEV_GEOIP_VARIABLE: str(path)}


def service_dir(state_dir: Path, service: str) -> Path:
    """The private directory of one service in the state directory."""
    return private_dir(state_dir / "services" / service)


def _adopt(legacy: Path, path: Path) -> Path:
    """`path`, moved there from where a state directory made before issue 21 kept it."""
    if legacy.exists() and not path.exists():
        legacy.replace(path)
    return path
