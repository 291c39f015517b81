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
    ...) nor what Redis itself calls dangerous (FLUSHALL, KEYS, DEBUG, ...)."""
    urls = {}
    client = redis.Redis.from_url(owner_url)
    try:
        for service in services:
            user = login_name(service, state_dir)
            password = read_or_create_secret(secrets_dir[service] / "redis-password")
            client.acl_setuser(user, reset=True, enabled=True, passwords=[f"+{password}"],
                               keys=["*"], channels=["*"],
                               categories=["+@all", "-@admin", "-@dangerous"])
            urls[service] = with_credentials(owner_url, user, password)
    finally:
        client.close()
    return urls
