"""The edge's token rules (issue 21): only ES256 tokens from the JWKS, with `exp`, the right
issuer and audience, a lifetime within the role's cap, judged with a bounded clock skew; and a
signing key that rotates without refusing a token still valid."""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ops import tokens
from ops.stack import Stack
from runtime.access import TOKEN_CLOCK_SKEW_SECONDS, TOKEN_LIFETIME_SECONDS, Role

VOTER_PATH = "/v1/vote-packages"  # VoteService: voters only
OPERATOR_PATH = "/v1/fraud/reviews"  # FraudReviewService: operators only


def _status(stack: Stack, path: str, token: str) -> int:
    request = urllib.request.Request(f"{stack.edge_url}{path}", method="GET")
    request.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


def _claims(role: Role, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {"iss": tokens.ISSUER, "aud": tokens.AUDIENCE, "sub": "matrix",
                              "role": role.value, "iat": now, "exp": now + 600}
    claims.update(overrides)
    return {key: value for key, value in claims.items() if value is not None}


def _key(state_dir: Path, kid: str) -> bytes:
    return (state_dir / "jwt" / "keys" / f"{kid}.pem").read_bytes()


def _signed(state_dir: Path, claims: dict[str, Any], kid: str | None = None) -> str:
    kid = kid or tokens.active_kid(state_dir)
    return jwt.encode(claims, _key(state_dir, kid), algorithm="ES256", headers={"kid": kid})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def test_a_well_formed_token_is_accepted(stack: Stack) -> None:
    """The baseline the refusals below are measured against."""
    assert _status(stack, VOTER_PATH, _signed(stack.settings.state_dir, _claims(Role.VOTER))) \
        == 200


@pytest.mark.parametrize("case", ["no_exp", "expired", "wrong_iss", "wrong_aud", "future_iat"])
def test_a_token_with_bad_claims_is_refused(stack: Stack, case: str) -> None:
    now = int(time.time())
    overrides: dict[str, Any] = {
        "no_exp": {"exp": None},
        "expired": {"iat": now - 1200, "exp": now - TOKEN_CLOCK_SKEW_SECONDS - 60},
        "wrong_iss": {"iss": "someone-else"},
        "wrong_aud": {"aud": "another-api"},
        "future_iat": {"nbf": now + TOKEN_CLOCK_SKEW_SECONDS + 120,
                       "exp": now + TOKEN_CLOCK_SKEW_SECONDS + 600},
    }[case]
    token = _signed(stack.settings.state_dir, _claims(Role.VOTER, **overrides))
    # Envoy answers a valid signature for another API 403 (the token is genuine, just not
    # for us); everything else here is 401.
    assert _status(stack, VOTER_PATH, token) == (403 if case == "wrong_aud" else 401)


def test_a_token_expired_within_the_clock_skew_is_still_accepted(stack: Stack) -> None:
    now = int(time.time())
    token = _signed(stack.settings.state_dir,
                    _claims(Role.VOTER, iat=now - 600, exp=now - TOKEN_CLOCK_SKEW_SECONDS // 3))
    assert _status(stack, VOTER_PATH, token) == 200


def test_alg_none_is_refused(stack: Stack) -> None:
    header = {"alg": "none", "typ": "JWT", "kid": tokens.active_kid(stack.settings.state_dir)}
    token = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(_claims(Role.VOTER)).encode())}."
    assert _status(stack, VOTER_PATH, token) == 401


def test_hs256_signed_with_the_public_key_is_refused(stack: Stack) -> None:
    """The classic key-confusion attack: the public key (from the JWKS) as an HMAC secret."""
    state_dir = stack.settings.state_dir
    kid = tokens.active_kid(state_dir)
    public_pem = serialization.load_pem_private_key(_key(state_dir, kid), None).public_key() \
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    header = {"alg": "HS256", "typ": "JWT", "kid": kid}
    signing_input = f"{_b64(json.dumps(header).encode())}." \
                    f"{_b64(json.dumps(_claims(Role.VOTER)).encode())}"
    import hashlib
    import hmac
    signature = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    assert _status(stack, VOTER_PATH, f"{signing_input}.{_b64(signature)}") == 401


def test_a_key_outside_the_jwks_is_refused(stack: Stack) -> None:
    stranger = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    for kid in ("unknown-kid", tokens.active_kid(stack.settings.state_dir)):
        token = jwt.encode(_claims(Role.VOTER), stranger, algorithm="ES256",
                           headers={"kid": kid})
        assert _status(stack, VOTER_PATH, token) == 401, kid


def test_an_operator_token_lives_at_most_an_hour(stack: Stack) -> None:
    state_dir = stack.settings.state_dir
    now = int(time.time())
    assert TOKEN_LIFETIME_SECONDS[Role.OPERATOR] <= 3600
    within = _signed(state_dir, _claims(Role.OPERATOR, exp=now + 3600))
    assert _status(stack, OPERATOR_PATH, within) == 200
    beyond = _signed(state_dir, _claims(Role.OPERATOR, exp=now + 2 * 3600))
    assert _status(stack, OPERATOR_PATH, beyond) == 403
    # The same lifetime is fine for a voter.
    assert _status(stack, VOTER_PATH, _signed(state_dir, _claims(Role.VOTER, exp=now + 7200))) \
        == 200
    with pytest.raises(ValueError):
        tokens.mint(state_dir, Role.OPERATOR, "op", ttl_seconds=2 * 3600)


def test_an_over_long_operator_token_is_not_an_operator_on_public_rpcs_either(
        stack: Stack) -> None:
    """Public RPCs admit anonymous callers, but a token beyond its role's cap is refused,
    not taken as that role (an operator sees more of a round's results than the public)."""
    now = int(time.time())
    beyond = _signed(stack.settings.state_dir, _claims(Role.OPERATOR, exp=now + 2 * 3600))
    assert _status(stack, "/v1/ledger/public-key", beyond) == 403
    within = _signed(stack.settings.state_dir, _claims(Role.OPERATOR, exp=now + 600))
    assert _status(stack, "/v1/ledger/public-key", within) == 200


def test_no_role_gets_a_token_beyond_its_cap(stack: Stack) -> None:
    state_dir = stack.settings.state_dir
    now = int(time.time())
    longest = max(TOKEN_LIFETIME_SECONDS.values())
    token = _signed(state_dir, _claims(Role.VOTER, exp=now + longest + 3600))
    assert _status(stack, VOTER_PATH, token) == 401


def test_both_keys_of_the_jwks_verify_so_the_signing_key_can_rotate(stack: Stack) -> None:
    state_dir = stack.settings.state_dir
    published = json.loads(tokens.jwks_path(state_dir).read_text())["keys"]
    assert len(published) == 2
    for key in published:
        assert _status(stack, VOTER_PATH,
                       _signed(state_dir, _claims(Role.VOTER), kid=key["kid"])) == 200
