"""Schema migrations: plain SQL files in migrations/, applied in order by yoyo-migrations.

yoyo records what it applied in its own tables and takes a lock, so several processes (two
`televote up`, a deploy and a test run) can call `migrate` at once safely.
"""

from __future__ import annotations

from pathlib import Path

from yoyo import get_backend, read_migrations

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def migrate(database_url: str) -> list[str]:
    """Apply every pending migration; returns the ids applied."""
    backend = get_backend(_yoyo_url(database_url))
    migrations = read_migrations(str(MIGRATIONS_DIR))
    with backend.lock():
        pending = backend.to_apply(migrations)
        backend.apply_migrations(pending)
    return [migration.id for migration in pending]


def _yoyo_url(database_url: str) -> str:
    # yoyo picks its driver by URL scheme; psycopg 3 is the one this project uses.
    scheme, _, rest = database_url.partition("://")
    if scheme in ("postgres", "postgresql"):
        return f"postgresql+psycopg://{rest}"
    return database_url
