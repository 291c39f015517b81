"""Where the parts of a mesh run: the edge, the services and the stores (PostgreSQL, Redis).

`televote up` runs all three on this machine's loopback. The stack can also place each part on
a host of its own: an address its servers listen on, a directory its processes keep their
files in (each gets a copy of what it needs, never a path into another host's), and, to stand
for a separate machine, a Linux network namespace (`ip netns`) its processes run in
(tests/e2e/test_hosts.py).
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import pwd
import shlex
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from runtime.secrets import private_dir

T = TypeVar("T")

#: The parts of a mesh that may each have a host of their own.
EDGE, SERVICES, STORES = "edge", "services", "stores"

_CLONE_NEWNET = 0x40000000


@dataclass(frozen=True)
class Host:
    """One place processes of the mesh run."""

    #: The address its servers listen on, and others reach them at.
    address: str = "127.0.0.1"
    #: Where its processes keep their files; None: the stack's state directory.
    directory: Path | None = None
    #: The network namespace that stands for this host (`ip netns add NAME`); None: this
    #: machine's own network.
    netns: str | None = None
    #: Directories its processes must not see, each mounted over with an empty tmpfs in the
    #: process's own mount namespace (`ip netns exec` gives it one): the stack's state
    #: directory and the other hosts' directories, to prove nothing is read from them.
    hidden: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        if self.hidden and self.netns is None:
            raise ValueError("hidden directories need a network namespace (its mount namespace)")

    @property
    def loopback(self) -> bool:
        """Whether only this machine can reach its servers."""
        try:
            return ipaddress.ip_address(self.address).is_loopback
        except ValueError:  # a host name
            return self.address == "localhost"

    def files(self, state_dir: Path) -> Path:
        """The directory this host's processes keep their files in."""
        return self.directory.resolve() if self.directory else state_dir

    def command(self, argv: list[str], user: str | None = None) -> tuple[list[str], str | None]:
        """`argv` as run on this host, and the user the caller must still switch to (inside a
        namespace the switch is the command's last step: entering it needs root)."""
        if self.netns is None:
            return argv, user
        prefix = ["ip", "netns", "exec", self.netns]
        if self.hidden:
            mounts = " && ".join(f"mount -t tmpfs -o size=4k,mode=000 tmpfs {shlex.quote(str(p))}"
                                 for p in self.hidden)
            prefix += ["sh", "-c", f'{mounts} && exec "$@"', "televote-host"]
        if user is not None:
            entry = pwd.getpwnam(user)
            prefix += ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}",
                       "--clear-groups"]
        return prefix + argv, None

    def call(self, function: Callable[[], T]) -> T:
        """`function()` with its sockets in this host's network: a port free there, a request
        to a server that listens on this host's loopback only (Envoy's admin)."""
        if self.netns is None:
            return function()
        # setns moves only the calling thread: a fresh one, gone afterwards.
        with ThreadPoolExecutor(1) as thread:
            return thread.submit(_inside, self.netns, function).result()


LOCAL = Host()


def _inside(netns: str, function: Callable[[], T]) -> T:
    libc = ctypes.CDLL(None, use_errno=True)
    descriptor = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(descriptor, _CLONE_NEWNET) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"setns {netns}: {os.strerror(error)}")
    finally:
        os.close(descriptor)
    return function()


def install(source: Path, destination: Path) -> Path:
    """`source` (a file or a directory of files) copied to `destination`, owner-only, for a
    process that must not read the stack's own copy; nothing to do when they are the same."""
    if source.resolve() == destination.resolve():
        return destination
    private_dir(destination.parent)
    if source.is_dir():
        private_dir(destination)
        for file in source.iterdir():
            if file.is_file():
                install(file, destination / file.name)
        return destination
    partial = destination.with_name(f".{destination.name}.partial")
    shutil.copyfile(source, partial)
    partial.chmod(0o600)
    partial.replace(destination)
    return destination
