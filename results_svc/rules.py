"""The round's counting rules, as plain Python over exported rows: what an auditor runs.

results_svc computes the final result in SQL (`results_svc.final`); `televote audit verify`
and the tests recount an export with this module, and the two must agree (invariant 5).

A ledger row of the round counts unless, checked in this order:

1. DUPLICATE: another row with the same vote_id comes first in ledger order (cannot happen:
   the ledger is unique per (user, request id) and vote ids are fresh UUIDs; checked anyway);
2. NOT_A_CONTESTANT: the contestant is not one of the round's;
3. OUTSIDE_WINDOW: admitted (by the Redis server clock, `accepted_at_ms` in the leaf) before
   the round opened or at/after its channel's close, min(closes_at + channel offset, closed_at);
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
        elif not rules.opens_ms <= row.admitted_ms < rules.close_ms.get(row.channel,
                                                                         rules.opens_ms):
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
