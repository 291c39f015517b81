"""`televote up` in a fresh state directory: comes up, answers, and stops leaving nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

from ops import tokens
from ops.processes import free_port
from runtime.access import Role

TELEVOTE = str(Path(sys.executable).parent / "televote")


def _descendants_of_state_dir(state_dir: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline", "environ"]):
        try:
            cmdline = " ".join(process.info["cmdline"] or [])
            environ = process.info["environ"] or {}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        own_dir = environ.get("TELEVOTE_STATE_DIR", "")  # a service's is inside the stack's
        if str(state_dir) in cmdline or own_dir.startswith(str(state_dir)):
            found.append(process)
    return found


def test_televote_up_comes_up_answers_and_leaves_no_process_behind(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    port = free_port()
    env = {**os.environ, "TELEVOTE_STATE_DIR": str(state_dir)}
    env.pop("DATABASE_URL", None)
    env.pop("REDIS_URL", None)
    started = time.monotonic()
    up = subprocess.Popen([TELEVOTE, "up", "--port", str(port)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert up.stdout is not None
        output = []
        for line in up.stdout:
            output.append(line)
            if "televote is up" in line:
                break
        else:
            raise AssertionError("televote up exited:\n" + "".join(output))
        print(f"televote up ready in {time.monotonic() - started:.1f}s")

        token = tokens.mint(state_dir, Role.VOTER, "user-1")
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/vote-packages",
                                         headers={"authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert len(json.loads(response.read())["packages"]) == 4
        children = _descendants_of_state_dir(state_dir)
        assert children, "expected running children"

        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 0
        _, alive = psutil.wait_procs(children, timeout=5)
        assert alive == []
        assert _descendants_of_state_dir(state_dir) == []
    finally:
        if up.poll() is None:
            up.kill()
        for process in _descendants_of_state_dir(state_dir):
            process.kill()


_HOLDER = """
import asyncio, sys
from pathlib import Path
from ops.processes import Child, run_stopping_on_sigterm

async def main() -> None:
    here = Path(sys.argv[1])
    child = await Child.spawn("sleeper", [sys.executable, "-c", "import time; time.sleep(120)"],
                              here)
    (here / "pid").write_text(str(child.process.pid))
    try:
        await asyncio.sleep(120)
    finally:
        await child.stop(timeout=5)

run_stopping_on_sigterm(main())
"""


def test_a_bench_ended_by_sigterm_stops_the_processes_it_started(tmp_path: Path) -> None:
    """Children run in sessions of their own (a Ctrl-C reaches only their supervisor), so a
    bench or load test killed with SIGTERM used to leave its whole stack running."""
    script = tmp_path / "holder.py"
    script.write_text(_HOLDER)
    holder = subprocess.Popen([sys.executable, str(script), str(tmp_path)],
                              cwd=Path(__file__).resolve().parents[2])
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "pid").exists():
            assert time.monotonic() < deadline and holder.poll() is None
            time.sleep(0.05)
        child = psutil.Process(int((tmp_path / "pid").read_text()))
        holder.send_signal(signal.SIGTERM)
        holder.wait(timeout=15)
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    finally:
        holder.kill()
