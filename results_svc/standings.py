"""Pure arithmetic of results: percentages, ranks, rank changes, trends, display counts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from televote.results.v1 import results_types_pb2 as rtypes

Trend = rtypes.Trend


def percentage(count: int, total: int) -> float:
    """Share in percent rounded half-up to one decimal, exactly (integer arithmetic)."""
    if total <= 0:
        return 0.0
    tenths = (count * 1000 * 2 + total) // (2 * total)
    return tenths / 10


def ranks(counts: Mapping[str, int]) -> dict[str, int]:
    """Competition ranking: ties share a rank, the next rank skips (1, 1, 3)."""
    ordered = sorted(counts.values(), reverse=True)
    first_at: dict[int, int] = {}
    for position, value in enumerate(ordered, start=1):
        first_at.setdefault(value, position)
    return {contestant: first_at[value] for contestant, value in counts.items()}


def rank_change(previous: int | None, current: int) -> int:
    """Places moved up (positive) or down since the previous update; 0 when there was none."""
    if not previous:
        return 0
    return previous - current


def trend(recent: int, before: int, after_silence: int = Trend.TREND_STABLE) -> int:
    """The last 5 minutes (`recent`) against the 5 before: over +20 % rising fast, over +5 %
    rising, under -5 % falling, under -20 % falling fast, else stable. Exact at the bounds
    (integer arithmetic): +20 % is rising, not rising fast. No votes in the five minutes
    before is stable (the specification: there is nothing to compare), or `after_silence` when
    votes came since (RESULTS_TREND_AFTER_SILENCE)."""
    if before == 0:
        return after_silence if recent > 0 else Trend.TREND_STABLE
    if recent * 100 > before * 120:
        return Trend.TREND_RISING_FAST
    if recent * 100 > before * 105:
        return Trend.TREND_RISING
    if recent * 100 < before * 80:
        return Trend.TREND_FALLING_FAST
    if recent * 100 < before * 95:
        return Trend.TREND_FALLING
    return Trend.TREND_STABLE


def format_count(count: int) -> str:
    """987, 1.0K, 3.4K, 999.9K, 1.0M, 1.2M, 1.5B: one decimal (the specification's "1.2M /
    3.4K"), truncated, so a count is never shown larger than it is and one just under a unit
    boundary is 999.9K, never 1000.0K."""
    for size, suffix in ((1_000_000_000, "B"), (1_000_000, "M"), (1_000, "K")):
        if count >= size:
            whole, decimal = divmod(count * 10 // size, 10)
            return f"{whole}.{decimal}{suffix}"
    return str(count)


def trend_windows(minute_counts: Mapping[int, int], current_minute_ms: int,
                  minute_ms: int = 60_000) -> tuple[int, int]:
    """(recent, before) from per-minute buckets: the last 5 complete minutes and the 5 before
    (the current, partial minute is left out so a trend does not dip at every minute start)."""
    recent = sum(minute_counts.get(current_minute_ms - i * minute_ms, 0) for i in range(1, 6))
    before = sum(minute_counts.get(current_minute_ms - i * minute_ms, 0) for i in range(6, 11))
    return recent, before


def order_by_rank(contestants: Sequence[str], rank_of: Mapping[str, int]) -> list[str]:
    """By rank, ties in display order."""
    position = {c: i for i, c in enumerate(contestants)}
    return sorted(contestants, key=lambda c: (rank_of[c], position[c]))
