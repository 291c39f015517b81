"""`televote address`: where the stack running from a state directory listens, and a clear
refusal when none runs there (no file, or one a killed stack left behind)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from ops.addresses import ADDRESSES_FILE
from ops.cli import app


def _write(state_dir: Path, pid: int) -> None:
    state_dir.mkdir(exist_ok=True)
    (state_dir / ADDRESSES_FILE).write_text(json.dumps({
        "pid": pid, "edge": "127.0.0.1:8080", "database": "postgresql://db",
        "vote_svc": ["127.0.0.1:5001", "127.0.0.1:5002"]}))


def _address(state_dir: Path, *arguments: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["address", *arguments, "--state-dir", str(state_dir)])
    return result.exit_code, result.output.strip()


def test_address_prints_a_part_and_a_replica_of_the_running_stack(tmp_path: Path) -> None:
    _write(tmp_path, os.getpid())
    assert _address(tmp_path, "edge") == (0, "127.0.0.1:8080")
    assert _address(tmp_path, "database") == (0, "postgresql://db")
    assert _address(tmp_path, "vote_svc") == (0, "127.0.0.1:5001")
    assert _address(tmp_path, "vote_svc", "--replica", "1") == (0, "127.0.0.1:5002")
    assert _address(tmp_path, "vote_svc", "--replica", "2")[0] == 2
    assert _address(tmp_path, "nosuch_svc")[0] == 2


def test_address_refuses_when_no_stack_runs_there(tmp_path: Path) -> None:
    assert _address(tmp_path, "edge")[0] == 1
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    _write(tmp_path, exited.pid)  # a stack killed before it could remove its file
    code, output = _address(tmp_path, "edge")
    assert code == 1 and "no stack is running" in output
