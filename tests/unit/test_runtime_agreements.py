"""The agreements between services in runtime/: ids, the voting window, idempotency keys."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import grpc
import pytest

from runtime import ids, keys, vote_results
from runtime.errors import ApiError
from runtime.idempotency import fingerprint
from runtime.protoconv import datetime_to_ms
from runtime.window import Window, closed_fields
from televote.vote.v1 import vote_types_pb2, wallet_admin_service_pb2

ID = "0f8e4f1c-2b3a-4c5d-8e9f-a0b1c2d3e4f5"


def test_every_spelling_of_an_id_is_one_key() -> None:
    for spelling in (ID, ID.upper(), ID.replace("-", ""), "{" + ID + "}", f"urn:uuid:{ID}"):
        assert ids.parse(spelling, "round_id") == ID


@pytest.mark.parametrize("value", ["", "not-a-uuid", ID[:-1], ID + "0", ID.replace("f", "g")])
def test_a_malformed_id_is_refused_naming_its_field(value: str) -> None:
    with pytest.raises(ApiError) as refused:
        ids.parse(value, "round_id")
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.reason == "INVALID_REQUEST"
    assert [v.field for v in refused.value.field_violations] == ["round_id"]


def _round(state: str, closed_at: datetime | None = None) -> dict[str, object]:
    return {"episode_id": ID, "state": state, "contestant_ids": [ID],
            "opens_at": datetime(2026, 12, 3, 20, 0, tzinfo=UTC),
            "closes_at": datetime(2026, 12, 3, 20, 10, tzinfo=UTC), "closed_at": closed_at,
            "app_close_offset_ms": 0, "web_close_offset_ms": 5_000,
            "sms_close_offset_ms": 60_000, "free_vote_cap": 2}


_EPISODE = {"free_vote_quota": 5, "rate_limit_per_minute": 30, "version": 7}


def test_a_window_read_back_from_its_fields_is_the_same_window() -> None:
    window = Window.of_round(_round("OPEN"), _EPISODE)
    fields = {name: str(value) for name, value in window.fields().items()}
    assert set(fields) >= {f"close_{channel}_ms" for channel in keys.CHANNELS}
    assert Window.from_fields(fields) == window


def test_a_closed_round_is_closed_on_every_channel_from_the_moment_it_closed() -> None:
    closed_at = datetime(2026, 12, 3, 20, 10, 2, tzinfo=UTC)
    closes_at = datetime(2026, 12, 3, 20, 10, tzinfo=UTC)
    window = Window.of_round(_round("CLOSED", closed_at), _EPISODE)
    assert window.close_ms == {"app": datetime_to_ms(closes_at), "web": datetime_to_ms(closed_at),
                               "sms": datetime_to_ms(closed_at)}
    assert closed_fields(1)["state"] == "CLOSED"


def test_a_retry_spelling_its_request_id_differently_is_the_same_request() -> None:
    method = "televote.vote.v1.WalletAdminService/GrantVotes"
    request = wallet_admin_service_pb2.GrantVotesRequest(
        request_id=ID, user_id="u", count=3, reason="r")
    respelled = wallet_admin_service_pb2.GrantVotesRequest(
        request_id=ID.upper(), user_id="u", count=3, reason="r")
    other = wallet_admin_service_pb2.GrantVotesRequest(
        request_id=ID, user_id="u", count=4, reason="r")
    assert fingerprint(method, respelled) == fingerprint(method, request)
    assert fingerprint(method, other) != fingerprint(method, request)
    assert respelled.request_id == ID.upper()  # the caller's request is left as it was


def test_ids_made_in_bulk_are_the_uuid_modules_own() -> None:
    namespace = uuid.UUID("6f0f1b9e-3c55-4a8e-9d64-0b5f4f6a1255")
    for name in ("SMART:1", "CELLCARD:msg-ខ្មែរ", ""):
        assert ids.name_id(namespace, name) == str(uuid.uuid5(namespace, name))
    made = {ids.new_id() for _ in range(1000)}
    assert len(made) == 1000
    for text in made:
        parsed = uuid.UUID(text)
        assert str(parsed) == text and parsed.version == 4
        assert parsed.variant == uuid.RFC_4122


def test_a_refusal_in_a_batch_reads_back_as_the_error_it_was_written_from() -> None:
    """vote_svc writes each refused vote of a batch as a VoteError, sms_svc each refused
    message; sms_svc reads vote_svc's back: one function each way."""
    error = ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED", "slow down",
                     retry_after_seconds=1.5)
    result = vote_results.vote_result(3, error)
    assert result.index == 3 and not result.ok
    assert result.error.reason == "RATE_LIMITED" and result.error.code == 8
    assert result.error.retry_delay.ToMilliseconds() == 1500
    back = vote_results.refusal(result)
    assert back is not None
    assert (back.code, back.reason, back.message, back.retry_after_seconds) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED", "slow down", 1.5)
    closed = vote_results.api_error(vote_results.vote_error(
        ApiError(grpc.StatusCode.FAILED_PRECONDITION, "VOTING_CLOSED", "closed")))
    assert closed.retry_after_seconds is None and closed.reason == "VOTING_CLOSED"
    accepted = vote_results.vote_result(0, vote_types_pb2.AcceptedVote(vote_id=ID))
    assert accepted.ok and vote_results.refusal(accepted) is None
