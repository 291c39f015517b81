"""Unit tests of results arithmetic, the RFC 9162 tree and the counting rules."""

from __future__ import annotations

import hashlib

import pytest

from results_svc import merkle, rules
from results_svc import standings as calc
from results_svc.config import ResultsConfig
from televote.results.v1 import results_types_pb2 as rtypes


@pytest.mark.parametrize(("count", "total", "expected"), [
    (0, 0, 0.0), (1, 3, 33.3), (2, 3, 66.7), (1, 8, 12.5), (1, 16, 6.3), (1, 1, 100.0),
    (1, 2000, 0.1), (1, 2001, 0.0), (1, 1999, 0.1)])
def test_percentages_round_half_up_to_one_decimal(count: int, total: int,
                                                  expected: float) -> None:
    assert calc.percentage(count, total) == expected


def test_ranks_share_ties_and_skip_and_rank_changes_count_places_moved() -> None:
    assert calc.ranks({"a": 5, "b": 9, "c": 5, "d": 1}) == {"b": 1, "a": 2, "c": 2, "d": 4}
    assert calc.ranks({"a": 0, "b": 0}) == {"a": 1, "b": 1}
    assert calc.rank_change(3, 1) == 2
    assert calc.rank_change(1, 2) == -1
    assert calc.rank_change(None, 1) == 0
    assert calc.order_by_rank(["a", "b", "c"], {"a": 2, "b": 1, "c": 2}) == ["b", "a", "c"]


@pytest.mark.parametrize(("recent", "before", "expected"), [
    (121, 100, rtypes.TREND_RISING_FAST), (120, 100, rtypes.TREND_RISING),
    (106, 100, rtypes.TREND_RISING), (105, 100, rtypes.TREND_STABLE),
    (95, 100, rtypes.TREND_STABLE), (94, 100, rtypes.TREND_FALLING),
    (80, 100, rtypes.TREND_FALLING), (79, 100, rtypes.TREND_FALLING_FAST),
    # The seed: no votes in the five minutes before is STABLE, however many came since.
    (1, 0, rtypes.TREND_STABLE), (10_000, 0, rtypes.TREND_STABLE), (0, 0, rtypes.TREND_STABLE),
    (0, 5, rtypes.TREND_FALLING_FAST)])
def test_trend_classes_at_their_boundaries(recent: int, before: int, expected: int) -> None:
    assert calc.trend(recent, before) == expected


def test_a_deployment_may_show_votes_after_silence_as_rising_fast() -> None:
    assert ResultsConfig.model_fields["results_trend_after_silence"].default == "stable"
    assert calc.trend(1, 0, rtypes.TREND_RISING_FAST) == rtypes.TREND_RISING_FAST
    assert calc.trend(0, 0, rtypes.TREND_RISING_FAST) == rtypes.TREND_STABLE


def test_trend_windows_take_the_last_five_complete_minutes_against_the_five_before() -> None:
    m = 60_000
    now = 100 * m
    buckets = {now: 1000, now - m: 1, now - 5 * m: 2, now - 6 * m: 4, now - 10 * m: 8,
               now - 11 * m: 16}
    assert calc.trend_windows(buckets, now) == (3, 12)


@pytest.mark.parametrize(("count", "text"), [
    (0, "0"), (987, "987"), (999, "999"), (1000, "1.0K"), (1050, "1.0K"), (1100, "1.1K"),
    (3_456, "3.4K"), (12_345, "12.3K"), (999_949, "999.9K"), (999_999, "999.9K"),
    (1_000_000, "1.0M"), (1_234_567, "1.2M"), (1_999_999, "1.9M"), (999_999_999, "999.9M"),
    (1_500_000_000, "1.5B")])
def test_formatted_counts_have_one_decimal_and_never_reach_the_next_unit(
        count: int, text: str) -> None:
    assert calc.format_count(count) == text


def _leaves(n: int) -> list[bytes]:
    return [merkle.leaf_hash(f"leaf {i}".encode()) for i in range(n)]


def test_tree_root_is_rfc_9162_mth_for_every_size_and_every_proof_verifies() -> None:
    assert merkle.root_of([]) == hashlib.sha256(b"").digest()
    for n in range(1, 40):
        leaves = _leaves(n)
        tree = merkle.MerkleTree(leaves)
        assert tree.root == merkle.reference_root(leaves), n
        for index in range(n):
            path = tree.inclusion_proof(index)
            assert merkle.verify_inclusion(leaves[index], index, n, path, tree.root)
            assert not merkle.verify_inclusion(merkle.leaf_hash(b"changed"), index, n, path,
                                               tree.root)
            if n > 1:
                assert not merkle.verify_inclusion(leaves[index], (index + 1) % n, n, path,
                                                   tree.root)


def test_rfc_6962_leaf_and_node_hashes() -> None:
    assert merkle.leaf_hash(b"") == hashlib.sha256(b"\x00").digest()
    a, b = merkle.leaf_hash(b"a"), merkle.leaf_hash(b"b")
    assert merkle.root_of([a, b]) == hashlib.sha256(b"\x01" + a + b).digest()
    # Three leaves: split at 2, the third is carried up, not duplicated.
    c = merkle.leaf_hash(b"c")
    assert merkle.root_of([a, b, c]) == merkle.node_hash(merkle.node_hash(a, b), c)


