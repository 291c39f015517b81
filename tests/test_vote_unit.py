"""vote_svc's pure helpers, without a stack."""

from __future__ import annotations

import uuid

from vote_svc.ingest import new_vote_ids
from vote_svc.validation import canonical_uuid


def test_vote_ids_are_distinct_random_version_4_uuids_in_canonical_form() -> None:
    ids = new_vote_ids(5000)
    assert len(set(ids)) == 5000
    for vote_id in ids:
        parsed = uuid.UUID(vote_id)
        assert (parsed.version, parsed.variant, str(parsed)) == (4, uuid.RFC_4122, vote_id)
    assert new_vote_ids(0) == []


def test_a_uuid_is_accepted_in_any_form_uuid_parses_and_given_back_canonical() -> None:
    canonical = "0f8e4f1c-2b3a-4c5d-8e9f-a0b1c2d3e4f5"
    assert canonical_uuid(canonical) == canonical
    assert canonical_uuid(canonical.upper()) == canonical
    assert canonical_uuid("{0f8e4f1c2b3a4c5d-8e9f-a0b1c2d3e4f5}") == canonical
    for bad in ("", "not-a-uuid", canonical[:-1], canonical + "0", canonical.replace("f", "g"),
                canonical.replace("-", "")):
        assert canonical_uuid(bad) is None, bad
