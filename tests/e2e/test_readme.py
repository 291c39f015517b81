"""README.md's commands, run as a new user would run them: a README that drifts from the code
fails here.

How README.md's shell blocks are run (the README's "Developing" section says the same, short):

- Every fenced block tagged ```sh, ```bash or ```shell is a command to run; any other fence
  (```text, ```json, no tag) is only shown. Blocks run top to bottom in ONE bash process with
  `set -euo pipefail`, from the repository root, so a variable set in one block is there in the
  next. A failing command fails the test, naming the block's line in README.md.
- The environment is what the README documents and nothing more: the venv is not on PATH (a
  block activates it), and TELEVOTE_STATE_DIR is a fresh temporary directory and
  TELEVOTE_EDGE_PORT=0 (the edge takes a free port). So a block never hard-codes a port,
  `:8080` or `.televote`: it asks the running stack, e.g. `EDGE=$(televote address edge)`.
- HTML comments right above a block (blank lines between are fine) say how it is checked.
  Every block that runs needs an `expect`, a `quiet` or a `background`:
    <!-- readme-test: expect "TEXT" -->   TEXT is in what the block printed (stdout and
                                           stderr); repeat for several texts.
    <!-- readme-test: quiet -->            the block prints nothing at all.
    <!-- readme-test: background "TEXT" --> a command that runs until Ctrl-C (the stack, a
                                           stream): started in the background, awaited until
                                           it prints TEXT, left running while the later blocks
                                           run, then stopped with Ctrl-C (SIGINT to its process
                                           group), the last started first. It must then exit
                                           0 or by that SIGINT; its `expect`s are checked
                                           against everything it printed.
    <!-- readme-test: skip REASON -->       not run. Say why (minutes of load, needs wrk, runs
                                           this very suite) and what tests it instead.
- No block may print a Python warning (`...Warning: ...`): the README's commands are quiet.
- Commands meant to be run go in a block; `inline code` in prose is not run, so keep it to
  names, and to commands a block nearby shows in full.

tests/unit/test_readme_annotations.py checks the annotations without a stack, in seconds. The
whole run here is bounded (BUDGET_S) and leaves no process behind.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SHELLS = ("sh", "bash", "shell")
#: The whole README, from `./scripts/up` to its Ctrl-C; far above a normal run's length.
BUDGET_S = 100.0
#: How long a background block may take to print what it is awaited for.
BACKGROUND_READY_S = 60.0

_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
_ANNOTATION = re.compile(r"^\s*<!--\s*readme-test:\s*(.*?)\s*-->\s*$")
_WARNING = re.compile(r"\b\w*Warning: ")


@dataclass
class Block:
    """One fenced shell block of the README and how it is checked."""

    line: int  # of the opening fence, 1-based
    code: str
    expects: list[str] = field(default_factory=list)
    quiet: bool = False
    background: str | None = None
    skip: str | None = None

    def describe(self) -> str:
        return f"README.md:{self.line}:\n{self.code}"


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1]
    return text


def parse_readme(text: str) -> list[Block]:
    """The README's shell blocks with their annotations; a malformed annotation is an error."""
    blocks: list[Block] = []
    pending: list[tuple[int, str]] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        annotation = _ANNOTATION.match(line)
        fence = _FENCE.match(line)
        if annotation:
            pending.append((index + 1, annotation.group(1)))
        elif fence:
            indent, marker, language = fence.groups()
            body: list[str] = []
            index += 1
            while index < len(lines) and not lines[index].strip().startswith(marker):
                body.append(lines[index].removeprefix(indent))
                index += 1
            if language in SHELLS:
                blocks.append(_annotated(Block(line=index - len(body), code="\n".join(body)),
                                         pending))
            elif pending:
                raise AssertionError(f"README.md:{pending[0][0]}: readme-test annotation above "
                                     f"a ```{language} block, which is not run")
            pending = []
        elif line.strip() and pending:
            raise AssertionError(f"README.md:{pending[0][0]}: readme-test annotation not "
                                 "directly above a shell block")
        index += 1
    if pending:
        raise AssertionError(f"README.md:{pending[0][0]}: readme-test annotation after the "
                             "last block")
    return blocks


def _annotated(block: Block, annotations: list[tuple[int, str]]) -> Block:
    for line, annotation in annotations:
        directive, _, argument = annotation.partition(" ")
        argument = _unquote(argument.strip())
        if directive == "expect" and argument:
            block.expects.append(argument)
        elif directive == "quiet" and not argument:
            block.quiet = True
        elif directive == "background" and argument:
            block.background = argument
        elif directive == "skip" and argument:
            block.skip = argument
        else:
            raise AssertionError(f"README.md:{line}: unknown readme-test annotation "
                                 f"{annotation!r}; see tests/e2e/test_readme.py")
    if block.skip is None and not (block.expects or block.quiet or block.background):
        raise AssertionError(f"{block.describe()}\nhas no readme-test annotation: add "
                             '<!-- readme-test: expect "TEXT" --> (a key piece of its output), '
                             "quiet, background or skip (see tests/e2e/test_readme.py)")
    if block.quiet and (block.expects or block.background):
        raise AssertionError(f"{block.describe()}\nis quiet and yet expects output")
    return block


