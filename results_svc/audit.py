"""Ledger exports for auditors, and their offline verification (`televote audit ...`).

Format `televote-ledger-export/v4`: UTF-8 text, one record a line, each ending in "\\n".
(`verify` also reads v3 and v2 exports; what changed is said where it changed.)

Line 1, the header, is a JSON object: `format`; `round`, the round's rules (contestants,
window: `opens_at_ms` and per channel `close_ms`, `receive_lag_ms`, free quota and per-round
cap); `result`, the
published final result; `digest`, its signed tree head, signature and public key; `credited`,
the paid votes ever credited to each of the round's voters (voters with none are left out).

Every other line is a ledger row, and the rows come in ledger order, (accepted_at_ms,
vote_id, leaf hash) ascending (`results_svc.rules`), the order of the tree's leaves:

    L <fraud> <accepted_at_ms> <channel> <contestant_id> <count> <vote_id> <vote_type> <voter>
      <received_ms>
        (one line) One leaf of the round's tree, in tree order, given by its fields. <fraud> is
        1 if fraud_svc rejected the vote, else 0 (not part of the leaf). <received_ms> is the
        time the window was judged by (the edge's receive time as admission clamped it,
        `rules.judged_ms`), `-` for a vote that has none (judged by accepted_at_ms). The
        leaf's bytes (a receipt's leaf_data, the canonical JSON vote_svc wrote: sorted keys,
        no spaces) are exactly

            {"accepted_at_ms":<accepted_at_ms>,"channel":"<channel>","contestant_id":
            "<contestant_id>","count":<count>,"received_ms":<received_ms>,"round_id":
            "<round_id>","vote_id":"<vote_id>","vote_type":"<vote_type>","voter":"<voter>"}

        on one line, with the header's round_id, and without `"received_ms":...,` when it is
        `-`; its RFC 9162 leaf hash is SHA-256(0x00 || leaf_data). No field holds a space, a
        quote or a backslash. So the signed root commits to the time each vote was judged
        by. (In v3 the leaf never held received_ms, which the root therefore did not
        commit to; v2 had no <received_ms> and no receive lag: every vote was judged by
        accepted_at_ms.)
    J <fraud> <received_ms> <leaf_data>
        A leaf in any other form (a field missing, escapes, another key order, or a leaf
        written before leaves held received_ms): its bytes as signed, parsed as JSON. Where
        the leaf holds received_ms, the line's <received_ms> must be the same. (v2: `J
        <fraud> <leaf_data>`.)
    C <accepted_at_ms> <vote_id> <leaf_hash> <voter> <vote_type> <count> <same_episode>
        Another round's vote of one of the round's voters that counts towards their free
        quota (a FREE vote in the same episode: <same_episode> 1) or their paid balance (a
        PAID vote, any round); <leaf_hash> in hex. Not part of this round's tree.

Voters appear only as vote_svc's salted pseudonym (the leaf's "voter").

`verify` needs nothing but the file and streams it: it checks the Ed25519 signature of the
tree head, recomputes every leaf hash and the RFC 9162 root (`merkle.IncrementalRoot`, in a
second process for big files) and checks root and size against the signed head, checks that
the rows are in ledger order and of the round, and recounts the votes by the round's rules
(`rules.LedgerTally`, equal to the reference `rules.recount`); each must match the published
result. It keeps running totals per voter, never the rows. (The second process is spawned:
a script calling `verify_export` on a big file needs the usual `if __name__ == "__main__"`.)
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import multiprocessing
import re
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import IsolationLevel
from psycopg.rows import dict_row

from results_svc import rules, store
from results_svc.final import FinalResult, read_final
from results_svc.merkle import IncrementalRoot, leaf_hash, perfect_root, verify_inclusion
from results_svc.rounds import load_round
from results_svc.signing import parse_tree_head, verify_signature
from runtime.storage import fetch_one

FORMAT = "televote-ledger-export/v4"
#: Older formats `verify` reads (module docstring): v3's leaves do not hold received_ms, v2's
#: lines do not state it.
V3, V2 = "televote-ledger-export/v3", "televote-ledger-export/v2"
#: A leaf in canonical form from its fields (see the module's docstring), with and without
#: its received_ms.
LEAF_TEMPLATE = ('{"accepted_at_ms":%s,"channel":"%s","contestant_id":"%s","count":%s,'
                 '"round_id":"%s","vote_id":"%s","vote_type":"%s","voter":"%s"}')
LEAF_TEMPLATE_RECEIVED = ('{"accepted_at_ms":%s,"channel":"%s","contestant_id":"%s","count":%s,'
                          '"received_ms":%s,"round_id":"%s","vote_id":"%s","vote_type":"%s",'
                          '"voter":"%s"}')
_LEAF_TEMPLATE, _LEAF_TEMPLATE_RECEIVED = LEAF_TEMPLATE.encode(), LEAF_TEMPLATE_RECEIVED.encode()
#: <received_ms> of a vote without one.
NO_RECEIVED = "-"
#: Above this size the tree is hashed in a second process while this one recounts.
BACKGROUND_TREE_BYTES = 16 * 2**20
#: Leaves hashed as one perfect subtree before it joins the tree (see IncrementalRoot).
TREE_BLOCK = 4096
#: Problems reported one by one; beyond that only their number.
MAX_PROBLEMS = 50


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def header_line(round_rules: rules.RoundRules, episode_id: str, final: FinalResult,
                public_key: bytes, credited: Mapping[str, int]) -> bytes:
    return (json.dumps({
        "format": FORMAT,
        "round": {"round_id": round_rules.round_id, "episode_id": episode_id,
                  "contestant_ids": list(round_rules.contestant_ids),
                  "opens_at_ms": round_rules.opens_ms, "close_ms": dict(round_rules.close_ms),
                  "receive_lag_ms": round_rules.receive_lag_ms,
                  "free_vote_quota": round_rules.free_quota,
                  "free_vote_cap": round_rules.free_cap},
        "result": {"counts": final.counts, "total_votes": final.total_votes,
                   "ledger_votes": final.ledger_votes,
                   "invalidated_votes": final.invalidated_votes,
                   "winner_contestant_ids": final.winner_ids},
        "digest": {"tree_size": final.tree_size, "root_hash": final.root_hash.hex(),
                   "signed_tree_head": _b64(final.signed_tree_head),
                   "signature": _b64(final.signature), "key_id": final.key_id,
                   "public_key": public_key.hex()},
        "credited": {voter: n for voter, n in sorted(credited.items()) if n},
    }, sort_keys=True) + "\n").encode()


def canonical_leaf(round_id: str, accepted_at_ms: int, channel: str, contestant_id: str,
                   count: int, vote_id: str, vote_type: str, voter: str,
                   received_ms: int | None = None) -> bytes:
    """The leaf vote_svc writes for these fields (when none needs escaping)."""
    if received_ms is None:
        return (LEAF_TEMPLATE % (accepted_at_ms, channel, contestant_id, count, round_id,
                                 vote_id, vote_type, voter)).encode()
    return (LEAF_TEMPLATE_RECEIVED % (accepted_at_ms, channel, contestant_id, count,
                                      received_ms, round_id, vote_id, vote_type,
                                      voter)).encode()


def compact_leaf_line(fraud_rejected: bool, accepted_at_ms: int, channel: str,
                      contestant_id: str, count: int, vote_id: str, vote_type: str,
                      voter: str, received_ms: int | None = None) -> bytes:
    return (f"L {int(fraud_rejected)} {accepted_at_ms} {channel} {contestant_id} {count} "
            f"{vote_id} {vote_type} {voter} {_received_text(received_ms)}\n").encode()


def _received_text(received_ms: int | None) -> str:
    return NO_RECEIVED if received_ms is None else str(received_ms)


def _received_value(text: str) -> int | None:
    return None if text == NO_RECEIVED else int(text)


_PLAIN = re.compile(r'[^ "\\\x00-\x1f\x7f-\U0010ffff]*')


def leaf_line(round_id: str, leaf_data: bytes, fraud_rejected: bool,
              received_ms: int | None = None) -> bytes:
    """A leaf's line: L (its fields) if it is a canonical leaf of the round, else J (its
    bytes). `received_ms` is the ledger's; a leaf that holds one holds the same."""
    try:
        leaf = json.loads(leaf_data)
        fields = [leaf["accepted_at_ms"], leaf["channel"], leaf["contestant_id"],
                  leaf["count"], leaf["round_id"], leaf["vote_id"], leaf["vote_type"],
                  leaf["voter"]]
        held = leaf.get("received_ms")
        plain = (held == received_ms and (held is None or type(held) is int)
                 and all(type(v) is int if i in (0, 3) else
                         isinstance(v, str) and _PLAIN.fullmatch(v) is not None
                         for i, v in enumerate(fields)))
    except (ValueError, KeyError, TypeError, AttributeError):
        plain = False
    if plain:
        ms, channel, contestant, count, of_round, vote_id, vote_type, voter = fields
        if of_round == round_id and canonical_leaf(
                round_id, ms, channel, contestant, count, vote_id, vote_type, voter,
                received_ms) == leaf_data:
            return compact_leaf_line(fraud_rejected, ms, channel, contestant, count, vote_id,
                                     vote_type, voter, received_ms)
    return (b"J %d %s " % (fraud_rejected, _received_text(received_ms).encode()) + leaf_data
            + b"\n")


