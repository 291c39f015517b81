"""Where the parts of a running stack listen: `televote up` picks free ports at each start and
writes them here, in its state directory, for the commands an operator runs in another
terminal (`televote address`, `loadtest --edge`, `audit export`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

#: `{"pid": ..., "edge": "host:port", "envoy-admin": "host:port", "database": URL,
#: "redis": URL, "vote_svc": ["host:port", ...], ...}`, present while the stack runs.
ADDRESSES_FILE = "addresses.json"


def write_addresses(state_dir: Path, addresses: dict[str, object]) -> None:
    """Publish the addresses of the stack this process runs, all at once."""
    partial = state_dir / f"{ADDRESSES_FILE}.partial"
    partial.write_text(json.dumps({"pid": os.getpid(), **addresses}, indent=2) + "\n")
    partial.replace(state_dir / ADDRESSES_FILE)


def remove_addresses(state_dir: Path) -> None:
    """Withdraw them, if this process published them."""
    if read_addresses(state_dir).get("pid") == os.getpid():
        (state_dir / ADDRESSES_FILE).unlink()


def read_addresses(state_dir: Path) -> dict[str, object]:
    """The addresses of the stack running from `state_dir`; empty when none runs there (no
    file, or one left by a stack that was killed before it could remove it)."""
    try:
        addresses = json.loads((state_dir / ADDRESSES_FILE).read_text())
        os.kill(int(addresses["pid"]), 0)
    except PermissionError:  # alive, under another user
        pass
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return dict(addresses)
