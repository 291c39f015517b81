"""The vote receipt's leaf hash: what vote_svc hands a voter (`votes.receipt_hash`) and what
results_svc's Merkle tree (results_svc/merkle.py) and an auditor's verify hash. One function, so
a receipt always proves inclusion in the tree that counted it.
"""

from __future__ import annotations

import hashlib


def leaf_hash(leaf_data: bytes) -> bytes:
    """RFC 6962 leaf hash: SHA-256(0x00 || leaf_data)."""
    return hashlib.sha256(b"\x00" + leaf_data).digest()
