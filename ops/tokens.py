"""Development JWTs: two ES256 keys in the state directory, their JWKS for Envoy, and minting.

The JWKS always publishes two keys so the signing key can rotate without refusing a token
that is still valid: `rotate_signing_key` makes the standby key the one that signs, and the
retired key keeps verifying the tokens it signed until they expire (at most the longest
lifetime in runtime.access.TOKEN_LIFETIME_SECONDS); the next `ensure_signing_key` after that
replaces it with a fresh standby. Envoy reads the JWKS at start: restart the edge
(`televote up` again) after a rotation.

The keys are readable by whoever mints tokens (the operator running `televote`), never by a
service: no service is told where they are (ops/stack.py gives each service its own
directory). Production points Envoy at the identity provider's JWKS instead; the services
never verify tokens themselves (the edge does, see runtime.access).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from runtime.access import TOKEN_LIFETIME_SECONDS, Role
from runtime.secrets import private_dir, write_private

ISSUER = "televote-local"
AUDIENCE = "televote"
#: How long after the last rotation the retired key still verifies tokens.
RETIREMENT_SECONDS = max(TOKEN_LIFETIME_SECONDS.values()) + 300


def _jwt_dir(state_dir: Path) -> Path:
    return state_dir / "jwt"


def _keys_dir(state_dir: Path) -> Path:
    return _jwt_dir(state_dir) / "keys"


def _active_path(state_dir: Path) -> Path:
    return _jwt_dir(state_dir) / "active-kid"


def jwks_path(state_dir: Path) -> Path:
    return _jwt_dir(state_dir) / "jwks.json"


def _new_key(state_dir: Path) -> str:
    kid = f"televote-{uuid.uuid4().hex[:12]}"
    key = ec.generate_private_key(ec.SECP256R1())
    write_private(_keys_dir(state_dir) / f"{kid}.pem", key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return kid


def _kids(state_dir: Path) -> list[str]:
    keys = _keys_dir(state_dir)
    return sorted(path.stem for path in keys.glob("*.pem")) if keys.exists() else []


def active_kid(state_dir: Path) -> str:
    return _active_path(state_dir).read_text().strip()


def _set_active(state_dir: Path, kid: str) -> None:
    partial = _active_path(state_dir).with_suffix(".partial")
    partial.write_text(kid)
    partial.replace(_active_path(state_dir))


def ensure_signing_key(state_dir: Path) -> Path:
    """Make sure there is an active key and a standby key and that the JWKS publishes both;
    a retired key is replaced once no token it signed can still be valid. Returns the JWKS."""
    private_dir(_keys_dir(state_dir))
    kids = _kids(state_dir)
    if not _active_path(state_dir).exists() or active_kid(state_dir) not in kids:
        kids.append(_new_key(state_dir))
        _set_active(state_dir, kids[-1])
    active = active_kid(state_dir)
    others = [kid for kid in kids if kid != active]
    retired_for = time.time() - _active_path(state_dir).stat().st_mtime
    if others and retired_for > RETIREMENT_SECONDS:
        for kid in others:
            (_keys_dir(state_dir) / f"{kid}.pem").unlink()
        others = []
    if not others:
        others = [_new_key(state_dir)]
    _write_jwks(state_dir, [active, *others])
    return jwks_path(state_dir)


def rotate_signing_key(state_dir: Path) -> str:
    """Sign with the standby key from now on; the old key stays published. Returns its kid."""
    ensure_signing_key(state_dir)
    active = active_kid(state_dir)
    standby = next(kid for kid in _kids(state_dir) if kid != active)
    _set_active(state_dir, standby)
    _write_jwks(state_dir, _kids(state_dir))
    return standby


def _write_jwks(state_dir: Path, kids: list[str]) -> None:
    keys = []
    for kid in kids:
        private_key = serialization.load_pem_private_key(
            (_keys_dir(state_dir) / f"{kid}.pem").read_bytes(), password=None)
        public_jwk = json.loads(ECAlgorithm.to_jwk(private_key.public_key()))  # type: ignore[arg-type]
        public_jwk.update({"kid": kid, "alg": "ES256", "use": "sig"})
        keys.append(public_jwk)
    text = json.dumps({"keys": keys}, indent=2)
    path = jwks_path(state_dir)
    if not path.exists() or path.read_text() != text:
        partial = path.with_suffix(f".{os.getpid()}")
        partial.write_text(text)
        partial.replace(path)


def mint(state_dir: Path, role: Role, subject: str, ttl_seconds: int | None = None) -> str:
    """A signed token for `subject` acting as `role`, accepted by the local edge.

    Its lifetime defaults to the longest the edge accepts for `role`; a longer one is refused
    here rather than minted into a token the edge would refuse.
    """
    if role not in TOKEN_LIFETIME_SECONDS:
        raise ValueError(f"no tokens are issued for role {role.value}")
    longest = TOKEN_LIFETIME_SECONDS[role]
    ttl = longest if ttl_seconds is None else ttl_seconds
    if not 0 < ttl <= longest:
        raise ValueError(f"a {role.value} token lives at most {longest} s, not {ttl}")
    ensure_signing_key(state_dir)
    kid = active_kid(state_dir)
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": subject, "role": role.value,
              "iat": now, "exp": now + ttl}
    return jwt.encode(claims, (_keys_dir(state_dir) / f"{kid}.pem").read_bytes(),
                      algorithm="ES256", headers={"kid": kid})
