"""Vote ingestion through the edge: acknowledged means in the ledger, counted once, within the
rules; every refusal has its reason and changes nothing (invariants 1-4, 8)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest

from ops.stack import Stack, service_dir
from runtime import keys
from runtime.access import Role
from runtime.storage import create_redis
from televote.vote.v1 import (
    vote_service_pb2,
    vote_types_pb2,
    wallet_admin_service_pb2,
    wallet_admin_service_pb2_grpc,
)
from tests.conftest import bearer
from tests.support_windows import TestRound, close_test_round, open_test_round
from tests.vote_support import (
    PAID,
    SMS,
    SMS_TYPE,
    WEB,
    early_in_a_minute,
    http,
    json_reason,
    ledger_rows,
    new_id,
    query,
    refusal,
    state_of,
    stub,
    token,
    vote_request,
    voter,
)


async def _round(stack: Stack, **options: Any) -> TestRound:
    return await open_test_round(stack.database_url, stack.redis_url, **options)


async def _grant(stack: Stack, channel: grpc.aio.Channel, user: str, count: int) -> int:
    admin = wallet_admin_service_pb2_grpc.WalletAdminServiceStub(channel)
    reply = await admin.GrantVotes(wallet_admin_service_pb2.GrantVotesRequest(
        request_id=new_id(), user_id=user, count=count, reason="test credit"),
        metadata=bearer(stack.settings.state_dir, Role.OPERATOR, "producer"), timeout=10)
    return reply.paid_balance


async def test_an_acknowledged_vote_is_in_the_ledger_with_its_receipt(
        stack: Stack, edge_channel: grpc.aio.Channel) -> None:
    test_round = await _round(stack)
    request = vote_request(test_round, contestant=1)
    reply = await stub(edge_channel).SubmitVote(request, metadata=voter(stack, "alice"),
                                                timeout=15)
    assert reply.free_votes_left == 4 and reply.paid_balance == 0
    (row,) = await ledger_rows(stack.database_url, test_round.round_id)
    assert str(row["vote_id"]) == reply.vote_id
    assert row["user_id"] == "alice" and row["request_id"] == request.request_id
    assert str(row["contestant_id"]) == test_round.contestants[1]
    assert (row["vote_type"], row["count"], row["channel"]) == ("FREE", 1, "APP")
    assert str(row["episode_id"]) == test_round.episode_id
    assert row["ip_hash"] and row["device_id"] == request.client.device_id
    assert row["fraud_action"] == "UNSCORED" or row["fraud_action"] in ("ALLOW", "REVIEW")
    assert test_round.opens_at_ms <= row["admitted_ms"] < test_round.closes_at_ms
    assert bytes(row["receipt_hash"]) == reply.receipt_hash == hashlib.sha256(
        b"\x00" + bytes(row["leaf_data"])).digest()
    # The leaf (so the signed root) holds the time the window was judged by.
    assert json.loads(bytes(row["leaf_data"]))["received_ms"] == row["received_ms"]
    assert reply.accepted_at.ToMilliseconds() == row["admitted_ms"]
    tallies = await query(stack.database_url, "SELECT contestant_id::text, sum(votes) AS votes"
                          " FROM round_tallies WHERE round_id = %s GROUP BY 1",
                          test_round.round_id)
    assert tallies == [{"contestant_id": test_round.contestants[1], "votes": 1}]
    redis = create_redis(stack.redis_url)
    try:
        live = await redis.hget(keys.live_key(keys.shard_of("alice"), test_round.round_id),
                                test_round.contestants[1])
        # Answered once committed; settled in Redis right after (within the settlement's
        # ride-along wait, far under the lease): committed, and off the reconciler's list.
        idempotency = keys.idempotency_key(keys.shard_of("alice"), "alice", request.request_id)
        for _ in range(100):
            record = await redis.get(idempotency)
            pending = await redis.zrange(keys.pending_key(keys.shard_of("alice")), 0, -1)
            if record and record.startswith(b"D|") and not [
                    member for member in pending if reply.vote_id.encode() in member]:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError(f"not settled within a second: {record!r}")
    finally:
        await redis.aclose()
    assert live == b"1"


async def test_a_retry_returns_the_first_outcome_and_counts_once(
        stack: Stack, edge_channel: grpc.aio.Channel) -> None:
    test_round = await _round(stack)
    request = vote_request(test_round)
    first = await stub(edge_channel).SubmitVote(request, metadata=voter(stack, "bob"),
                                                timeout=15)
    again = await stub(edge_channel).SubmitVote(request, metadata=voter(stack, "bob"),
                                                timeout=15)
    assert again == first
    assert len(await ledger_rows(stack.database_url, test_round.round_id)) == 1


async def test_a_vote_through_json_and_grpc_web(stack: Stack) -> None:
    test_round = await _round(stack)
    voter_token = token(stack, Role.VOTER, "carol")
    body = {"requestId": new_id(), "contestantId": test_round.contestants[2],
            "voteType": "VOTE_TYPE_FREE", "count": 2, "channel": "CHANNEL_WEB",
            "client": {"deviceId": "browser-7", "location": {"latitude": 11.55,
                                                             "longitude": 104.9}}}
    status, reply = await asyncio.to_thread(
        http, stack, "POST", f"/v1/rounds/{test_round.round_id}/votes", voter_token, body)
    assert status == 200, reply
    assert reply["freeVotesLeft"] == 3
    assert len(base64.b64decode(reply["receiptHash"])) == 32
    (row,) = await ledger_rows(stack.database_url, test_round.round_id)
    assert (row["channel"], row["count"], row["latitude"]) == ("WEB", 2, 11.55)
    status, balance = await asyncio.to_thread(
        http, stack, "GET", f"/v1/episodes/{test_round.episode_id}/balance", voter_token)
    assert status == 200 and balance["freeVotesLeft"] == 3 and balance["freeVoteQuota"] == 5


async def test_the_ip_and_arrival_are_what_the_edge_saw_not_what_the_client_claims(
        stack: Stack) -> None:
    """Fraud scoring judges the IP and the arrival time the edge observed: forged headers
    do not change them (the mesh's edge trusts no proxy in front of it)."""
    test_round = await _round(stack)
    body = {"requestId": new_id(), "contestantId": test_round.contestants[0],
            "voteType": "VOTE_TYPE_FREE", "count": 1, "channel": "CHANNEL_WEB"}
    before = datetime.now(UTC)
    status, reply = await asyncio.to_thread(
        http, stack, "POST", f"/v1/rounds/{test_round.round_id}/votes",
        token(stack, Role.VOTER, "mallory"), body,
        {"x-forwarded-for": "203.0.113.9", "x-televote-client-ip": "198.51.100.7",
         "x-televote-received-ms": "1000"})
    after = datetime.now(UTC)
    assert status == 200, reply
    (row,) = await ledger_rows(stack.database_url, test_round.round_id)
    # The ledger keeps the keyed hash of the IP the edge saw (hashIP), never the address.
    key = (service_dir(stack.settings.state_dir, "vote_svc") / "ip-hash-key").read_text() \
        .strip().encode()
    assert row["ip_hash"] == hmac.new(key, b"127.0.0.1", hashlib.sha256).hexdigest()[:32]
    assert "ip" not in row
    assert not [column for column, value in row.items()
                if any(ip in str(value) for ip in ("127.0.0.1", "203.0.113.9", "198.51.100.7"))]
    assert before - timedelta(seconds=1) <= row["received_at"] <= after


_HTTP_STATUS = {grpc.StatusCode.FAILED_PRECONDITION: 400, grpc.StatusCode.NOT_FOUND: 404,
                grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.ALREADY_EXISTS: 409,
                grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.PERMISSION_DENIED: 403}


async def _submit_or_refusal(transport: str, stack: Stack, channel: grpc.aio.Channel, user: str,
                             request: vote_service_pb2.SubmitVoteRequest,
                             ) -> tuple[grpc.StatusCode | int, str, dict[str, str]]:
    if transport == "grpc":
        return await refusal(stub(channel).SubmitVote(request, metadata=voter(stack, user),
                                                      timeout=15))
    from google.protobuf import json_format
    body = json_format.MessageToDict(request)
    body.pop("roundId", None)
    status, reply = await asyncio.to_thread(
        http, stack, "POST", f"/v1/rounds/{request.round_id or 'x'}/votes",
        token(stack, Role.VOTER, user), body)
    metadata: dict[str, str] = {}
    for detail in reply.get("details", []):
        metadata.update(detail.get("metadata", {}))
    return status, json_reason(reply), metadata


def _expect(transport: str, code: grpc.StatusCode) -> grpc.StatusCode | int:
    return code if transport == "grpc" else _HTTP_STATUS[code]


TRANSPORTS = ["grpc", "json"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_every_refusal_has_its_reason_and_changes_nothing(
        stack: Stack, edge_channel: grpc.aio.Channel, transport: str) -> None:
    """One user per reason, a few calls each (so fraud scoring has no reason to step in)."""
    test_round = await _round(stack, rate_limit=8)
    ok = stub(edge_channel)
    precondition = grpc.StatusCode.FAILED_PRECONDITION

    async def refused(user: str, request: vote_service_pb2.SubmitVoteRequest,
                      code: grpc.StatusCode, reason: str,
                      round_: TestRound = test_round) -> dict[str, str]:
        before = await state_of(stack.database_url, stack.redis_url, user, round_)
        got = await _submit_or_refusal(transport, stack, edge_channel, user, request)
        assert got[:2] == (_expect(transport, code), reason), got
        assert await state_of(stack.database_url, stack.redis_url, user, round_) == before
        return got[2]

    async def accept(user: str, request: vote_service_pb2.SubmitVoteRequest) -> None:
        await ok.SubmitVote(request, metadata=voter(stack, user), timeout=15)

    def someone() -> str:
        return f"{transport}-{new_id()[:8]}"

    later = await _round(stack, opens_in_ms=60_000)
    await refused(someone(), vote_request(later), precondition, "VOTING_NOT_OPEN", later)
    closed = await _round(stack)
    await close_test_round(stack.database_url, stack.redis_url, closed)
    await refused(someone(), vote_request(closed), precondition, "VOTING_CLOSED", closed)
    missing = vote_request(test_round)
    missing.round_id = new_id()
    await refused(someone(), missing, grpc.StatusCode.NOT_FOUND, "ROUND_NOT_FOUND")
    stranger = vote_request(test_round)
    stranger.contestant_id = new_id()
    await refused(someone(), stranger, precondition, "INVALID_CONTESTANT")

    user = someone()
    await accept(user, vote_request(test_round, count=3))
    left = await refused(user, vote_request(test_round, count=3), precondition, "NO_FREE_VOTES")
    assert left["free_votes_left"] == "2"

    user = someone()
    await _grant(stack, edge_channel, user, 2)
    balance = await refused(user, vote_request(test_round, vote_type=PAID, count=3),
                            precondition, "INSUFFICIENT_BALANCE")
    assert balance["paid_balance"] == "2"

    user = someone()
    first = vote_request(test_round, count=1)
    await accept(user, first)
    reused = vote_request(test_round, contestant=2, count=1, request_id=first.request_id)
    await refused(user, reused, grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_MISMATCH")

    user = someone()
    await _grant(stack, edge_channel, user, 20)
    await early_in_a_minute()
    await accept(user, vote_request(test_round, vote_type=PAID, count=8))
    # 8 votes this minute: the round's limit.
    await refused(user, vote_request(test_round, vote_type=PAID, count=1),
                  grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")

    for change in ("request_id", "count", "count_high", "vote_type", "channel", "sms",
                   "premium", "contestant_id", "latitude", "device_id"):
        request = vote_request(test_round)
        if change == "request_id":
            request.request_id = "not-a-uuid"
        elif change == "count":
            request.count = 0
        elif change == "count_high":
            request.count = 101
        elif change == "vote_type":
            request.vote_type = vote_types_pb2.VOTE_TYPE_UNSPECIFIED
        elif change == "channel":
            request.channel = vote_types_pb2.CHANNEL_UNSPECIFIED
        elif change == "sms":
            request.channel = SMS
        elif change == "premium":
            request.vote_type = SMS_TYPE
        elif change == "contestant_id":
            request.contestant_id = "7"
        elif change == "latitude":
            request.client.location.latitude = 200
        elif change == "device_id":
            request.client.device_id = "d" * 129
        await refused(someone(), request, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")


async def test_a_malformed_request_names_every_bad_field(
        stack: Stack, edge_channel: grpc.aio.Channel) -> None:
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status
    request = vote_service_pb2.SubmitVoteRequest(request_id="x", round_id="y", count=0)
    with pytest.raises(grpc.aio.AioRpcError) as refused_call:
        await stub(edge_channel).SubmitVote(request, metadata=voter(stack, "typo"), timeout=10)
    status = rpc_status.from_call(refused_call.value)  # type: ignore[arg-type]
    assert status is not None
    fields = set()
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields = {violation.field for violation in bad.field_violations}
    assert fields == {"request_id", "round_id", "contestant_id", "vote_type", "count",
                      "channel"}


async def test_a_vote_through_grpc_web(stack: Stack) -> None:
    import struct
    import urllib.request
    test_round = await _round(stack)
    request = vote_request(test_round, channel=WEB)
    message = request.SerializeToString()
    frame = b"\x00" + struct.pack(">I", len(message)) + message
    http_request = urllib.request.Request(
        f"{stack.edge_url}/televote.vote.v1.VoteService/SubmitVote", data=frame, method="POST")
    http_request.add_header("content-type", "application/grpc-web+proto")
    http_request.add_header("authorization", f"Bearer {token(stack, Role.VOTER, 'webby')}")

    def call() -> bytes:
        with urllib.request.urlopen(http_request, timeout=15) as response:
            return bytes(response.read())
    body = await asyncio.to_thread(call)
    length = struct.unpack(">I", body[1:5])[0]
    reply = vote_service_pb2.SubmitVoteResponse.FromString(body[5:5 + length])
    assert b"grpc-status:0" in body[5 + length:].replace(b" ", b"")
    (row,) = await ledger_rows(stack.database_url, test_round.round_id)
    assert str(row["vote_id"]) == reply.vote_id and row["channel"] == "WEB"
