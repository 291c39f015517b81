"""The round's counting rules, as plain Python over exported rows: what an auditor runs.

results_svc computes the final result in SQL (`results_svc.final`); `televote audit verify`
and the tests recount an export with this module, and the two must agree (invariant 5).

A ledger row of the round counts unless, checked in this order:

1. DUPLICATE: another row with the same vote_id comes first in ledger order (cannot happen:
   the ledger is unique per (user, request id) and vote ids are fresh UUIDs; checked anyway);
2. NOT_A_CONTESTANT: the contestant is not one of the round's;
3. OUTSIDE_WINDOW: received (`judged_ms`: when the edge received it, but never earlier than
   the round's `receive_lag_ms` before it was admitted by the Redis server clock,
   `accepted_at_ms` in the leaf, and never after that) before the round opened or at/after its
   channel's close, min(closes_at + channel offset, closed_at);
4. FRAUD_REJECTED: fraud_svc rejected it (a `fraud_rejections` row for the vote or the user);
5. OVER_FREE_QUOTA / OVER_ROUND_FREE_CAP: a FREE vote whose voter's running total of FREE
   votes in the episode (every ledger row, any round, in ledger order, including this one)
   exceeds the episode's quota, or whose running total in this round exceeds the round's cap;
6. NO_BALANCE: a PAID vote whose voter's running total of PAID votes (every ledger row,
   every round) exceeds the paid votes ever credited to the voter.

Ledger order is (accepted_at_ms, vote_id, leaf hash); it is also the order of the Merkle
tree's leaves. Counts are vote counts (a row of count 5 is 5 votes).
"""

from __future__ import annotations

from array import array
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

DUPLICATE = "DUPLICATE"
NOT_A_CONTESTANT = "NOT_A_CONTESTANT"
OUTSIDE_WINDOW = "OUTSIDE_WINDOW"
FRAUD_REJECTED = "FRAUD_REJECTED"
OVER_FREE_QUOTA = "OVER_FREE_QUOTA"
OVER_ROUND_FREE_CAP = "OVER_ROUND_FREE_CAP"
NO_BALANCE = "NO_BALANCE"


@dataclass(frozen=True)
class RoundRules:
    round_id: str
    contestant_ids: tuple[str, ...]
    opens_ms: int
    #: channel ("APP", "WEB", "SMS") -> first ms at which it no longer takes votes
    close_ms: Mapping[str, int]
    free_quota: int
    free_cap: int
    #: How long after the edge received a vote it may still be admitted as received then.
    receive_lag_ms: int = 0


def judged_ms(admitted_ms: int, received_ms: int | None, receive_lag_ms: int) -> int:
    """The time a row's window is judged by: when the edge received the vote, bounded to the
    `receive_lag_ms` before its admission (a vote that waited longer in our queues is judged
    as if received then) and never after its admission. The admission script judged it so
    (vote_svc/admission.py); `judging.judged_ms` says the same in SQL."""
    received = admitted_ms if received_ms is None else min(received_ms, admitted_ms)
    return max(received, admitted_ms - receive_lag_ms)


@dataclass(frozen=True)
class Row:
    """A ledger row: one of the round's leaves, or (in_round False) another round's vote of
    the same voter that counts towards their quota or balance."""

    vote_id: str
    voter: str
    vote_type: str
    count: int
    admitted_ms: int
    leaf_hash: bytes
    contestant_id: str = ""
    channel: str = ""
    in_round: bool = True
    same_episode: bool = True
    fraud_rejected: bool = False
    received_ms: int | None = None

    @property
    def order(self) -> tuple[int, str, bytes]:
        return (self.admitted_ms, self.vote_id, self.leaf_hash)


@dataclass
class Recount:
    counts: dict[str, int]
    #: vote_id -> reason, for the round's rows that do not count
    invalid: dict[str, str] = field(default_factory=dict)
    ledger_votes: int = 0
    invalidated_votes: int = 0

    @property
    def total_votes(self) -> int:
        return self.ledger_votes - self.invalidated_votes

    def winners(self) -> list[str]:
        return winners(self.counts)


def winners(counts: Mapping[str, int]) -> list[str]:
    best = max(counts.values(), default=0)
    if best == 0:
        return []
    return sorted(c for c, n in counts.items() if n == best)


def recount(rules: RoundRules, rows: Iterable[Row], credited: Mapping[str, int]) -> Recount:
    ordered = sorted(rows, key=lambda row: row.order)
    contestants = set(rules.contestant_ids)
    result = Recount(counts=dict.fromkeys(rules.contestant_ids, 0))
    free_episode: dict[str, int] = defaultdict(int)
    free_round: dict[str, int] = defaultdict(int)
    paid: dict[str, int] = defaultdict(int)
    seen: set[str] = set()
    for row in ordered:
        if row.vote_type == "FREE" and row.same_episode:
            free_episode[row.voter] += row.count
            if row.in_round:
                free_round[row.voter] += row.count
        elif row.vote_type == "PAID":
            paid[row.voter] += row.count
        if not row.in_round:
            continue
        result.ledger_votes += row.count
        reason = None
        if row.vote_id in seen:
            reason = DUPLICATE
        elif row.contestant_id not in contestants:
            reason = NOT_A_CONTESTANT
        elif not rules.opens_ms <= judged_ms(row.admitted_ms, row.received_ms,
                                             rules.receive_lag_ms) < rules.close_ms.get(
                row.channel, rules.opens_ms):
            reason = OUTSIDE_WINDOW
        elif row.fraud_rejected:
            reason = FRAUD_REJECTED
        elif row.vote_type == "FREE" and free_episode[row.voter] > rules.free_quota:
            reason = OVER_FREE_QUOTA
        elif (row.vote_type == "FREE" and rules.free_cap > 0
              and free_round[row.voter] > rules.free_cap):
            reason = OVER_ROUND_FREE_CAP
        elif row.vote_type == "PAID" and paid[row.voter] > credited.get(row.voter, 0):
            reason = NO_BALANCE
        seen.add(row.vote_id)
        if reason is None:
            result.counts[row.contestant_id] += row.count
        else:
            result.invalid[row.vote_id] = reason
            result.invalidated_votes += row.count
    return result


