"""Secret files are private from their first byte, and the token signing key rotates."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest

from ops import tokens
from results_svc.signing import KEY_FILE, Signer
from runtime.access import Role
from runtime.secrets import read_or_create_secret, write_private


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The most permissive umask: a file made with default modes would be world-readable."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("open_umask")
def test_every_key_file_is_owner_only_even_under_an_open_umask(tmp_path: Path) -> None:
    tokens.ensure_signing_key(tmp_path / "state")
    Signer.load_or_create(tmp_path / "results")
    read_or_create_secret(tmp_path / "salt" / "pseudonym-salt")
    keys = [*(tmp_path / "state" / "jwt" / "keys").glob("*.pem"),
            tmp_path / "results" / KEY_FILE, tmp_path / "salt" / "pseudonym-salt"]
    assert len(keys) == 4
    for key in keys:
        assert _mode(key) == 0o600, key
        assert _mode(key.parent) == 0o700, key.parent


def test_a_secret_is_created_once_and_never_overwritten(tmp_path: Path) -> None:
    assert write_private(tmp_path / "k", b"first")
    assert not write_private(tmp_path / "k", b"second")
    assert (tmp_path / "k").read_bytes() == b"first"
    assert [path.name for path in tmp_path.iterdir()] == ["k"]  # no temporary left behind


def test_the_jwks_publishes_two_keys_and_rotation_keeps_the_old_one(tmp_path: Path) -> None:
    jwks = tokens.ensure_signing_key(tmp_path)
    published = {key["kid"] for key in json.loads(jwks.read_text())["keys"]}
    before = tokens.active_kid(tmp_path)
    assert len(published) == 2 and before in published
    old_token = tokens.mint(tmp_path, Role.VOTER, "v")

    after = tokens.rotate_signing_key(tmp_path)
    assert after != before and after in published
    assert jwt.get_unverified_header(tokens.mint(tmp_path, Role.VOTER, "v"))["kid"] == after
    # The token the old key signed still finds its key in the JWKS.
    tokens.ensure_signing_key(tmp_path)
    assert jwt.get_unverified_header(old_token)["kid"] in {
        key["kid"] for key in json.loads(jwks.read_text())["keys"]}


def test_a_retired_key_is_replaced_once_its_tokens_have_expired(tmp_path: Path) -> None:
    tokens.ensure_signing_key(tmp_path)
    retired = tokens.active_kid(tmp_path)
    tokens.rotate_signing_key(tmp_path)
    long_ago = (tmp_path / "jwt" / "active-kid").stat().st_mtime - tokens.RETIREMENT_SECONDS - 1
    os.utime(tmp_path / "jwt" / "active-kid", (long_ago, long_ago))
    kids = {key["kid"] for key in json.loads(tokens.ensure_signing_key(tmp_path).read_text())
            ["keys"]}
    assert len(kids) == 2 and retired not in kids and tokens.active_kid(tmp_path) in kids


def test_no_token_outlives_its_roles_cap(tmp_path: Path) -> None:
    token = tokens.mint(tmp_path, Role.OPERATOR, "op")
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 3600
    with pytest.raises(ValueError):
        tokens.mint(tmp_path, Role.OPERATOR, "op", ttl_seconds=3601)
    with pytest.raises(ValueError):
        tokens.mint(tmp_path, Role.INTERNAL, "vote_svc")
