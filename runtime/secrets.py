"""Secret files of a local mesh: created owner-only from their first byte, in directories no
other user can enter.

A key written with default permissions and chmod-ed afterwards is readable by anyone for the
moment between the two; these helpers create the file with its final mode (O_EXCL, so two
processes racing to create it cannot both write) and publish it under its final name only once
it is complete.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def private_dir(path: Path, mode: int = 0o700) -> Path:
    """`path` as a directory only its owner may list or enter (created if missing)."""
    path.mkdir(parents=True, exist_ok=True, mode=mode)
    path.chmod(mode)
    return path


def write_private(path: Path, content: bytes) -> bool:
    """Create `path` (mode 0600) holding `content` unless it exists; whether this call made it.

    The bytes go to a private temporary file first and are hard-linked into place: a reader
    never sees a half-written key, and when two processes race exactly one key wins.
    """
    private_dir(path.parent)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(content)
        try:
            os.link(temporary, path)
        except FileExistsError:
            return False
        return True
    finally:
        temporary.unlink()


def read_or_create_secret(path: Path) -> str:
    """A random hex secret kept in `path`, made on first use."""
    if not path.exists():
        write_private(path, secrets.token_hex(32).encode())
    return path.read_text().strip()