def _row(vote_id: str, voter: str, vote_type: str, count: int, ms: int,
         contestant: str = "c1", channel: str = "APP", **extra: object) -> rules.Row:
    return rules.Row(vote_id=vote_id, voter=voter, vote_type=vote_type, count=count,
                     admitted_ms=ms, leaf_hash=vote_id.encode(), contestant_id=contestant,
                     channel=channel, **extra)  # type: ignore[arg-type]


def test_recount_applies_window_quota_cap_balance_fraud_and_duplicates() -> None:
    round_rules = rules.RoundRules("r", ("c1", "c2"), 1000,
                                   {"APP": 2000, "WEB": 2000, "SMS": 2500}, free_quota=5,
                                   free_cap=0)
    rows = [
        _row("v01", "u1", "FREE", 3, 1000),                     # counts
        _row("v02", "u1", "FREE", 2, 1100, "c2"),               # counts: quota 5 reached
        _row("v03", "u1", "FREE", 1, 1200),                     # over quota
        _row("v04", "u2", "FREE", 1, 999),                      # before the open
        _row("v05", "u2", "FREE", 1, 2000),                     # at the app close
        _row("v06", "u2", "PREMIUM_SMS", 1, 2400, channel="SMS"),  # inside the SMS grace
        _row("v07", "u3", "PAID", 4, 1500),                     # covered (credited 5)
        _row("v08", "u3", "PAID", 2, 1600),                     # not covered
        _row("v09", "u4", "FREE", 1, 1500, fraud_rejected=True),
        _row("v10", "u4", "FREE", 1, 1501, "c9"),               # not a contestant
        _row("v11", "u5", "FREE", 1, 1000, in_round=False),     # earlier round, same episode
        _row("v12", "u5", "FREE", 5, 1700),                     # 6 > 5 with the earlier one
    ]
    result = rules.recount(round_rules, rows, {"u3": 5})
    assert result.counts == {"c1": 3 + 1 + 4, "c2": 2}
    assert result.invalid == {
        "v03": rules.OVER_FREE_QUOTA, "v04": rules.OUTSIDE_WINDOW, "v05": rules.OUTSIDE_WINDOW,
        "v08": rules.NO_BALANCE, "v09": rules.FRAUD_REJECTED, "v10": rules.NOT_A_CONTESTANT,
        "v12": rules.OVER_FREE_QUOTA}
    assert result.ledger_votes == 3 + 2 + 1 + 1 + 1 + 1 + 4 + 2 + 1 + 1 + 5
    assert result.total_votes == 10
    assert result.winners() == ["c1"]
    capped = rules.recount(rules.RoundRules("r", ("c1",), 0, {"APP": 10**6}, 10, 2),
                           [_row("a", "u", "FREE", 2, 1), _row("b", "u", "FREE", 1, 2)], {})
    assert capped.invalid == {"b": rules.OVER_ROUND_FREE_CAP}


def test_a_stream_message_built_from_the_shared_view_is_a_stream_results_response() -> None:
    from results_svc.live import FULL, HIDDEN, STANDINGS, Update
    from runtime.access import Role
    from televote.results.v1 import results_service_pb2 as rpb
    full = rpb.RoundResults(round_id="r", total_votes=7)
    full.standings.add(contestant_id="c", count=7, rank=1)
    hidden = rpb.RoundResults(round_id="r")
    update = Update({FULL: full, STANDINGS: full, HIDDEN: hidden}, HIDDEN, False)
    for sequence in (1, 127, 128, 300, 2**40):
        as_operator = rpb.StreamResultsResponse.FromString(
            update.stream_message(Role.OPERATOR, sequence))
        assert as_operator.sequence == sequence and as_operator.results == full
        as_voter = rpb.StreamResultsResponse.FromString(
            update.stream_message(Role.VOTER, sequence))
        assert as_voter.results == hidden


def test_proofs_from_block_roots_and_one_block_equal_the_full_trees() -> None:
    from results_svc.merkle import MerkleTree, TopTree, leaf_hash
    for size in (1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 31, 33, 64, 100):
        leaves = [leaf_hash(str(i).encode()) for i in range(size)]
        full = MerkleTree(leaves)
        for block in (1, 2, 4, 8):
            top = TopTree(TopTree.block_roots_of(full, block), block, size)
            assert top.root == full.root
            for index in range(size):
                start = index // block * block
                assert top.inclusion_proof(index, leaves[start:start + block]) \
                    == full.inclusion_proof(index), (size, block, index)


def test_a_row_is_judged_by_when_the_edge_received_it_within_the_receive_lag() -> None:
    round_rules = rules.RoundRules("r", ("c1",), 1000, {"APP": 2000}, free_quota=10,
                                   free_cap=0, receive_lag_ms=300)
    rows = [
        _row("v1", "u1", "FREE", 1, 2100, received_ms=1950),  # queued across the close
        _row("v2", "u2", "FREE", 1, 2400, received_ms=1900),  # queued past the lag
        _row("v3", "u3", "FREE", 1, 1999, received_ms=2500),  # a received time after
        _row("v4", "u4", "FREE", 1, 1100, received_ms=990),   # received before the open
        _row("v5", "u5", "FREE", 1, 2000),                    # no received time: admission
    ]
    result = rules.recount(round_rules, rows, {})
    assert result.counts == {"c1": 2}
    assert result.invalid == {"v2": rules.OUTSIDE_WINDOW, "v4": rules.OUTSIDE_WINDOW,
                              "v5": rules.OUTSIDE_WINDOW}
    assert rules.judged_ms(2250, 1900, 300) == 1950  # as if received at the lag's start
    assert rules.judged_ms(1999, 2500, 300) == 1999