def other_round_line(accepted_at_ms: int, vote_id: str, leaf_hash_: bytes, voter: str,
                     vote_type: str, count: int, same_episode: bool) -> bytes:
    return (f"C {accepted_at_ms} {vote_id} {leaf_hash_.hex()} {voter} {vote_type} {count} "
            f"{int(same_episode)}\n").encode()


# -- export -------------------------------------------------------------------------------

async def export_round(database_url: str, round_id: str, out: Path) -> int:
    """Write the round's export, streaming it from PostgreSQL; returns the number of leaves."""
    async with await psycopg.AsyncConnection.connect(
            database_url, row_factory=dict_row, autocommit=False) as connection:
        # One snapshot for the header and the rows.
        await connection.set_isolation_level(IsolationLevel.REPEATABLE_READ)
        info = await load_round(connection, round_id)
        if info is None:
            raise SystemExit(f"no round {round_id}")
        final = await read_final(connection, round_id)
        if final is None:
            raise SystemExit(f"round {round_id} has no final result yet")
        key_row = await fetch_one(connection, store.LEDGER_PUBLIC_KEY, (final.key_id,))
        assert key_row is not None
        params = {"round": round_id, "episode": info.episode_id}
        # The rows are sorted into ledger order: in memory, not in temporary files.
        await connection.execute(store.EXPORT_WORK_MEM)
        await connection.execute(store.EXPORT_VOTERS, params)
        cursor = await connection.execute(store.EXPORT_VOTER_CREDITS)
        credited = {r["voter"]: r["credited"] for r in await cursor.fetchall()}
        row = await fetch_one(connection, store.ROUND_VOTE_COUNT, (round_id,))
        # The ledger is append-only and the tree was built from it: if the round has as many
        # rows as the tree has leaves, they are the leaves; otherwise some committed after
        # the tree was taken, and only the signed ones are exported.
        signed_only = "" if row is not None and row["n"] == final.tree_size else store.SIGNED_ONLY
        leaves = 0
        with out.open("wb") as file:
            file.write(header_line(info.rules(), info.episode_id, final,
                                   bytes(key_row["public_key"]), credited))
            async with connection.cursor() as rows, rows.copy(
                    store.EXPORT_ROWS_COPY.replace("SIGNED_ONLY", signed_only),
                    {**params, "template": LEAF_TEMPLATE,
                     "template_received": LEAF_TEMPLATE_RECEIVED}) as copy:
                async for chunk in copy:
                    data = bytes(chunk)
                    if b"\x01" in data:
                        raise SystemExit("a ledger row holds a control character: not exported")
                    # PostgreSQL sends whole rows (one a message), so a chunk's lines are
                    # whole lines.
                    leaves += data.count(b"\nL ") + data.count(b"\nJ ") + (data[:2] in (
                        b"L ", b"J "))
                    file.write(data)
        await connection.rollback()
    return leaves


