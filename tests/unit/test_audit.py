"""The streaming audit verifier without the database: `rules.LedgerTally` judges every row of
random ledgers as the reference `rules.recount` does; the incremental Merkle root is RFC
9162's; exports written in results_svc/audit.py's format verify, and every kind of tampering
fails. (The export from a real round: tests/integration/test_audit_export.py.)"""

from __future__ import annotations

import dataclasses
import json
import random
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from bench import audit_bench
from results_svc import audit, merkle, rules
from results_svc.final import FinalResult
from results_svc.signing import Signer, tree_head

ROUND = "7a3c2a56-0000-4000-8000-000000000001"
CONTESTANTS = ("c1", "c2", "c3")
OPENS = 1000
CLOSE = {"APP": 1500, "WEB": 1520, "SMS": 1600}
CHANNELS = ("APP", "APP", "WEB", "SMS", "FAX")  # FAX: no such line, never inside the window
TYPES = ("FREE", "FREE", "FREE", "PAID", "PAID", "PREMIUM_SMS")


def _leaf(fields: dict[str, Any], canonical: bool = True) -> bytes:
    if canonical:
        return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return json.dumps(fields).encode()  # other key order, spaces: parsed as JSON


class Ledger:
    """A random ledger: the round's leaves (with their bytes) and other rounds' votes, as
    an export of format `fmt` would carry them (v4: a leaf holds its received_ms; v3: none
    does; v2: no vote has one and the round no receive lag)."""

    def __init__(self, seed: int, size: int, fmt: str = audit.FORMAT) -> None:
        rng = random.Random(seed)
        self.format = fmt
        self.rules = rules.RoundRules(ROUND, CONTESTANTS, OPENS, CLOSE,
                                      free_quota=rng.randint(2, 6),
                                      free_cap=rng.choice((0, 0, 2, 3)),
                                      receive_lag_ms=rng.choice((0, 5, 20)))
        if fmt == audit.V2:
            self.rules = dataclasses.replace(self.rules, receive_lag_ms=0)
        voters = [f"{n:032x}" for n in range(rng.randint(2, 8))] + [""]
        self.credited = {v: rng.choice((0, 1, 3, 8)) for v in voters if rng.random() < 0.8}
        self.rows: list[rules.Row] = []
        self.leaf_data: dict[tuple[str, bytes], bytes] = {}
        for n in range(size):
            ms = rng.randint(OPENS - 40, CLOSE["SMS"] + 20)
            ms = rng.choice((ms, ms, OPENS, OPENS - 1, CLOSE["APP"], CLOSE["APP"] - 1))
            vote_id = f"{rng.randrange(16**6):06x}-{n}"
            if self.rows and rng.random() < 0.05:  # the same vote id again
                vote_id = rng.choice(self.rows).vote_id
            voter = rng.choice(voters)
            vote_type = rng.choice(TYPES)
            count = rng.choice((1, 1, 1, 2, 5))
            if rng.random() < 0.25:  # another round's vote of the same voter
                same_episode = rng.random() < 0.7
                self.rows.append(rules.Row(
                    vote_id=vote_id, voter=voter, vote_type=vote_type, count=count,
                    admitted_ms=ms, leaf_hash=rng.randbytes(32), in_round=False,
                    same_episode=same_episode))
                continue
            fields: dict[str, Any] = {
                "accepted_at_ms": ms, "channel": rng.choice(CHANNELS),
                "contestant_id": rng.choice((*CONTESTANTS, "c9")), "count": count,
                "round_id": ROUND, "vote_id": vote_id, "vote_type": vote_type, "voter": voter}
            if not voter and rng.random() < 0.5:
                del fields["voter"]  # a leaf without a voter counts as voter ""
            # Received before its admission, by up to twice the lag, or not known.
            received = rng.choice((None, ms, ms - rng.randint(0, 40)))
            if fmt == audit.V2:
                received = None
            elif fmt == audit.FORMAT and received is not None and rng.random() < 0.95:
                fields["received_ms"] = received  # else a leaf from before leaves held it
            data = _leaf(fields, canonical=rng.random() < 0.9)
            leaf_hash = merkle.leaf_hash(data)
            self.leaf_data[(vote_id, leaf_hash)] = data
            self.rows.append(rules.Row(
                vote_id=vote_id, voter=voter, vote_type=vote_type, count=count,
                admitted_ms=ms, leaf_hash=leaf_hash,
                contestant_id=str(fields["contestant_id"]), channel=str(fields["channel"]),
                fraud_rejected=rng.random() < 0.1, received_ms=received))
        self.rows.sort(key=lambda row: row.order)

    def reference(self) -> rules.Recount:
        return rules.recount(self.rules, self.rows, self.credited)

    def lines(self) -> list[bytes]:
        out = []
        for row in self.rows:
            if row.in_round:
                data = self.leaf_data[(row.vote_id, row.leaf_hash)]
                if self.format == audit.FORMAT:
                    line = audit.leaf_line(ROUND, data, row.fraud_rejected, row.received_ms)
                else:  # older formats: <received_ms> stated beside a leaf that never holds it
                    line = audit.leaf_line(ROUND, data, row.fraud_rejected)
                    received = b"-" if row.received_ms is None else b"%d" % row.received_ms
                    line = (line[:-2] + received + b"\n" if line.startswith(b"L ")
                            else line[:4] + received + line[5:])
                    if self.format == audit.V2:  # no <received_ms> at all
                        line = line[:-3] + b"\n" if line.startswith(b"L ") else \
                            line[:4] + line[6:]
                out.append(line)
            else:
                out.append(audit.other_round_line(row.admitted_ms, row.vote_id, row.leaf_hash,
                                                  row.voter, row.vote_type, row.count,
                                                  row.same_episode))
        return out

    def write(self, path: Path, signer: Signer, lines: list[bytes] | None = None,
              result: rules.Recount | None = None) -> Path:
        """A signed export of this ledger, publishing its reference recount."""
        result = result or self.reference()
        leaves = [row.leaf_hash for row in self.rows if row.in_round]
        root = merkle.root_of(leaves)
        signed_at = datetime(2026, 11, 25, tzinfo=UTC)
        head = tree_head(ROUND, len(leaves), root, signed_at)
        final = FinalResult(
            round_id=ROUND, ledger_votes=result.ledger_votes,
            invalidated_votes=result.invalidated_votes, total_votes=result.total_votes,
            counts=result.counts, winner_ids=result.winners(), tree_size=len(leaves),
            root_hash=root, signed_tree_head=head, signature=signer.sign(head),
            key_id=signer.key_id, signed_at=signed_at, finalized_at=signed_at)
        header = json.loads(audit.header_line(self.rules, "episode", final, signer.public_key,
                                              self.credited))
        header["format"] = self.format
        if self.format == audit.V2:
            del header["round"]["receive_lag_ms"]
        path.write_bytes(json.dumps(header).encode() + b"\n"
                         + b"".join(self.lines() if lines is None else lines))
        return path


