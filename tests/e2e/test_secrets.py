"""Where a running mesh keeps its secrets (issue 21): a state directory closed to other users,
the token signing key given to no service, the ledger signing key to results_svc alone."""

from __future__ import annotations

import stat
from pathlib import Path

import psutil

from ops.stack import SERVICES, Stack
from results_svc.signing import KEY_FILE


def _service_environments(stack: Stack) -> dict[str, dict[str, str]]:
    environments = {}
    for service in SERVICES:
        process = psutil.Process(stack.child(service, 0).process.pid)
        environments[service] = process.environ()
    return environments


def _names_below(directory: Path) -> set[str]:
    return {path.name for path in directory.rglob("*")}


def test_the_state_directory_is_closed_to_other_users(stack: Stack) -> None:
    assert stat.S_IMODE(stack.settings.state_dir.stat().st_mode) & 0o007 == 0


def test_no_service_is_told_where_the_token_signing_key_is(stack: Stack) -> None:
    state_dir = stack.settings.state_dir.resolve()
    for service, environment in _service_environments(stack).items():
        own = Path(environment["TELEVOTE_STATE_DIR"])
        assert own.parent == state_dir / "services", service
        assert stat.S_IMODE(own.stat().st_mode) == 0o700
        assert not any(".pem" in value and "jwt" in value for value in environment.values())
        assert "jwt" not in _names_below(own)


def test_the_ledger_signing_key_is_results_svcs_alone(stack: Stack) -> None:
    holders = {service for service, environment in _service_environments(stack).items()
               if KEY_FILE in _names_below(Path(environment["TELEVOTE_STATE_DIR"]))}
    assert holders == {"results_svc"}
    key = Path(_service_environments(stack)["results_svc"]["TELEVOTE_STATE_DIR"]) / KEY_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert not (stack.settings.state_dir / KEY_FILE).exists()


def test_only_vote_svc_gets_the_pseudonym_salt_and_the_ip_hash_key(stack: Stack) -> None:
    for secret in ("VOTE_PSEUDONYM_SALT", "VOTE_IP_HASH_KEY"):
        holders = {service for service, environment in _service_environments(stack).items()
                   if environment.get(secret)}
        assert holders == {"vote_svc"}, secret