class LedgerTally:
    """`recount` for ledgers too big to hold: rows are fed one at a time, in ledger order (the
    caller checks the order), and only running totals per voter are kept, never the rows.
    `televote audit verify` recounts exports with it; tests/unit/test_audit.py checks that it
    judges every row of random ledgers as `recount` does.

    Duplicates without a set of every vote id: a first pass keeps a 64-bit hash of each vote
    id (8 bytes a row); if `repeated_hashes()` finds any, the caller counts again with those
    hashes as `suspects`, and then only the vote ids with a suspect hash are remembered,
    exactly. The result's `invalid` is left empty (it would be a row per invalid vote);
    `rows_by_reason` counts them instead."""

    def __init__(self, rules: RoundRules, credited: Mapping[str, int],
                 suspects: set[int] | None = None) -> None:
        self.counts = dict.fromkeys(rules.contestant_ids, 0)
        self.ledger_votes = 0
        self.invalidated_votes = 0
        self.rows_by_reason: dict[str, int] = {}
        self._contestants = frozenset(rules.contestant_ids)
        self._opens = rules.opens_ms
        self._close = dict(rules.close_ms)
        self._quota = rules.free_quota
        self._cap = rules.free_cap
        self._lag = rules.receive_lag_ms
        self._credited = credited
        #: voter -> FREE votes in the episode, FREE votes in the round, PAID votes so far
        self._free_episode: dict[str, int] = {}
        self._free_round: dict[str, int] = {}
        self._paid: dict[str, int] = {}
        self._suspects = suspects
        self._seen: set[str] = set()
        self._id_hashes = array("q")

    def other_round(self, voter: str, vote_type: str, count: int, same_episode: bool) -> None:
        """Another round's vote of one of the round's voters (quota and balance only)."""
        if vote_type == "FREE":
            if same_episode:
                self._free_episode[voter] = self._free_episode.get(voter, 0) + count
        elif vote_type == "PAID":
            self._paid[voter] = self._paid.get(voter, 0) + count

    def leaf(self, vote_id: str, voter: str, vote_type: str, count: int, admitted_ms: int,
             contestant_id: str, channel: str, fraud_rejected: bool,
             received_ms: int | None = None) -> str | None:
        """One of the round's rows; returns why it does not count (None: it counts)."""
        free = round_free = paid = 0
        if vote_type == "FREE":
            free = self._free_episode[voter] = self._free_episode.get(voter, 0) + count
            if self._cap > 0:
                round_free = self._free_round[voter] = self._free_round.get(voter, 0) + count
        elif vote_type == "PAID":
            paid = self._paid[voter] = self._paid.get(voter, 0) + count
        self.ledger_votes += count
        if self._suspects is None:  # a first pass: only remember the id's hash
            self._id_hashes.append(hash(vote_id))
            repeated = False
        else:
            repeated = self._repeated(vote_id)
        reason = None
        if repeated:
            reason = DUPLICATE
        elif contestant_id not in self._contestants:
            reason = NOT_A_CONTESTANT
        elif not self._opens <= judged_ms(admitted_ms, received_ms, self._lag) < \
                self._close.get(channel, self._opens):
            reason = OUTSIDE_WINDOW
        elif fraud_rejected:
            reason = FRAUD_REJECTED
        elif vote_type == "FREE" and free > self._quota:
            reason = OVER_FREE_QUOTA
        elif vote_type == "FREE" and self._cap > 0 and round_free > self._cap:
            reason = OVER_ROUND_FREE_CAP
        elif vote_type == "PAID" and paid > self._credited.get(voter, 0):
            reason = NO_BALANCE
        if reason is None:
            self.counts[contestant_id] += count
        else:
            self.invalidated_votes += count
            self.rows_by_reason[reason] = self.rows_by_reason.get(reason, 0) + 1
        return reason

    def _repeated(self, vote_id: str) -> bool:
        assert self._suspects is not None
        if hash(vote_id) not in self._suspects:
            return False
        if vote_id in self._seen:
            return True
        self._seen.add(vote_id)
        return False

    def repeated_hashes(self) -> set[int]:
        """The vote-id hashes seen more than once in a first pass (empty: no duplicates)."""
        import numpy as np

        hashes = np.sort(np.frombuffer(self._id_hashes, dtype=np.int64))
        return set(hashes[1:][hashes[1:] == hashes[:-1]].tolist())

    def result(self) -> Recount:
        return Recount(counts=dict(self.counts), ledger_votes=self.ledger_votes,
                       invalidated_votes=self.invalidated_votes)