def script(blocks: list[Block], mark: str, pids: Path, logs: Path) -> str:
    """One bash script running every block in order between marker lines; background blocks
    log to files and are stopped with SIGINT when the script exits, however it exits."""
    parts = [
        "set -euo pipefail",
        "__readme_pids=()",
        "__readme_stop() {",
        "  local status=$? i pid",
        "  set +e",
        "  for ((i=${#__readme_pids[@]}-1; i>=0; i--)); do",
        "    pid=${__readme_pids[i]}",
        "    kill -INT -- -$pid 2>/dev/null",
        "    wait $pid",
        f"    printf '\\n{mark} stopped %s %s\\n' $pid $?",
        "  done",
        "  exit $status",
        "}",
        "trap __readme_stop EXIT",
    ]
    for number, block in enumerate(blocks):
        if block.skip is not None:
            continue
        if block.background is None:
            parts += [f"printf '\\n{mark} start {number} %s\\n' $EPOCHREALTIME", block.code,
                      f"printf '\\n{mark} end {number} %s\\n' $EPOCHREALTIME"]
            continue
        log = logs / f"block-{number}.log"
        parts += [
            f"printf '\\n{mark} start {number} %s\\n' $EPOCHREALTIME",
            # Job control only while it starts: a process group of its own, as in a
            # terminal, so SIGINT reaches it as Ctrl-C would (and not the rest of the run).
            "set -m",
            f"( {block.code}\n) >{shlex.quote(str(log))} 2>&1 &",
            "set +m",
            "__readme_pids+=($!)",
            f"echo $! >>{shlex.quote(str(pids))}",
            f"echo \"{mark} background {number} $!\"",
            # Awaits the text it prints when ready; gives up if it exits first or too late.
            f"__readme_deadline=$((SECONDS + {int(BACKGROUND_READY_S)}))",
            f"until grep -qF -- {shlex.quote(block.background)} {shlex.quote(str(log))}; do",
            "  if ! kill -0 $! 2>/dev/null || ((SECONDS > __readme_deadline)); then",
            f"    echo {shlex.quote(f'never printed {block.background}:')}; "
            f"cat {shlex.quote(str(log))}; exit 1",
            "  fi",
            "  sleep 0.2",
            "done",
            # TEXT in a traceback's source lines is no sign of life.
            "if ! kill -0 $! 2>/dev/null; then",
            f"  echo {shlex.quote(f'exited after it printed {block.background}')}; exit 1",
            "fi",
            f"printf '\\n{mark} end {number} %s\\n' $EPOCHREALTIME",
        ]
    return "\n".join(parts) + "\n"


@dataclass
class Run:
    """What the script printed, cut into the blocks that printed it."""

    status: int
    output: str
    printed: dict[int, str]
    started: list[int]
    ended: set[int]
    background_status: dict[int, int]
    #: Seconds each block took (a background block: until it printed what it was awaited for).
    seconds: dict[int, float]


def _split(output: str, mark: str, status: int, logs: Path) -> Run:
    printed: dict[int, str] = {}
    started: list[int] = []
    ended: set[int] = set()
    background_pid: dict[int, int] = {}
    stopped_pid: dict[int, int] = {}
    began: dict[int, float] = {}
    seconds: dict[int, float] = {}
    current: int | None = None
    for line in output.splitlines(keepends=True):
        if line.startswith(mark):
            word, *args = line.split()[1:]
            if word == "start":
                current = int(args[0])
                started.append(current)
                printed[current] = ""
                began[current] = float(args[1])
            elif word == "end":
                ended.add(int(args[0]))
                seconds[int(args[0])] = float(args[1]) - began[int(args[0])]
                current = None
            elif word == "background":
                background_pid[int(args[0])] = int(args[1])
            elif word == "stopped":
                stopped_pid[int(args[0])] = int(args[1])
            continue
        if current is not None:
            printed[current] += line
    for number in background_pid:
        log = logs / f"block-{number}.log"
        printed[number] = log.read_text(errors="replace") if log.exists() else ""
    return Run(status, output, printed, started, ended,
               {number: stopped_pid[pid] for number, pid in background_pid.items()
                if pid in stopped_pid}, seconds)