def _streamed(ledger: Ledger) -> tuple[rules.LedgerTally, dict[str, str], int]:
    """LedgerTally over the ledger in order, two passes if a vote id hash repeats (as
    `audit.verify_export` does); the reasons as `recount` reports them, and how many rows
    were judged invalid."""
    suspects = None
    while True:
        tally = rules.LedgerTally(ledger.rules, ledger.credited, suspects)
        invalid, judged_invalid = {}, 0
        for row in ledger.rows:
            if row.in_round:
                reason = tally.leaf(row.vote_id, row.voter, row.vote_type, row.count,
                                    row.admitted_ms, row.contestant_id, row.channel,
                                    row.fraud_rejected, row.received_ms)
                if reason is not None:
                    invalid[row.vote_id] = reason
                    judged_invalid += 1
            else:
                tally.other_round(row.voter, row.vote_type, row.count, row.same_episode)
        if suspects is not None:
            return tally, invalid, judged_invalid
        suspects = tally.repeated_hashes()
        if not suspects:
            return tally, invalid, judged_invalid


def test_the_streaming_tally_judges_random_ledgers_as_the_reference_does() -> None:
    seen_reasons: set[str] = set()
    for seed in range(400):
        ledger = Ledger(seed, random.Random(seed).randint(0, 60))
        reference = ledger.reference()
        tally, invalid, judged_invalid = _streamed(ledger)
        assert invalid == reference.invalid, seed
        streamed = tally.result()
        assert streamed.counts == reference.counts, seed
        assert (streamed.ledger_votes, streamed.invalidated_votes) == \
            (reference.ledger_votes, reference.invalidated_votes), seed
        assert sum(tally.rows_by_reason.values()) == judged_invalid, seed
        seen_reasons.update(reference.invalid.values())
    assert seen_reasons == {rules.DUPLICATE, rules.NOT_A_CONTESTANT, rules.OUTSIDE_WINDOW,
                            rules.FRAUD_REJECTED, rules.OVER_FREE_QUOTA,
                            rules.OVER_ROUND_FREE_CAP, rules.NO_BALANCE}


