"""The report's pure parts: the privacy merge, places, profile validation."""

from __future__ import annotations

import grpc
import pytest

from results_svc.report.places import locate
from results_svc.report.privacy import OTHER, Bucket, grouped, merge_small
from runtime.errors import ApiError
from runtime.places import NAMES, province_name
from vote_svc.profiles import Profile, validate


def test_buckets_under_the_threshold_are_merged_into_other_keeping_every_sum() -> None:
    buckets = [Bucket("a", 50, 70), Bucket("b", 12, 12), Bucket("c", 4, 9), Bucket("d", 7, 7)]
    merged = merge_small(buckets, 10)
    assert merged == [Bucket("a", 50, 70), Bucket("b", 12, 12), Bucket(OTHER, 11, 16)]
    assert sum(b.voters for b in merged) == 73 and sum(b.votes for b in merged) == 98


def test_a_small_other_takes_the_smallest_kept_bucket_until_it_is_not_small() -> None:
    merged = merge_small([Bucket("a", 50, 50), Bucket("b", 12, 20), Bucket("c", 3, 3)], 10)
    assert merged == [Bucket("a", 50, 50), Bucket(OTHER, 15, 23)]
    assert merge_small([Bucket("c", 3, 3)], 10) == [Bucket(OTHER, 3, 3)]  # nothing to join
    assert merge_small([], 10) == []
    assert merge_small([Bucket("a", 10, 10)], 10) == [Bucket("a", 10, 10)]


def test_each_dimension_is_merged_on_its_own() -> None:
    buckets = [Bucket(("age", "18-24"), 20, 20), Bucket(("age", "55+"), 2, 2),
               Bucket(("age", "25-34"), 9, 9), Bucket(("gender", "female"), 31, 31)]
    merged = grouped(buckets, lambda b: b.key[0], 10, lambda d: (d, OTHER))
    assert merged == [Bucket(("age", "18-24"), 20, 20), Bucket(("age", OTHER), 11, 11),
                      Bucket(("gender", "female"), 31, 31)]


def test_places_come_from_gps_and_never_from_a_guess() -> None:
    assert locate([(11.5564, 104.9282), (13.3633, 103.8564), (10.61, 103.52),
                   (48.8566, 2.3522), (None, None), (None, 104.9),
                   (48, 2)]) == [  # whole degrees come as ints from JSON
        ("KH", "Phnom Penh"), ("KH", "Siem Reap"), ("KH", "Preah Sihanouk"), ("FR", ""),
        ("unknown", ""), ("unknown", ""), ("FR", "")]


def test_every_gazetteer_spelling_of_a_province_maps_to_its_iso_name() -> None:
    assert len(NAMES) == 25
    for spelling, name in (("Kampong Speu Province", "Kampong Speu"),
                           ("Mondolkiri", "Mondulkiri"), ("Ŏtâr Méanchey", "Oddar Meanchey"),
                           ("phnom penh", "Phnom Penh")):
        assert province_name(spelling) == name
    assert province_name("Bangkok") is None


def test_a_profile_is_what_the_voter_said_or_invalid_request() -> None:
    assert validate("", "", "") == Profile()
    assert validate("18-24", "female", "Siem Reap") == Profile("18-24", "female", "Siem Reap")
    assert validate("55+", "other", "abroad").province == "abroad"
    with pytest.raises(ApiError) as refused:
        validate("teen", "f", "Atlantis")
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.reason == "INVALID_REQUEST"
    assert [v.field for v in refused.value.field_violations] == [
        "age_band", "gender", "province"]
