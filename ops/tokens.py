"""Development JWTs: an ES256 key in the state directory, its JWKS for Envoy, and minting.

Production points Envoy at the identity provider's JWKS instead; the services never verify
tokens themselves (the edge does, see runtime.access).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from runtime.access import Role

ISSUER = "televote-local"
AUDIENCE = "televote"
KEY_ID = "televote-local-1"


def _key_path(state_dir: Path) -> Path:
    return state_dir / "jwt" / "signing-key.pem"


def jwks_path(state_dir: Path) -> Path:
    return state_dir / "jwt" / "jwks.json"


def ensure_signing_key(state_dir: Path) -> Path:
    """Create the signing key and its JWKS once; later runs reuse them. Returns the JWKS path."""
    key_path = _key_path(state_dir)
    if not key_path.exists():
        key_path.parent.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        key_path.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        key_path.chmod(0o600)
    if not jwks_path(state_dir).exists():
        private_key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        public_jwk = json.loads(ECAlgorithm.to_jwk(private_key.public_key()))  # type: ignore[arg-type]
        public_jwk.update({"kid": KEY_ID, "alg": "ES256", "use": "sig"})
        jwks_path(state_dir).write_text(json.dumps({"keys": [public_jwk]}, indent=2))
    return jwks_path(state_dir)


def mint(state_dir: Path, role: Role, subject: str, ttl_seconds: int = 24 * 3600) -> str:
    """A signed token for `subject` acting as `role`, accepted by the local edge."""
    if role in (Role.ANONYMOUS, Role.INTERNAL):
        raise ValueError(f"no tokens are issued for role {role.value}")
    ensure_signing_key(state_dir)
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": subject, "role": role.value,
              "iat": now, "exp": now + ttl_seconds}
    return jwt.encode(claims, _key_path(state_dir).read_bytes(), algorithm="ES256",
                      headers={"kid": KEY_ID})
