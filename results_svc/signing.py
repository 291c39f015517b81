"""The Ed25519 key that signs ledger tree heads, and the signed-head format.

The private key is a PEM file given to results_svc alone (RESULTS_SIGNING_KEY_FILE; `televote
up` makes it once and gives every replica a copy), or, on one machine without it, kept in
results_svc's own state directory, created 0600 once by whichever replica starts first
(hard-linked into place, so two replicas starting together end up with the same key).
Its public key is published in PostgreSQL (`ledger_keys`) so every replica can serve it by id.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from runtime.secrets import write_private

KEY_FILE = "ledger_ed25519.pem"
HEAD_MAGIC = "televote-tree-head/v1"


def key_id_of(public_key: bytes) -> str:
    return hashlib.sha256(public_key).hexdigest()[:16]


def rfc3339_ms(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + \
        f"{moment.microsecond // 1000:03d}Z"


def tree_head(round_id: str, tree_size: int, root_hash: bytes, signed_at: datetime) -> bytes:
    """The exact bytes signed (results_types.proto, LedgerDigest.signed_tree_head)."""
    lines = [HEAD_MAGIC, round_id, str(tree_size), root_hash.hex(), rfc3339_ms(signed_at)]
    return "".join(line + "\n" for line in lines).encode()


@dataclass(frozen=True)
class TreeHead:
    round_id: str
    tree_size: int
    root_hash: bytes
    signed_at: str


def parse_tree_head(head: bytes) -> TreeHead:
    lines = head.decode().split("\n")
    if len(lines) != 6 or lines[0] != HEAD_MAGIC or lines[5] != "":
        raise ValueError("not a televote-tree-head/v1")
    return TreeHead(lines[1], int(lines[2]), bytes.fromhex(lines[3]), lines[4])


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def public_pem(public_key: bytes) -> str:
    return Ed25519PublicKey.from_public_bytes(public_key).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


@dataclass(frozen=True)
class Signer:
    private_key: Ed25519PrivateKey
    public_key: bytes
    key_id: str
    created_at: datetime

    @classmethod
    def load_or_create(cls, state_dir: Path) -> Signer:
        """The key in `state_dir`, made there on first use (one machine)."""
        return cls.load(state_dir / KEY_FILE, create=True)

    @classmethod
    def load(cls, path: Path, create: bool = False) -> Signer:
        """The key in `path`; with `create`, a new one when there is none. A deployment
        gives every replica the same key file: one made by a replica on its own host would
        sign results that the others' key cannot vouch for."""
        if not path.exists():
            if not create:
                raise SystemExit(f"results_svc: no ledger signing key at {path}")
            write_private(path, Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()))
        private = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(private, Ed25519PrivateKey):
            raise SystemExit(f"{path} is not an Ed25519 private key")
        public = private.public_key().public_bytes(serialization.Encoding.Raw,
                                                   serialization.PublicFormat.Raw)
        created = datetime.fromtimestamp(path.stat().st_mtime, UTC)
        return cls(private, public, key_id_of(public), created)

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message)