# -- verify -------------------------------------------------------------------------------

@dataclass
class Verdict:
    problems: list[str] = field(default_factory=list)
    recount: rules.Recount | None = None
    #: The round's rows that do not count, by reason.
    rows_by_reason: dict[str, int] = field(default_factory=dict)
    leaves: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


class _Problems:
    """The problems found, the first MAX_PROBLEMS in words (a broken file of ten million rows
    must not make ten million messages)."""

    def __init__(self) -> None:
        self.listed: list[str] = []
        self.more = 0

    def add(self, problem: str) -> None:
        if len(self.listed) < MAX_PROBLEMS:
            self.listed.append(problem)
        else:
            self.more += 1

    def all(self) -> list[str]:
        return self.listed + ([f"... and {self.more} more"] if self.more else [])


_Leaf = tuple[str, int, str, str, int, str, str, str, str, int | None]


def _leaf_fields(line: str, round_id: str, received_in_leaf: bool = True
                 ) -> tuple[_Leaf, bytes]:
    """((fraud, accepted_at_ms, channel, contestant_id, count, round_id, vote_id, vote_type,
    voter, received_ms), leaf bytes) of an L or J line; ValueError if it is not one.
    `received_in_leaf`: the format's leaves hold received_ms (v4), else they never do (v3)."""
    if line[:4] not in ("L 0 ", "L 1 ", "J 0 ", "J 1 ") or not line.endswith("\n"):
        raise ValueError("not `L <0|1> <fields>` or `J <0|1> <received_ms> <leaf_data>`")
    if line[0] == "L":
        parts = line[:-1].split(" ")
        if len(parts) != 10 or '"' in line or "\\" in line:
            raise ValueError("not `L <fraud> <accepted_at_ms> <channel> <contestant_id> "
                             "<count> <vote_id> <vote_type> <voter> <received_ms>`")
        _, fraud, ms, channel, contestant, count, vote_id, vote_type, voter, received = parts
        values: _Leaf = (fraud, int(ms), channel, contestant, int(count), round_id, vote_id,
                         vote_type, voter, _received_value(received))
        return values, canonical_leaf(round_id, *values[1:5], *values[6:9],
                                      values[9] if received_in_leaf else None)
    received, _, data = line[4:-1].partition(" ")
    try:
        leaf = json.loads(data)
        values = (line[2], int(leaf["accepted_at_ms"]), leaf["channel"], leaf["contestant_id"],
                  int(leaf["count"]), leaf["round_id"], leaf["vote_id"], leaf["vote_type"],
                  leaf.get("voter", ""), _received_value(received))
        held = leaf.get("received_ms") if received_in_leaf else None
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"the leaf is not a vote ({error!r})") from error
    if not all(isinstance(v, str) for i, v in enumerate(values) if i not in (1, 4, 9)):
        raise ValueError("the leaf is not a vote (a field is not a string)")
    if held is not None and (type(held) is not int or held != values[9]):
        raise ValueError(f"received_ms {received} is not its leaf's ({held!r})")
    return values, data.encode()