def test_a_repeated_vote_id_is_found_by_its_hash_and_judged_exactly() -> None:
    round_rules = rules.RoundRules("r", ("c",), 0, {"APP": 100}, 10, 0)
    tally = rules.LedgerTally(round_rules, {})
    for vote_id in ("a", "b", "a"):
        assert tally.leaf(vote_id, "u", "FREE", 1, 1, "c", "APP", False) is None
    suspects = tally.repeated_hashes()
    assert suspects == {hash("a")}
    exact = rules.LedgerTally(round_rules, {}, suspects)
    reasons = [exact.leaf(v, "u", "FREE", 1, 1, "c", "APP", False) for v in ("a", "b", "a")]
    assert reasons == [None, None, rules.DUPLICATE]
    assert exact.result().counts == {"c": 2} and exact.rows_by_reason == {rules.DUPLICATE: 1}


def test_the_incremental_root_is_rfc_9162s_by_leaves_and_by_blocks() -> None:
    for size in range(0, 70):
        leaves = [merkle.leaf_hash(str(i).encode()) for i in range(size)]
        one_by_one = merkle.IncrementalRoot()
        for leaf in leaves:
            one_by_one.add(leaf)
        assert one_by_one.root == merkle.reference_root(leaves), size
        by_blocks = merkle.IncrementalRoot()
        whole = size // 8 * 8
        for start in range(0, whole, 8):
            by_blocks.add_subtree(merkle.perfect_root(leaves[start:start + 8]), 8)
        for leaf in leaves[whole:]:
            by_blocks.add(leaf)
        assert (by_blocks.size, by_blocks.root) == (size, merkle.reference_root(leaves)), size
    with pytest.raises(AssertionError):
        merkle.IncrementalRoot().add_subtree(b"x" * 32, 3)


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> Signer:
    return Signer.load_or_create(tmp_path_factory.mktemp("key"))


def test_exports_of_random_ledgers_verify_with_the_reference_recount(
        signer: Signer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit, "TREE_BLOCK", 4)  # blocks and a remainder in small trees
    for seed in range(60):
        ledger = Ledger(seed, random.Random(seed).randint(0, 80))
        verdict = audit.verify_export(ledger.write(tmp_path / f"{seed}.export", signer),
                                      signer.public_key.hex())
        assert verdict.ok, (seed, verdict.problems)
        assert verdict.recount is not None
        assert verdict.recount.counts == ledger.reference().counts
        assert verdict.leaves == sum(row.in_round for row in ledger.rows)


@pytest.mark.parametrize("fmt", [audit.V3, audit.V2])
def test_exports_in_earlier_formats_still_verify(
        fmt: str, signer: Signer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An auditor's v3 or v2 file (leaves without received_ms; v2 without the column and the
    lag) verifies as it did, and tampering with it still fails."""
    monkeypatch.setattr(audit, "TREE_BLOCK", 4)
    for seed in range(30):
        ledger = Ledger(seed, random.Random(seed).randint(1, 80), fmt)
        verdict = audit.verify_export(ledger.write(tmp_path / f"{seed}.export", signer))
        assert verdict.ok, (fmt, seed, verdict.problems)
        assert verdict.recount is not None
        assert verdict.recount.counts == ledger.reference().counts
    lines = ledger.lines()
    first = next(i for i, line in enumerate(lines) if line.startswith(b"L "))
    parts = lines[first].split(b" ")
    parts[4] = b"c2" if parts[4] != b"c2" else b"c1"
    problems = audit.verify_export(ledger.write(tmp_path / "bad.export", signer, [
        *lines[:first], b" ".join(parts), *lines[first + 1:]])).problems
    assert any("not the signed root" in p for p in problems), problems


def test_a_votes_received_time_is_committed_by_the_signed_root(
        signer: Signer, tmp_path: Path) -> None:
    """v4: moving a vote's received_ms (into or out of the window) changes its leaf, so the
    root; a J line whose received_ms is not its leaf's is refused."""
    ledger = Ledger(11, 200)
    lines = ledger.lines()
    path = tmp_path / "moved.export"
    assert audit.verify_export(ledger.write(path, signer)).ok
    timed = next(i for i, line in enumerate(lines)
                 if line.startswith(b"L ") and not line.endswith(b" -\n"))
    parts = lines[timed][:-1].split(b" ")
    parts[9] = str(int(parts[9]) - 1).encode()
    problems = audit.verify_export(ledger.write(path, signer, [
        *lines[:timed], b" ".join(parts) + b"\n", *lines[timed + 1:]])).problems
    assert any("not the signed root" in p for p in problems), problems
    held = next(i for i, line in enumerate(lines)
                if line.startswith(b"J ") and b'"received_ms"' in line)
    fraud, received, data = lines[held][2:].split(b" ", 2)
    moved = b"J %s %d %s" % (fraud, int(received) + 1, data)
    problems = audit.verify_export(ledger.write(path, signer, [
        *lines[:held], moved, *lines[held + 1:]])).problems
    assert any(p.startswith(f"line {held + 2}:") and "is not its leaf's" in p
               for p in problems), problems