def _documented_environment(state_dir: Path) -> dict[str, str]:
    """A new user's shell: no venv on PATH, no stack of ours named, the README's variables."""
    venv_bin = str(ROOT / ".venv" / "bin")
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("TELEVOTE_", "PYTEST_", "VIRTUAL_ENV"))
           and key not in ("DATABASE_URL", "REDIS_URL", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(part for part in env.get("PATH", "").split(os.pathsep)
                                  if part != venv_bin)
    env["TELEVOTE_STATE_DIR"] = str(state_dir)
    env["TELEVOTE_EDGE_PORT"] = "0"
    return env


def _processes_of(state_dir: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline", "environ"]):
        try:
            cmdline = " ".join(process.info["cmdline"] or [])
            environ = process.info["environ"] or {}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if str(state_dir) in cmdline or environ.get("TELEVOTE_STATE_DIR", "").startswith(
                str(state_dir)):  # a service's own directory is inside the stack's
            found.append(process)
    return found


def _interrupt_groups(pids: Path) -> None:
    """The run was cut short: Ctrl-C every background block, then kill what is left."""
    groups = [int(pid) for pid in pids.read_text().split()] if pids.exists() else []
    for pid in reversed(groups):
        try:
            os.killpg(pid, signal.SIGINT)
        except ProcessLookupError:
            continue
        try:
            psutil.Process(pid).wait(timeout=30)
        except (psutil.NoSuchProcess, psutil.TimeoutExpired):
            pass
    for pid in groups:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_readme(blocks: list[Block], work: Path, state_dir: Path) -> Run:
    logs = work / "logs"
    logs.mkdir(parents=True)
    pids = work / "background.pids"
    mark = f"@@readme-test-{secrets.token_hex(8)}"
    (work / "readme.sh").write_text(script(blocks, mark, pids, logs))
    bash = subprocess.Popen(["bash", str(work / "readme.sh")], cwd=ROOT,
                            env=_documented_environment(state_dir), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = bash.communicate(timeout=BUDGET_S)
    except subprocess.TimeoutExpired:
        os.killpg(bash.pid, signal.SIGKILL)
        _interrupt_groups(pids)
        output, _ = bash.communicate()
        pytest.fail(f"README.md's blocks took over {BUDGET_S:.0f}s; output:\n{output[-6000:]}")
    finally:
        if bash.poll() is None:
            os.killpg(bash.pid, signal.SIGKILL)
        # A group killed a moment ago may still be on its way out: give it a few seconds.
        _, leftovers = psutil.wait_procs(_processes_of(state_dir), timeout=5)
        for process in leftovers:
            process.kill()
    assert not leftovers, f"README.md's run left processes behind: {leftovers}"
    return _split(output, mark, bash.returncode, logs)


def test_every_readme_command_works_as_written(tmp_path: Path) -> None:
    blocks = parse_readme(README.read_text())
    assert any(b.background for b in blocks), "README.md no longer starts the stack"
    started = time.monotonic()
    # The state directory is not under tmp_path: as root, PostgreSQL runs as an unprivileged
    # user who must traverse to it, and every pytest session that starts on this machine
    # resets pytest's base temp directory to mode 0700 (ops/infra.py opens the path once).
    with tempfile.TemporaryDirectory(prefix="televote-readme-") as state_dir:
        run = run_readme(blocks, tmp_path, Path(state_dir))
    print(f"README.md: {sum(b.skip is None for b in blocks)} blocks run, "
          f"{sum(b.skip is not None for b in blocks)} skipped, "
          f"in {time.monotonic() - started:.1f}s; per block (line: s): "
          + ", ".join(f"{blocks[n].line}: {s:.1f}" for n, s in sorted(run.seconds.items())))

    failed = next((n for n in run.started if n not in run.ended), None)
    if run.status != 0:
        where = blocks[failed].describe() if failed is not None else "(between blocks)"
        printed = run.printed.get(failed, run.output[-4000:]) if failed is not None else \
            run.output[-4000:]
        background = "".join(f"\n--- background {blocks[n].describe()}\n{run.printed[n][-3000:]}"
                             for n in run.background_status)
        pytest.fail(f"exit {run.status} in {where}\n--- it printed:\n{printed}{background}")

    problems = []
    for number, block in enumerate(blocks):
        if block.skip is not None:
            continue
        printed = run.printed.get(number, "")
        if number not in run.ended:
            problems.append(f"{block.describe()}\nnever finished")
        if block.background is not None and \
                run.background_status.get(number) not in (0, 128 + signal.SIGINT):
            problems.append(f"{block.describe()}\nexited {run.background_status.get(number)} "
                            "on Ctrl-C, expected 0 (or death by SIGINT)")
        if block.quiet and printed.strip():
            problems.append(f"{block.describe()}\nis marked quiet but printed:\n{printed}")
        problems += [f"{block.describe()}\ndid not print {text!r}; it printed:\n"
                     f"{printed[-3000:]}" for text in block.expects if text not in printed]
        problems += [f"{block.describe()}\nprinted a warning: {line}"
                     for line in printed.splitlines() if _WARNING.search(line)]
    assert not problems, "\n\n".join(problems)
