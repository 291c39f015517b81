"""Child processes of `televote up`: started in their own session, logged to files, and
stopped in order so that nothing is left behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import random
import signal
import socket
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ops.hosts import LOCAL, Host

# Listening ports are chosen below the kernel's ephemeral range. A port from inside it (what
# binding port 0 gives) can be taken by some process's outgoing connection between the probe
# and the server's own bind: CI once saw Envoy fail `Address already in use` that way while a
# Redis Cluster test opened hundreds of client connections.
LISTEN_PORTS_FROM = 10000
_handed_out: set[int] = set()


def _ephemeral_ports_from() -> int:
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port(host: str = "127.0.0.1", *, also_free_at: int = 0) -> int:
    """A TCP port on `host` that nothing listens on right now ("0.0.0.0": free on every
    address, for a server that binds them all), never one this process handed out before.
    With `also_free_at`, the port that far above it is free too (a Redis node's bus port)."""
    end = _ephemeral_ports_from() - also_free_at
    if end - LISTEN_PORTS_FROM < 1000:  # a kernel lending nearly every port: probe them all
        end = 65536 - also_free_at
    for _ in range(1000):
        port = random.randrange(LISTEN_PORTS_FROM, end)
        if port in _handed_out:
            continue
        if all(_bindable(host, candidate) for candidate in {port, port + also_free_at}):
            _handed_out.add(port)
            return port
    raise RuntimeError(f"no free port on {host} in {LISTEN_PORTS_FROM}..{end}")


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
        return True


T = TypeVar("T")


def run_stopping_on_sigterm(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, where SIGTERM ends `main` as Ctrl-C does: its task is cancelled, so the
    finally blocks that stop what it started (a Stack) run. Without it, a bench or a load
    test ended by kill or pkill left its PostgreSQL, Redis, Envoy and services running
    (children have sessions of their own), using CPU under the next measurement."""
    async def guarded() -> T:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await main
    return asyncio.run(guarded())


def as_user(user: str | None) -> dict[str, Any]:
    """subprocess arguments that run a child as `user` with that user's group alone: without
    them it keeps root's groups, and the group that lets it into the state directory
    (ops/infra.py) is not among them."""
    if user is None:
        return {}
    return {"user": user, "group": pwd.getpwnam(user).pw_gid, "extra_groups": []}


@dataclass
class Child:
    """One supervised process."""

    name: str
    process: asyncio.subprocess.Process
    log_path: Path
    stop_signal: signal.Signals = signal.SIGTERM

    @classmethod
    async def spawn(cls, name: str, argv: list[str], log_dir: Path, *,
                    env: dict[str, str] | None = None, user: str | None = None,
                    stop_signal: signal.Signals = signal.SIGTERM,
                    host: Host = LOCAL) -> Child:
        """Start `argv` on `host` (as `user`), its output appended to `name`.log in `log_dir`
        (the log stays with whoever supervises it, wherever the process runs)."""
        log_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once per process start
        log_path = log_dir / f"{name}.log"
        # On another host `argv` is exec'd by the commands that enter it: the pid is its own.
        argv, user = host.command(argv, user)
        with log_path.open("ab") as log_file:
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                env={**os.environ, **(env or {})}, **as_user(user),
                # Its own session: a Ctrl-C in the terminal reaches only `televote up`, which
                # then stops the children in order instead of all at once.
                start_new_session=True)
        return cls(name, process, log_path, stop_signal)

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def stop(self, timeout: float = 20.0) -> int | None:
        """Ask the process (and its group) to stop; kill the group if it does not in time."""
        if self.running:
            self._signal_group(self.stop_signal)
            try:
                await asyncio.wait_for(self.process.wait(), timeout)
            except TimeoutError:
                self._signal_group(signal.SIGKILL)
                await self.process.wait()
        # Anything the child left in its group (postgres backends, say) goes with it.
        self._signal_group(signal.SIGKILL)
        return self.process.returncode

    def _signal_group(self, signum: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signum)


async def wait_serving(target: str, child: Child | None = None, timeout: float = 60.0,
                       name: str = "", channel: grpc.aio.Channel | None = None) -> None:
    """Wait until the gRPC server at `target` (host:port) reports SERVING on its health
    service; raises with `child`'s log tail if it exits first or the time runs out. `channel`
    reaches it another way than plaintext (the mesh's mutual TLS)."""
    what = name or (child.name if child else target)
    deadline = time.monotonic() + timeout
    async with channel or grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if child is not None and not child.running:
                raise RuntimeError(f"{what} exited at start:\n{child.log_tail()}")
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            await asyncio.sleep(0.1)
    tail = f":\n{child.log_tail()}" if child else ""
    raise RuntimeError(f"{what} not SERVING after {timeout:.0f}s{tail}")