def test_a_big_export_hashes_its_tree_in_a_second_process(
        signer: Signer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit, "BACKGROUND_TREE_BYTES", 0)
    ledger = Ledger(7, 300)
    assert audit.verify_export(ledger.write(tmp_path / "big.export", signer)).ok
    lines = ledger.lines()
    last = max(i for i, line in enumerate(lines) if line.startswith(b"L "))
    parts = lines[last].split(b" ")
    parts[6] = parts[6][:-1] + b"x"  # another vote id: another leaf, another root
    problems = audit.verify_export(ledger.write(tmp_path / "bad.export", signer, [
        *lines[:last], b" ".join(parts), *lines[last + 1:]])).problems
    assert any("not the signed root" in p for p in problems), problems


def _problems(ledger: Ledger, signer: Signer, path: Path, lines: list[bytes],
              **options: Any) -> list[str]:
    return audit.verify_export(ledger.write(path, signer, lines, **options)).problems


def test_every_kind_of_tampering_fails(signer: Signer, tmp_path: Path) -> None:
    ledger = Ledger(3, 200)
    lines = ledger.lines()
    path = tmp_path / "tampered.export"
    assert _problems(ledger, signer, path, lines) == []
    leaves = [i for i, line in enumerate(lines) if line[:2] in (b"L ", b"J ")]
    compact = [i for i in leaves if lines[i].startswith(b"L ")]

    # Two rows swapped: out of ledger order.
    swapped = [lines[1], lines[0], *lines[2:]]
    assert any("out of ledger order" in p for p in _problems(ledger, signer, path, swapped))

    # A vote moved to another contestant: its leaf, so the root, changes.
    first = compact[0]
    parts = lines[first].split(b" ")
    parts[4] = b"c2" if parts[4] != b"c2" else b"c1"
    problems = _problems(ledger, signer, path,
                         [*lines[:first], b" ".join(parts), *lines[first + 1:]])
    assert any("not the signed root" in p for p in problems), problems

    # A counted vote marked fraudulent (outside the tree): the recount differs.
    counted = next(i for i in compact if lines[i].startswith(b"L 0 ")
                   and lines[i].split(b" ")[6].decode() not in ledger.reference().invalid)
    flipped = [*lines[:counted], b"L 1 " + lines[counted][4:], *lines[counted + 1:]]
    assert any("recount" in p for p in _problems(ledger, signer, path, flipped))

    # Another round's vote inflated: a later vote of that voter goes over quota or balance.
    reference = ledger.reference()
    other = next(
        i for i, line in enumerate(lines) if line.startswith(b"C ")
        and line.split(b" ")[5] in (b"PAID", b"FREE") and line.endswith(b" 1\n")
        and any(later.in_round and later.vote_id not in reference.invalid
                and later.voter == line.split(b" ")[4].decode()
                and later.vote_type == line.split(b" ")[5].decode()
                for later in ledger.rows[i + 1:]))
    parts = lines[other].split(b" ")
    parts[6] = b"100"
    inflated = [*lines[:other], b" ".join(parts), *lines[other + 1:]]
    assert any("recount" in p for p in _problems(ledger, signer, path, inflated))
    # And a vote of another round passed off as one of this round's.
    foreign = next(i for i in leaves if lines[i].startswith(b"J "))
    problems = _problems(ledger, signer, path, [
        *lines[:foreign], lines[foreign].replace(ROUND.encode(), b"another-round"),
        *lines[foreign + 1:]])
    assert any("of another round" in p for p in problems), problems
    # Malformed leaf lines.
    for bad in (lines[first].replace(b"L 0", b"L 2", 1).replace(b"L 1", b"L 2", 1),
                lines[first][:-1] + b" extra\n", lines[first].replace(b" c", b' "c', 1),
                b"J 0 {not json}\n"):
        problems = _problems(ledger, signer, path, [*lines[:first], bad, *lines[first + 1:]])
        assert any(p.startswith(f"line {first + 2}:") for p in problems), (bad, problems)

    # The last vote dropped; a line that is no row; the published result changed.
    assert any("leaves, the signed head says" in p or "signed root" in p
               for p in _problems(ledger, signer, path, lines[:leaves[-1]]
                                  + lines[leaves[-1] + 1:]))
    problems = _problems(ledger, signer, path, [*lines, b"X what\n"])
    assert any(p.startswith(f"line {len(lines) + 2}:") for p in problems), problems
    reference = ledger.reference()
    reference.counts["c1"] += 1
    assert any("recount" in p for p in _problems(ledger, signer, path, lines,
                                                   result=reference))

    # Another key, or a file that is not an export.
    assert "signature does not verify" in " ".join(audit.verify_export(
        ledger.write(path, signer), Signer.load_or_create(tmp_path / "other").public_key.hex()
    ).problems)
    path.write_text('{"format": "televote-ledger-export/v1"}\n')
    assert audit.verify_export(path).problems == [
        f"not a {audit.FORMAT} file (line 1 is not its header)"]
    # A header of this format that does not state the round's rules: a verdict, not a crash.
    exported = ledger.write(path, signer).read_bytes().split(b"\n", 1)
    header = json.loads(exported[0])
    del header["round"]["receive_lag_ms"]
    path.write_bytes(json.dumps(header).encode() + b"\n" + exported[1])
    assert audit.verify_export(path).problems == [
        f"not a {audit.FORMAT} file (line 1 is not its header)"]