def _other_fields(line: str) -> tuple[int, str, bytes, str, str, int, bool]:
    """(accepted_at_ms, vote_id, leaf hash, voter, vote_type, count, same_episode) of a
    `C ...` line; ValueError if it is not one."""
    parts = line[:-1].split(" ") if line.endswith("\n") else []
    if len(parts) != 8 or parts[7] not in ("0", "1"):
        raise ValueError("not `C <accepted_at_ms> <vote_id> <leaf_hash> <voter> <vote_type> "
                         "<count> <same_episode>`")
    _, ms, vote_id, hashed, voter, vote_type, count, same = parts
    return int(ms), vote_id, bytes.fromhex(hashed), voter, vote_type, int(count), same == "1"


def _row_hash(line: str, round_id: str, received_in_leaf: bool) -> bytes:
    """The leaf hash of a row, to order rows with the same (accepted_at_ms, vote_id)."""
    if line[0] == "C":
        return _other_fields(line)[2]
    return leaf_hash(_leaf_fields(line, round_id, received_in_leaf)[1])


def _header_rules(header: dict[str, Any]) -> tuple[rules.RoundRules, dict[str, int]]:
    """The round's rules and the credited votes an export's header states (raises KeyError,
    ValueError or TypeError for a header that does not state them)."""
    rnd = header["round"]
    # v2 had no receive lag: its votes were judged by accepted_at_ms.
    lag = 0 if header["format"] == V2 else int(rnd["receive_lag_ms"])
    round_rules = rules.RoundRules(
        rnd["round_id"], tuple(rnd["contestant_ids"]), int(rnd["opens_at_ms"]),
        {k: int(v) for k, v in rnd["close_ms"].items()}, int(rnd["free_vote_quota"]),
        int(rnd["free_vote_cap"]), lag)
    return round_rules, {k: int(v) for k, v in header["credited"].items()}


