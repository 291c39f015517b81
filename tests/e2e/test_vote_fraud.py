"""Votes and the real fraud_svc, through the edge: a user or device blocked by real signals
is refused FRAUD_BLOCKED over JSON and native gRPC and nothing changes; votes admitted
UNSCORED while fraud_svc was down are scored once it is back, and a BLOCK among them is left
out of the final result."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from ops.stack import Stack
from runtime.access import Role
from televote.fraud.v1 import (
    fraud_review_service_pb2,
    fraud_review_service_pb2_grpc,
    fraud_types_pb2,
)
from televote.results.v1 import results_service_pb2, results_service_pb2_grpc
from tests.conftest import bearer
from tests.support_windows import close_test_round, open_test_round
from tests.vote_support import (
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


def _operator(stack: Stack) -> tuple[tuple[str, str]]:
    return bearer(stack.settings.state_dir, Role.OPERATOR, "producer")


async def _block(stack: Stack, channel: grpc.aio.Channel, kind: int, value: str) -> str:
    reviews = fraud_review_service_pb2_grpc.FraudReviewServiceStub(channel)
    reply = await reviews.CreateBlock(fraud_review_service_pb2.CreateBlockRequest(
        request_id=new_id(), kind=kind, value=value,  # type: ignore[arg-type]
        reason="caught by the control room"), metadata=_operator(stack), timeout=10)
    return reply.block.block_id


async def test_a_blocked_user_or_device_is_refused_fraud_blocked_over_json_and_grpc(
        stack: Stack, edge_channel: grpc.aio.Channel) -> None:
    test_round = await open_test_round(stack.database_url, stack.redis_url)
    user, device = f"blocked-{new_id()[:8]}", f"device-{new_id()[:8]}"
    await _block(stack, edge_channel, fraud_types_pb2.BLOCK_KIND_USER, user)
    await _block(stack, edge_channel, fraud_types_pb2.BLOCK_KIND_DEVICE, device)
    # A clean user on a clean device votes: the scoring path is up and says ALLOW.
    await stub(edge_channel).SubmitVote(vote_request(test_round),
                                        metadata=voter(stack, f"clean-{new_id()[:8]}"),
                                        timeout=15)

    before = await state_of(stack.database_url, stack.redis_url, user, test_round)
    request = vote_request(test_round)
    body = {"requestId": request.request_id, "contestantId": request.contestant_id,
            "voteType": "VOTE_TYPE_FREE", "count": 1, "channel": "CHANNEL_WEB"}
    status, reply = await asyncio.to_thread(
        http, stack, "POST", f"/v1/rounds/{test_round.round_id}/votes",
        token(stack, Role.VOTER, user), body)
    assert (status, json_reason(reply)) == (403, "FRAUD_BLOCKED"), reply
    assert await state_of(stack.database_url, stack.redis_url, user, test_round) == before

    # Another user, clean, on the blocked device, over native gRPC.
    other = f"device-user-{new_id()[:8]}"
    before = await state_of(stack.database_url, stack.redis_url, other, test_round)
    on_device = vote_request(test_round)
    on_device.client.device_id = device
    code, reason, _ = await refusal(stub(edge_channel).SubmitVote(
        on_device, metadata=voter(stack, other), timeout=15))
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "FRAUD_BLOCKED")
    assert await state_of(stack.database_url, stack.redis_url, other, test_round) == before
    # The refusals were fraud_svc's decisions, audited as such.
    decisions = await query(
        stack.database_url, "SELECT details ->> 'user_id' AS user_id FROM audit_log"
        " WHERE action = 'fraud.score' AND details ->> 'user_id' = ANY(%s)", [user, other])
    assert sorted(row["user_id"] for row in decisions) == sorted([user, other])
    assert {row["user_id"] for row in await ledger_rows(
        stack.database_url, test_round.round_id)}.isdisjoint({user, other})


async def _until(condition: Any, timeout: float = 40.0) -> Any:
    async with asyncio.timeout(timeout):
        while True:
            if value := await condition():
                return value
            await asyncio.sleep(0.3)


async def _edge_routes_fraud_reviews(stack: Stack, channel: grpc.aio.Channel) -> bool:
    reviews = fraud_review_service_pb2_grpc.FraudReviewServiceStub(channel)
    try:
        await reviews.ListBlocks(fraud_review_service_pb2.ListBlocksRequest(page_size=1),
                                 metadata=_operator(stack), timeout=2)
    except grpc.aio.AioRpcError:
        return False
    return True


async def test_votes_admitted_unscored_while_fraud_svc_was_down_are_scored_when_it_is_back(
        stack: Stack, edge_channel: grpc.aio.Channel) -> None:
    test_round = await open_test_round(stack.database_url, stack.redis_url)
    crook, honest = f"rescore-crook-{new_id()[:8]}", f"rescore-honest-{new_id()[:8]}"
    await _block(stack, edge_channel, fraud_types_pb2.BLOCK_KIND_USER, crook)
    await stack.kill("fraud_svc")
    try:
        # Scoring is unreachable: vote_svc admits (fail open) and marks the votes UNSCORED,
        # the blocked user's too.
        requests = {who: [vote_request(test_round, contestant=n) for n in range(2)]
                    for who in (crook, honest)}
        for who, mine in requests.items():
            for request in mine:
                await stub(edge_channel).SubmitVote(request, metadata=voter(stack, who),
                                                    timeout=15)
        rows = await ledger_rows(stack.database_url, test_round.round_id)
        assert sorted(row["fraud_action"] for row in rows) == ["UNSCORED"] * 4
    finally:
        await stack.restart("fraud_svc")

    async def decided() -> list[dict[str, Any]] | None:
        found = await query(stack.database_url, "SELECT * FROM vote_fraud_decisions"
                            " WHERE round_id = %s", test_round.round_id)
        return found if len(found) == 4 else None
    decisions = await _until(decided)
    actions = {(row["user_id"], row["action"]) for row in decisions}
    assert actions == {(crook, "BLOCK"), (honest, "ALLOW")}
    assert all(row["decision_id"] for row in decisions if row["action"] == "BLOCK")
    assert not any(row["round_finalized"] for row in decisions)
    # A BLOCK of a recorded vote is carried out as a rejection of that very vote, audited.
    rejections = await query(stack.database_url, "SELECT * FROM fraud_rejections"
                             " WHERE round_id = %s", test_round.round_id)
    assert sorted(row["vote_ref"] for row in rejections) == sorted(
        request.request_id for request in requests[crook])
    assert {row["user_id"] for row in rejections} == {crook}
    audit = await query(stack.database_url, "SELECT * FROM audit_log WHERE action ="
                        " 'fraud.rescore.reject' AND details ->> 'round_id' = %s",
                        test_round.round_id)
    assert len(audit) == 2
    # fraud_svc recorded the decisions the way it records live ones.
    scored = await query(stack.database_url, "SELECT target FROM audit_log WHERE action ="
                         " 'fraud.score' AND details ->> 'user_id' = %s", crook)
    assert {row["target"] for row in scored} >= {r.request_id for r in requests[crook]}
    # Nothing is scored twice: time for another re-score pass (VOTE_RESCORE_INTERVAL_MS, 1 s),
    # which would score them again if it could.
    await asyncio.sleep(1.5)
    assert len(await query(stack.database_url, "SELECT 1 FROM vote_fraud_decisions"
                           " WHERE round_id = %s", test_round.round_id)) == 4

    # The final result leaves the blocked votes out.
    await close_test_round(stack.database_url, stack.redis_url, test_round)
    results = results_service_pb2_grpc.ResultsServiceStub(edge_channel)

    async def final() -> results_service_pb2.GetFinalResultsResponse | None:
        try:
            return await results.GetFinalResults(  # type: ignore[no-any-return]
                results_service_pb2.GetFinalResultsRequest(round_id=test_round.round_id),
                timeout=5)
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error
            return None
    result = await _until(final)
    assert (result.ledger_votes, result.invalidated_votes) == (4, 2)
    invalid = await query(stack.database_url, "SELECT reason FROM round_result_invalid_votes"
                          " WHERE round_id = %s", test_round.round_id)
    assert [row["reason"] for row in invalid] == ["FRAUD_REJECTED"] * 2
    # Leave the edge routing to fraud_svc again for the tests that follow.
    await _until(lambda: _edge_routes_fraud_reviews(stack, edge_channel))