def test_the_benchs_export_is_valid_and_its_result_is_the_reference_recount(
        tmp_path: Path) -> None:
    """bench/audit_bench.py's ledger (every invalidation but duplicates, several rounds):
    it verifies, and the reference recount of its rows is its published result."""
    path = tmp_path / "bench.export"
    published = audit_bench.write_export(path, 3_000)
    verdict = audit.verify_export(path)
    assert verdict.ok, verdict.problems
    assert set(verdict.rows_by_reason) == {
        rules.OUTSIDE_WINDOW, rules.FRAUD_REJECTED, rules.OVER_FREE_QUOTA,
        rules.OVER_ROUND_FREE_CAP, rules.NO_BALANCE}
    with path.open("rb") as file:
        header = json.loads(file.readline())
        rows = []
        for line in file:
            if line.startswith(b"L "):
                _, fraud, ms, channel, contestant, count, vote_id, vote_type, voter, \
                    received = line.decode().split()
                data = audit.canonical_leaf(header["round"]["round_id"], int(ms), channel,
                                            contestant, int(count), vote_id, vote_type, voter,
                                            int(received))
                leaf = json.loads(data)  # the leaf vote_svc would have written
                assert data == _leaf(leaf)
                rows.append(rules.Row(
                    vote_id=leaf["vote_id"], voter=leaf["voter"], vote_type=leaf["vote_type"],
                    count=leaf["count"], admitted_ms=leaf["accepted_at_ms"],
                    leaf_hash=merkle.leaf_hash(data), contestant_id=leaf["contestant_id"],
                    channel=leaf["channel"], fraud_rejected=fraud == "1",
                    received_ms=leaf["received_ms"]))
            else:
                _, ms, vote_id, hashed, voter, vote_type, count, same = line.split()
                rows.append(rules.Row(
                    vote_id=vote_id.decode(), voter=voter.decode(),
                    vote_type=vote_type.decode(), count=int(count), admitted_ms=int(ms),
                    leaf_hash=bytes.fromhex(hashed.decode()), in_round=False,
                    same_episode=same == b"1"))
    rnd = header["round"]
    reference = rules.recount(
        rules.RoundRules(rnd["round_id"], tuple(rnd["contestant_ids"]), rnd["opens_at_ms"],
                         rnd["close_ms"], rnd["free_vote_quota"], rnd["free_vote_cap"],
                         rnd["receive_lag_ms"]),
        rows, header["credited"])
    assert reference.counts == published.counts == header["result"]["counts"]
    assert reference.invalidated_votes == published.invalidated_votes
