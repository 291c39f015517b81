"""Each service's own PostgreSQL login and Redis user, made by the stack after migrations.

What a service may do in PostgreSQL is its group role's grants (migrations/0017); here each
service gets a login role in that group, with a SCRAM password kept in the service's private
directory, and a Redis ACL user with its own password that cannot run administrative or
dangerous commands (CONFIG, FLUSHALL, KEYS, DEBUG, ACL, ...). The owner's URLs (what the
stack was given or started) stay with the stack: migrations, tests and operators.

Login and Redis user names carry a digest of the state directory: several stacks may share one
server (tests pointed at the machine's PostgreSQL and Redis), and each keeps its own passwords.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
import redis
from psycopg import sql

from runtime.secrets import read_or_create_secret
from runtime.storage import redis_target

log = logging.getLogger(__name__)


def group_role(service: str) -> str:
    """The NOLOGIN role holding `service`'s grants (migrations/0017_service_roles.sql)."""
    return f"televote_{service}"


def login_name(service: str, state_dir: Path) -> str:
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:8]
    return f"tv_{service}_{digest}"


def with_credentials(url: str, user: str, password: str) -> str:
    """`url` with its user and password replaced."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def provision_postgres(owner_url: str, state_dir: Path, services: Iterable[str],
                       secrets_dir: dict[str, Path]) -> dict[str, str]:
    """Create or update each service's login role; returns each service's database URL."""
    urls = {}
    with psycopg.connect(owner_url, autocommit=True) as connection:
        # SCRAM even where the server's default is still md5.
        connection.execute("SET password_encryption = 'scram-sha-256'")
        for service in services:
            login = login_name(service, state_dir)
            password = read_or_create_secret(secrets_dir[service] / "database-password")
            exists = connection.execute(
                "SELECT 1 FROM pg_roles WHERE rolname = %s", (login,)).fetchone()
            statement = "ALTER ROLE {} " if exists else "CREATE ROLE {} "
            connection.execute(sql.SQL(
                statement + "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION "
                "NOBYPASSRLS INHERIT PASSWORD {}").format(
                    sql.Identifier(login), sql.Literal(password)))
            connection.execute(sql.SQL("GRANT {} TO {}").format(
                sql.Identifier(group_role(service)), sql.Identifier(login)))
            urls[service] = with_credentials(owner_url, login, password)
    return urls


def require_scram(owner_url: str, data_dir: Path, password: str) -> str:
    """Make PostgreSQL (our own, started with trust) ask every client for a SCRAM password,
    the owner included; returns the owner's URL with its password."""
    with psycopg.connect(owner_url, autocommit=True) as connection:
        connection.execute("SET password_encryption = 'scram-sha-256'")
        user = connection.info.user
        connection.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(
            sql.Identifier(user), sql.Literal(password)))
        hba = data_dir / "pg_hba.conf"
        text = hba.read_text()
        scram = re.sub(r"\btrust\s*$", "scram-sha-256", text, flags=re.MULTILINE)
        if scram != text:
            hba.write_text(scram)
            connection.execute("SELECT pg_reload_conf()")
    return with_credentials(owner_url, user, password)


def provision_redis(owner_url: str, state_dir: Path, services: Iterable[str],
                    secrets_dir: dict[str, Path]) -> dict[str, str]:
    """Create or update each service's Redis ACL user; returns each service's Redis URL.

    A service's user may not run server administration (CONFIG, ACL, SHUTDOWN, REPLICAOF,
    ...) nor what Redis itself calls dangerous (FLUSHALL, KEYS, DEBUG, ...); it may read the
    cluster's layout (CLUSTER SLOTS, NODES, INFO: the admin category has them in Redis 6),
    which a cluster client needs to route. A Redis Cluster does not replicate ACL users:
    on a cluster (a URL with `?cluster=yes`) each user is made on every node, masters and
    replicas, so it still works after a failover."""
    urls = {}
    plain_url, cluster = redis_target(owner_url)
    clients = [redis.Redis.from_url(url) for url in _node_urls(plain_url, cluster)]
    try:
        for service in services:
            user = login_name(service, state_dir)
            password = read_or_create_secret(secrets_dir[service] / "redis-password")
            for client in clients:
                client.acl_setuser(user, reset=True, enabled=True, passwords=[f"+{password}"],
                                   keys=["*"], channels=["*"],
                                   categories=["+@all", "-@admin", "-@dangerous"],
                                   commands=[f"+cluster|{sub}" for sub in CLUSTER_LAYOUT])
            urls[service] = with_credentials(owner_url, user, password)
        if cluster:
            for client in clients:
                _save_users(client)
    finally:
        for client in clients:
            client.close()
    return urls


def _save_users(client: redis.Redis) -> None:
    """Write a cluster node's users to its ACL file, so it knows them after a restart; a
    node without one (a cluster we were handed) keeps them until it restarts."""
    try:
        client.acl_save()
    except redis.ResponseError as error:
        log.warning("Redis users not saved on %s: %s",
                    client.connection_pool.connection_kwargs.get("port"), error)


#: The CLUSTER subcommands a cluster client reads the layout with.
CLUSTER_LAYOUT = ("slots", "nodes", "info")


def _node_urls(url: str, cluster: bool) -> list[str]:
    """`url`, and on a cluster the URL of every other node it knows (same credentials)."""
    if not cluster:
        return [url]
    with redis.Redis.from_url(url) as seed:
        reply = seed.execute_command("CLUSTER NODES")
    text = reply.decode() if isinstance(reply, bytes) else str(reply)
    if isinstance(reply, dict):  # redis-py may parse it: {"host:port": {...}}
        addresses = list(reply)
    else:
        addresses = [line.split()[1].split("@")[0] for line in text.splitlines() if line]
    parts = urlsplit(url)
    return [urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[0] + "@" + address))
            for address in addresses]
