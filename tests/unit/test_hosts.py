"""Where a process of the mesh runs (ops/hosts.py): the command that puts it on its host, and
the copy of a file it is given there."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from ops.hosts import LOCAL, Host, install


def test_a_process_on_this_machine_runs_as_it_is() -> None:
    assert LOCAL.command(["postgres", "-D", "x"], "televote") == (["postgres", "-D", "x"],
                                                                 "televote")
    assert LOCAL.call(lambda: 42) == 42
    assert LOCAL.loopback and not Host("10.0.0.2").loopback and Host("localhost").loopback


def test_a_process_on_another_host_enters_it_hides_what_it_must_not_see_then_drops_root(
        ) -> None:
    host = Host("10.0.0.4", netns="tv-stores", hidden=(Path("/srv/it's stack"),))
    argv, user = host.command(["redis-server", "conf"])
    assert argv[:4] == ["ip", "netns", "exec", "tv-stores"] and user is None
    # The mount is made in the process's own mount namespace, the path quoted for sh.
    assert argv[4:6] == ["sh", "-c"] and "tmpfs '/srv/it'\"'\"'s stack'" in argv[6]
    assert argv[-2:] == ["redis-server", "conf"]
    argv, user = host.command(["postgres"], "root")
    assert user is None and argv[-5:] == ["setpriv", "--reuid=0", "--regid=0",
                                          "--clear-groups", "postgres"]
    with pytest.raises(ValueError):
        Host("10.0.0.4", hidden=(Path("/srv"),))


def test_a_host_gets_its_own_owner_only_copy(tmp_path: Path) -> None:
    source = tmp_path / "stack" / "tls"
    source.mkdir(parents=True)
    (source / "key.pem").write_text("key")
    copy = install(source, tmp_path / "host" / "tls")
    assert (copy / "key.pem").read_text() == "key"
    assert stat.S_IMODE((copy / "key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE(copy.stat().st_mode) == 0o700
    assert install(source, source) == source  # this machine's own: nothing copied