def _as_v3(lines: Iterable[bytes]) -> Iterable[bytes]:
    """A v2 export's rows in v3's form: no vote had a received_ms."""
    for line in lines:
        if line[:2] == b"L ":
            yield line[:-1] + b" -\n" if line.endswith(b"\n") else line
        elif line[:2] == b"J ":
            yield line[:4] + b"- " + line[4:]
        else:
            yield line


def _recount(lines: Iterable[bytes], stated: tuple[rules.RoundRules, dict[str, int]],
             problems: _Problems, suspects: set[int] | None, received_in_leaf: bool = True,
             ) -> tuple[rules.LedgerTally, int]:
    """Check every row's form, order and round, and recount them: (tally, leaves)."""
    round_rules, credited = stated
    tally = rules.LedgerTally(round_rules, credited, suspects)
    round_id = round_rules.round_id
    counted, other_round = tally.leaf, tally.other_round
    leaves = 0
    previous_ms, previous_id, previous_line = -1, "", ""
    # The hot loop: an L line costs a split (`_leaf_fields`' checks, inlined); its leaf is
    # rebuilt and hashed by `export_tree`, in the other process for big files.
    for number, raw in enumerate(lines, start=2):
        try:
            line = raw.decode()
            kind = line[0]
            if kind == "L":
                parts = line.split(" ")
                if len(parts) != 10 or '"' in line or "\\" in line or line[-1] != "\n" \
                        or parts[1] not in ("0", "1"):
                    raise ValueError("not `L <fraud> <accepted_at_ms> <channel> "
                                     "<contestant_id> <count> <vote_id> <vote_type> <voter> "
                                     "<received_ms>`")
                _, fraud, ms_text, channel, contestant, count_text, vote_id, vote_type, \
                    voter, received_text = parts
                ms, count, of_round = int(ms_text), int(count_text), round_id
                received = _received_value(received_text[:-1])
                leaves += 1
            elif kind == "J":
                (fraud, ms, channel, contestant, count, of_round, vote_id, vote_type, voter,
                 received), _ = _leaf_fields(line, round_id, received_in_leaf)
                leaves += 1
            elif kind == "C":
                ms, vote_id, _, voter, vote_type, count, same_episode = _other_fields(line)
            else:
                raise ValueError("not a leaf (L, J) nor another round's vote (C)")
        except (ValueError, IndexError) as error:
            problems.add(f"line {number}: {error}")
            continue
        if ms < previous_ms or (ms == previous_ms and vote_id <= previous_id and (
                vote_id < previous_id
                or _row_hash(line, round_id, received_in_leaf)
                < _row_hash(previous_line, round_id, received_in_leaf))):
            problems.add(f"line {number}: vote {vote_id} is out of ledger order")
        previous_ms, previous_id, previous_line = ms, vote_id, line
        if kind == "C":
            other_round(voter, vote_type, count, same_episode)
            continue
        if of_round != round_id:
            problems.add(f"line {number}: leaf {vote_id} is of another round")
        counted(vote_id, voter, vote_type, count, ms, contestant, channel, fraud == "1",
                received)
    return tally, leaves


def export_tree(path: str) -> tuple[int, bytes]:
    """(size, RFC 9162 root) of the tree over an export's leaves, in O(log n) memory: an L
    line's leaf is rebuilt from its fields, a J line's is its bytes. (A malformed line gives
    some other leaf, so another root: the recount reports the line.)"""
    tree = IncrementalRoot()
    sha256 = hashlib.sha256
    block: list[bytes] = []
    with open(path, "rb") as file:
        header = json.loads(file.readline())
        round_id = header["round"]["round_id"].encode()
        received_in_leaf = header["format"] == FORMAT
        j_fields = 2 if header["format"] == V2 else 3  # spaces before a J line's leaf
        for line in file:
            kind = line[0]
            if kind == 76:  # L
                parts = line[:-1].split(b" ")
                if len(parts) == 10 and received_in_leaf and parts[9] != b"-":
                    _, _, ms, channel, contestant, count, vote_id, vote_type, voter, received \
                        = parts
                    data = _LEAF_TEMPLATE_RECEIVED % (ms, channel, contestant, count, received,
                                                      round_id, vote_id, vote_type, voter)
                elif len(parts) in (9, 10):  # v2's lines have no <received_ms>
                    _, _, ms, channel, contestant, count, vote_id, vote_type, voter = parts[:9]
                    data = _LEAF_TEMPLATE % (ms, channel, contestant, count, round_id,
                                             vote_id, vote_type, voter)
                else:
                    data = line
            elif kind == 74:  # J: "J <fraud> <received_ms> <leaf_data>"
                data = line[:-1].split(b" ", j_fields)[-1]
            else:
                continue
            block.append(sha256(b"\x00" + data).digest())
            if len(block) == TREE_BLOCK:
                tree.add_subtree(perfect_root(block), TREE_BLOCK)
                block = []
    for leaf in block:
        tree.add(leaf)
    return tree.size, tree.root


