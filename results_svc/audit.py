"""Ledger exports for auditors, and their offline verification (`televote audit ...`).

An export is JSON lines. Line 1 is the header: the round's rules, the published final result,
its signed digest with the public key, the voters' paid credits, and the other rounds' ledger
rows of the round's voters that count towards their free quota (same episode) or paid balance
(`context`). Every following line is one leaf of the round's tree, in tree order:
{"leaf_data": <the exact leaf bytes as UTF-8>, "fraud_rejected": bool}. Voters appear only
as vote_svc's salted pseudonym (the leaf's "voter").

`verify` needs nothing but the file: it recomputes every leaf hash and the RFC 9162 root,
checks the root and size against the signed tree head and the Ed25519 signature, and recounts
the votes by `results_svc.rules`; each must match the published result.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

from results_svc import rules
from results_svc.final import read_final
from results_svc.merkle import leaf_hash, root_of, verify_inclusion
from results_svc.rounds import load_round
from results_svc.signing import parse_tree_head, verify_signature

FORMAT = "televote-ledger-export/v1"

_LEAVES_SQL = """
SELECT v.vote_id::text, v.user_id, v.leaf_data, v.receipt_hash,
       EXISTS (SELECT 1 FROM fraud_rejections f
                WHERE f.round_id = v.round_id::text AND f.user_id = v.user_id
                  AND (f.vote_ref IS NULL OR f.vote_ref = v.request_id)) AS fraud_rejected
  FROM votes v WHERE v.round_id = %s ORDER BY v.admitted_ms, v.vote_id, v.receipt_hash
"""
_CONTEXT_SQL = """
SELECT v.vote_id::text, v.user_id, v.vote_type, v.count, v.admitted_ms, v.receipt_hash,
       v.episode_id = %(episode)s::uuid AS same_episode
  FROM votes v
 WHERE v.user_id = ANY(%(users)s::text[]) AND v.round_id <> %(round)s::uuid
   AND (v.vote_type = 'PAID' OR (v.vote_type = 'FREE' AND v.episode_id = %(episode)s::uuid))
"""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def export_round(database_url: str, round_id: str, out: Path) -> int:
    """Write the round's export; returns the number of leaves."""
    async with await psycopg.AsyncConnection.connect(database_url,
                                                     row_factory=dict_row) as connection:
        info = await load_round(connection, round_id)
        if info is None:
            raise SystemExit(f"no round {round_id}")
        final = await read_final(connection, round_id)
        if final is None:
            raise SystemExit(f"round {round_id} has no final result yet")
        cursor = await connection.execute(
            "SELECT leaves FROM round_result_leaves WHERE round_id = %s ORDER BY chunk",
            (round_id,))
        blob = b"".join([bytes(r["leaves"]) for r in await cursor.fetchall()])
        signed = {blob[i:i + 32] for i in range(0, len(blob), 32)}
        cursor = await connection.execute(
            "SELECT public_key FROM ledger_keys WHERE key_id = %s", (final.key_id,))
        key_row = await cursor.fetchone()
        assert key_row is not None
        cursor = await connection.execute(_LEAVES_SQL, (round_id,))
        leaves = [row for row in await cursor.fetchall() if bytes(row["receipt_hash"]) in signed]
        pseudonym: dict[str, str] = {}
        for row in leaves:
            pseudonym.setdefault(row["user_id"], json.loads(row["leaf_data"]).get("voter", ""))
        users = sorted(pseudonym)
        cursor = await connection.execute(_CONTEXT_SQL, {"episode": info.episode_id,
                                                         "users": users, "round": round_id})
        context = [{"voter": pseudonym[r["user_id"]], "vote_id": r["vote_id"],
                    "vote_type": r["vote_type"], "count": r["count"],
                    "accepted_at_ms": r["admitted_ms"],
                    "leaf_hash": bytes(r["receipt_hash"]).hex(),
                    "same_episode": r["same_episode"]} for r in await cursor.fetchall()]
        cursor = await connection.execute(
            "SELECT user_id, credited FROM wallets WHERE user_id = ANY(%s)", (users,))
        credited = {pseudonym[r["user_id"]]: r["credited"] for r in await cursor.fetchall()}
    rules_ = info.rules()
    header = {
        "format": FORMAT,
        "round": {"round_id": round_id, "episode_id": info.episode_id,
                  "contestant_ids": list(rules_.contestant_ids), "opens_at_ms": rules_.opens_ms,
                  "close_ms": dict(rules_.close_ms), "free_vote_quota": rules_.free_quota,
                  "free_vote_cap": rules_.free_cap},
        "result": {"counts": final.counts, "total_votes": final.total_votes,
                   "ledger_votes": final.ledger_votes,
                   "invalidated_votes": final.invalidated_votes,
                   "winner_contestant_ids": final.winner_ids},
        "digest": {"tree_size": final.tree_size, "root_hash": final.root_hash.hex(),
                   "signed_tree_head": _b64(final.signed_tree_head),
                   "signature": _b64(final.signature), "key_id": final.key_id,
                   "public_key": bytes(key_row["public_key"]).hex()},
        "credited": credited,
        "context": context,
    }
    with out.open("w") as file:
        file.write(json.dumps(header, sort_keys=True) + "\n")
        for row in leaves:
            file.write(json.dumps({"leaf_data": bytes(row["leaf_data"]).decode(),
                                   "fraud_rejected": row["fraud_rejected"]}) + "\n")
    return len(leaves)


