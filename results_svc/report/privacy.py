"""Aggregates only: a bucket that describes fewer than `min_voters` voters is merged into
"other".

It applies to buckets that say who the voters are (a place, a profile segment, how many
votes they cast), each a partition of the voters, so merging keeps every sum exact. If
"other" itself stays under the threshold, the smallest remaining buckets join it until it
does not (or nothing is left to join): a small "other" would say as much as the buckets it
hides.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

OTHER = "other"

@dataclass(frozen=True)
class Bucket:
    #: A label, or a tuple of labels (e.g. country and province).
    key: Any
    voters: int
    votes: int


def merge_small(buckets: Sequence[Bucket], min_voters: int,
                other: Hashable = OTHER) -> list[Bucket]:
    """The buckets with at least `min_voters` voters, largest first, then "other" holding the
    rest (absent when nothing was merged)."""
    kept = sorted((b for b in buckets if b.voters > 0),
                  key=lambda b: (-b.voters, -b.votes, str(b.key)))
    small = [b for b in kept if b.voters < min_voters]
    kept = [b for b in kept if b.voters >= min_voters]
    if not small:
        return kept
    voters = sum(b.voters for b in small)
    votes = sum(b.votes for b in small)
    while voters < min_voters and kept:
        joined = kept.pop()
        voters += joined.voters
        votes += joined.votes
    return [*kept, Bucket(other, voters, votes)]


def grouped(buckets: Sequence[Bucket], group: Callable[[Bucket], Hashable],
            min_voters: int, other: Callable[[Hashable], Hashable]) -> list[Bucket]:
    """`merge_small` within each group (e.g. per dimension), groups in first-seen order."""
    groups: dict[Hashable, list[Bucket]] = {}
    for bucket in buckets:
        groups.setdefault(group(bucket), []).append(bucket)
    return [merged for name, members in groups.items()
            for merged in merge_small(members, min_voters, other(name))]