def verify_export(path: Path, public_key_hex: str | None = None) -> Verdict:
    """Check an export offline: signature, root, size, order, and a recount by the round's
    rules against the published result."""
    with path.open("rb") as file, contextlib.ExitStack() as stack:
        try:
            header = json.loads(file.readline())
            if not isinstance(header, dict) or header.get("format") not in (FORMAT, V3, V2):
                raise ValueError
            digest, result, rnd = header["digest"], header["result"], header["round"]
            public_key = bytes.fromhex(public_key_hex or digest["public_key"])
            head = base64.b64decode(digest["signed_tree_head"])
            signature = base64.b64decode(digest["signature"])
            signed = parse_tree_head(head)
            stated = _header_rules(header)
        except (ValueError, KeyError, TypeError, AttributeError):
            return Verdict([f"not a {FORMAT} file (line 1 is not its header)"])
        tree: Callable[[], tuple[int, bytes]]
        if path.stat().st_size >= BACKGROUND_TREE_BYTES:  # hash on the other core
            pool = stack.enter_context(ProcessPoolExecutor(
                1, mp_context=multiprocessing.get_context("spawn")))
            tree = pool.submit(export_tree, str(path)).result
        else:
            def tree() -> tuple[int, bytes]:
                return export_tree(str(path))
        body = file.tell()
        received_in_leaf = header["format"] == FORMAT

        def recount_rows(suspects: set[int] | None) -> tuple[rules.LedgerTally, int]:
            file.seek(body)
            lines = _as_v3(file) if header["format"] == V2 else file
            return _recount(lines, stated, problems, suspects, received_in_leaf)

        problems = _Problems()
        tally, leaves = recount_rows(None)
        suspects = tally.repeated_hashes()
        if suspects:  # a vote id seen twice (or a 64-bit hash collision): count exactly
            problems = _Problems()
            tally, leaves = recount_rows(suspects)
        size, root = tree()
    if not verify_signature(public_key, head, signature):
        problems.add("the tree head's signature does not verify")
    if size != leaves:
        problems.add(f"{leaves} leaf lines but {size} leaves hashed")
    if signed.round_id != rnd["round_id"]:
        problems.add("the signed head is for another round")
    if signed.tree_size != size:
        problems.add(f"{size} leaves, the signed head says {signed.tree_size}")
    if signed.root_hash != root:
        problems.add(f"root {root.hex()} is not the signed root {signed.root_hash.hex()}")
    recount = tally.result()
    published = {k: int(v) for k, v in result["counts"].items()}
    if recount.counts != published:
        problems.add(f"recount {recount.counts} != published {published}")
    for name, mine in (("total_votes", recount.total_votes),
                       ("ledger_votes", recount.ledger_votes),
                       ("invalidated_votes", recount.invalidated_votes)):
        if int(result[name]) != mine:
            problems.add(f"{name}: recount {mine} != published {result[name]}")
    if sorted(result["winner_contestant_ids"]) != recount.winners():
        problems.add("the published winners are not the recount's")
    return Verdict(problems.all(), recount, dict(tally.rows_by_reason), leaves)


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


def export_root_hash(path: Path) -> bytes:
    """The signed root an export's header claims (a receipt is checked against it once the
    export verifies)."""
    with path.open("rb") as file:
        return bytes.fromhex(json.loads(file.readline())["digest"]["root_hash"])
