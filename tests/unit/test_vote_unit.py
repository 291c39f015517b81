"""vote_svc's pure helpers, without a stack."""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import pytest

from runtime.ids import canonical as canonical_uuid
from vote_svc import fraud
from vote_svc.ingest import new_vote_ids


def test_vote_ids_are_distinct_version_7_uuids_in_canonical_form_ordered_by_time() -> None:
    now_ms = 1_796_232_901_354
    ids = new_vote_ids(5000, now_ms)
    assert len(set(ids)) == 5000
    for vote_id in ids:
        parsed = uuid.UUID(vote_id)
        assert (parsed.version, parsed.variant, str(parsed)) == (7, uuid.RFC_4122, vote_id)
        assert parsed.int >> 80 == now_ms  # RFC 9562: the first 48 bits are the unix ms
    # A later millisecond sorts after every id of an earlier one (as text and as uuid).
    later = new_vote_ids(1, now_ms + 1)[0]
    assert later > max(ids) and uuid.UUID(later) > max(map(uuid.UUID, ids))
    # Random bits differ where they may: the 12 after the version, the 62 after the variant.
    assert len({vote_id[15:18] for vote_id in ids}) > 1000
    assert len({vote_id[20:] for vote_id in ids}) == 5000
    assert new_vote_ids(0) == []
    assert uuid.UUID(new_vote_ids(1)[0]).int >> 80 == pytest.approx(time.time() * 1000, abs=5000)


def test_a_uuid_is_accepted_in_any_form_uuid_parses_and_given_back_canonical() -> None:
    canonical = "0f8e4f1c-2b3a-4c5d-8e9f-a0b1c2d3e4f5"
    assert canonical_uuid(canonical) == canonical
    assert canonical_uuid(canonical.upper()) == canonical
    assert canonical_uuid("{0f8e4f1c2b3a4c5d-8e9f-a0b1c2d3e4f5}") == canonical
    assert canonical_uuid(canonical.replace("-", "")) == canonical
    assert canonical_uuid(f"urn:uuid:{canonical}") == canonical
    for bad in ("", "not-a-uuid", canonical[:-1], canonical + "0", canonical.replace("f", "g")):
        assert canonical_uuid(bad) is None, bad


class _EndedCall:
    """A scoring stream whose far end has finished: grpc.aio refuses further writes."""

    def __init__(self, error: BaseException) -> None:
        self._error = error

    async def write(self, request: object) -> None:
        raise self._error

    def __aiter__(self) -> _EndedCall:
        return self

    async def __anext__(self) -> object:
        await asyncio.sleep(3600)
        raise StopAsyncIteration


class _EndedStub:
    def __init__(self, error: BaseException) -> None:
        self._error = error

    def ScoreVoteStream(self, metadata: object) -> _EndedCall:
        return _EndedCall(self._error)


@pytest.mark.parametrize("error", [grpc.aio.UsageError("ended"), asyncio.InvalidStateError()])
async def test_a_write_on_an_ended_scoring_stream_is_scoring_unavailable_not_an_error(
        error: BaseException) -> None:
    stream = fraud._ScoringStream(_EndedStub(error))  # type: ignore[arg-type]
    with pytest.raises(fraud._StreamEndedError):
        await stream.score([], timeout_s=1)
    assert stream._reader is not None
    stream._reader.cancel()