@dataclass
class Verdict:
    problems: list[str] = field(default_factory=list)
    recount: rules.Recount | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def _lines(path: Path) -> Iterator[dict[str, Any]]:
    with path.open() as file:
        for line in file:
            if line.strip():
                yield json.loads(line)


def verify_export(path: Path, public_key_hex: str | None = None) -> Verdict:
    """Check an export offline: signature, root, size, and a recount by the round's rules."""
    verdict = Verdict()
    lines = _lines(path)
    header = next(lines)
    if header.get("format") != FORMAT:
        return Verdict([f"not a {FORMAT} file"])
    digest, result, rnd = header["digest"], header["result"], header["round"]
    public_key = bytes.fromhex(public_key_hex or digest["public_key"])
    head = base64.b64decode(digest["signed_tree_head"])
    if not verify_signature(public_key, head, base64.b64decode(digest["signature"])):
        verdict.problems.append("the tree head's signature does not verify")
    signed = parse_tree_head(head)
    rows: list[rules.Row] = []
    hashes: list[bytes] = []
    for entry in lines:
        data = entry["leaf_data"].encode()
        hashes.append(leaf_hash(data))
        leaf = json.loads(data)
        rows.append(rules.Row(
            vote_id=leaf["vote_id"], voter=leaf.get("voter", ""), vote_type=leaf["vote_type"],
            count=int(leaf["count"]), admitted_ms=int(leaf["accepted_at_ms"]),
            leaf_hash=hashes[-1], contestant_id=leaf["contestant_id"],
            channel=leaf["channel"], fraud_rejected=bool(entry["fraud_rejected"])))
        if leaf.get("round_id") != rnd["round_id"]:
            verdict.problems.append(f"leaf {leaf['vote_id']} is of another round")
    if [r.order for r in rows] != sorted(r.order for r in rows):
        verdict.problems.append("leaves are not in ledger order")
    root = root_of(hashes)
    if signed.round_id != rnd["round_id"]:
        verdict.problems.append("the signed head is for another round")
    if signed.tree_size != len(hashes):
        verdict.problems.append(f"{len(hashes)} leaves, the signed head says {signed.tree_size}")
    if signed.root_hash != root:
        verdict.problems.append(f"root {root.hex()} is not the signed root "
                                f"{signed.root_hash.hex()}")
    for row in header["context"]:
        rows.append(rules.Row(
            vote_id=row["vote_id"], voter=row["voter"], vote_type=row["vote_type"],
            count=int(row["count"]), admitted_ms=int(row["accepted_at_ms"]),
            leaf_hash=bytes.fromhex(row["leaf_hash"]), in_round=False,
            same_episode=bool(row["same_episode"])))
    round_rules = rules.RoundRules(
        rnd["round_id"], tuple(rnd["contestant_ids"]), int(rnd["opens_at_ms"]),
        {k: int(v) for k, v in rnd["close_ms"].items()}, int(rnd["free_vote_quota"]),
        int(rnd["free_vote_cap"]))
    recount = rules.recount(round_rules, rows, {k: int(v) for k, v in header["credited"].items()})
    verdict.recount = recount
    published = {k: int(v) for k, v in result["counts"].items()}
    if recount.counts != published:
        verdict.problems.append(f"recount {recount.counts} != published {published}")
    for name, mine in (("total_votes", recount.total_votes),
                       ("ledger_votes", recount.ledger_votes),
                       ("invalidated_votes", recount.invalidated_votes)):
        if int(result[name]) != mine:
            verdict.problems.append(f"{name}: recount {mine} != published {result[name]}")
    if sorted(result["winner_contestant_ids"]) != recount.winners():
        verdict.problems.append("the published winners are not the recount's")
    return verdict


def verify_receipt(leaf_data: bytes, leaf_index: int, tree_size: int, audit_path: list[bytes],
                   root_hash: bytes) -> bool:
    """Offline check of one receipt: its leaf hash leads to `root_hash` by the proof."""
    return verify_inclusion(leaf_hash(leaf_data), leaf_index, tree_size, audit_path, root_hash)


def verify_receipt_document(document: dict[str, Any], root_hash: bytes | None = None
                            ) -> list[str]:
    """Check a GetVoteReceipt response in its JSON form (as the edge returns it): the leaf
    hashes to the receipt's hash, and the proof leads to the digest's root (and to
    `root_hash`, the root of a verified export, when given). Returns the problems found."""
    receipt, proof = document.get("receipt", {}), document.get("proof")
    leaf_data = base64.b64decode(receipt.get("leafData", ""))
    problems = []
    if leaf_hash(leaf_data) != base64.b64decode(receipt.get("leafHash", "")):
        problems.append("the receipt's leaf hash is not SHA-256(0x00 || leaf_data)")
    if not proof:
        return [*problems, "the receipt has no proof (round not finalized?)"]
    root = base64.b64decode(proof.get("rootHash", ""))
    if not verify_receipt(leaf_data, int(proof.get("leafIndex", 0)), int(proof["treeSize"]),
                          [base64.b64decode(p) for p in proof.get("auditPath", [])], root):
        problems.append("the inclusion proof does not lead to its root")
    if root_hash is not None and root != root_hash:
        problems.append("the proof's root is not the export's signed root")
    return problems
