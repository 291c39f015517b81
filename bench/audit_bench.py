"""`televote audit verify` on a big round, without the database.

Writes a valid, signed export (results_svc/audit.py's format, with its line writers and
header) of a round of N votes whose ledger looks like a show night's: voters voting several
times over the round, in several channels, free, paid and premium-SMS votes, the same voters'
votes of an earlier round of the episode (using up part of their free quota) and of other
episodes (spending their paid credit), and every kind of vote the rules do not count: over
the free quota or the round's cap, paid beyond the balance, outside the window (early, late,
in an SMS grace period after the app lines closed), rejected by fraud_svc. The published
result is counted while writing by `rules.LedgerTally` (tests/unit/test_audit.py proves it equal
to the reference `rules.recount`); the tree head is signed with a throwaway Ed25519 key.

Then runs `televote audit verify` on it as an auditor would and prints its wall time,
votes/s, CPU time and peak RSS (the verifier and its hashing process together).

    python -m bench.audit_bench --votes 10000000
    python -m bench.audit_bench --votes 1000000 --out /tmp/round.export   # keep/reuse it
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil

from results_svc import audit, rules
from results_svc.final import FinalResult
from results_svc.merkle import IncrementalRoot, leaf_hash
from results_svc.signing import Signer, tree_head

CONTESTANTS = 12
FREE_QUOTA = 10
FREE_CAP = 8
VOTES_PER_MS = 3
def _uuid(rng: random.Random) -> str:
    """A random id in UUID form (faster than uuid.UUID)."""
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def write_export(path: Path, votes: int, seed: int = 6) -> rules.Recount:
    """A valid signed export of a round of `votes` leaves; returns the published result."""
    rng = random.Random(seed)
    round_id, episode_id = _uuid(rng), _uuid(rng)
    contestants = [_uuid(rng) for _ in range(CONTESTANTS)]
    # The app lines close when 98 % of the votes are in; web 2 s later, SMS after a 30 s
    # grace period; SMS votes keep coming (and the last ones are late).
    app_close_ms = opens = 1_764_000_000_000
    app_close_ms += votes // VOTES_PER_MS * 98 // 100
    close = {"APP": app_close_ms, "WEB": app_close_ms + 2_000, "SMS": app_close_ms + 30_000}
    round_rules = rules.RoundRules(round_id, tuple(contestants), opens, close, FREE_QUOTA,
                                   FREE_CAP)
    voters = [f"{rng.getrandbits(128):032x}" for _ in range(max(1, votes // 5))]
    credited = {v: rng.choice((0, 0, 2, 5, 20)) for v in voters}
    tally = rules.LedgerTally(round_rules, credited)
    tree = IncrementalRoot()

    body = path.with_name(path.name + ".body")
    with body.open("wb") as out:
        # Earlier rounds, before this one opened: a third of the voters used part of their
        # free quota in an earlier round of the episode, some spent paid credit elsewhere.
        earlier = []
        for voter in voters[: len(voters) // 3]:
            earlier.append((opens - rng.randrange(60, 3_600_000), _uuid(rng), voter, "FREE",
                            rng.randint(1, FREE_QUOTA), True))
            if credited[voter] and rng.random() < 0.5:
                earlier.append((opens - rng.randrange(60, 86_400_000), _uuid(rng), voter,
                                "PAID", rng.randint(1, credited[voter]), False))
        earlier.sort()
        for ms, vote_id, voter, vote_type, count, same_episode in earlier:
            out.write(audit.other_round_line(ms, vote_id, rng.randbytes(32), voter, vote_type,
                                             count, same_episode))
            tally.other_round(voter, vote_type, count, same_episode)

        # This round: VOTES_PER_MS votes a millisecond from a little before it opened.
        written, ms = 0, opens - 50
        while written < votes:
            batch = []
            for _ in range(min(VOTES_PER_MS, votes - written)):
                voter = voters[rng.randrange(len(voters))]
                roll = rng.random()
                if ms >= close["WEB"] or roll < 0.05:
                    channel, vote_type, count = "SMS", "PREMIUM_SMS", 1
                elif roll < 0.15:
                    channel, vote_type, count = "APP", "PAID", rng.randint(1, 5)
                else:
                    channel, vote_type, count = rng.choice(("APP", "APP", "WEB")), "FREE", 1
                contestant = contestants[rng.randrange(CONTESTANTS)]
                batch.append((_uuid(rng), voter,
                              channel, vote_type, count, contestant, rng.random() < 0.01))
            batch.sort()
            for vote_id, voter, channel, vote_type, count, contestant, fraud in batch:
                # The edge received it up to a few ms before its admission.
                received = ms - rng.randrange(4)
                out.write(audit.compact_leaf_line(fraud, ms, channel, contestant, count,
                                                  vote_id, vote_type, voter, received))
                tree.add(leaf_hash(audit.canonical_leaf(round_id, ms, channel, contestant,
                                                        count, vote_id, vote_type, voter,
                                                        received)))
                tally.leaf(vote_id, voter, vote_type, count, ms, contestant, channel, fraud,
                           received)
            written += len(batch)
            ms += 1

    result = tally.result()
    with tempfile.TemporaryDirectory() as keys:
        signer = Signer.load_or_create(Path(keys))
    signed_at = datetime.now(UTC).replace(microsecond=0)
    head = tree_head(round_id, tree.size, tree.root, signed_at)
    final = FinalResult(
        round_id=round_id, ledger_votes=result.ledger_votes,
        invalidated_votes=result.invalidated_votes, total_votes=result.total_votes,
        counts=result.counts, winner_ids=result.winners(), tree_size=tree.size,
        root_hash=tree.root, signed_tree_head=head, signature=signer.sign(head),
        key_id=signer.key_id, signed_at=signed_at, finalized_at=signed_at)
    with path.open("wb") as out, body.open("rb") as rows:
        out.write(audit.header_line(round_rules, episode_id, final, signer.public_key,
                                    credited))
        shutil.copyfileobj(rows, out, 16 * 2**20)
    body.unlink()
    print(f"wrote {path}: {votes} votes, {path.stat().st_size / 2**20:.0f} MiB; not counted "
          f"by reason {tally.rows_by_reason}", flush=True)
    return result


def time_verify(path: Path) -> dict[str, float]:
    """Run `televote audit verify` on `path`: wall and CPU seconds, peak RSS of its processes."""
    televote = Path(sys.executable).with_name("televote")
    started = time.monotonic()
    process = subprocess.Popen([str(televote), "audit", "verify", str(path)])
    watched = psutil.Process(process.pid)
    peak = 0
    while process.poll() is None:
        try:
            tree = [watched, *watched.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree))
        except psutil.Error:
            pass
        time.sleep(0.05)
    seconds = time.monotonic() - started
    if process.returncode != 0:
        raise SystemExit(f"televote audit verify failed ({process.returncode})")
    import resource
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "peak_rss_mib": peak / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--votes", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path,
                        help="keep the export here (and reuse it if it is already there)")
    options = parser.parse_args()
    scratch = None
    path = options.out
    if path is None:
        scratch = Path(tempfile.mkdtemp(prefix="audit-bench-"))
        path = scratch / "round.export"
    try:
        if not path.exists():
            started = time.monotonic()
            write_export(path, options.votes)
            print(f"export written in {time.monotonic() - started:.1f}s", flush=True)
        figures = time_verify(path)
        print(f"televote audit verify: {options.votes} votes in {figures['seconds']:.1f}s "
              f"({options.votes / figures['seconds']:,.0f} votes/s), CPU "
              f"{figures['cpu_seconds']:.1f}s, peak RSS {figures['peak_rss_mib']:.0f} MiB")
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
