"""Premium SMS in batches, as carriers' MO APIs deliver them: ReceiveInboundSmsBatch handles
each message as ReceiveInboundSms would, with its own outcome or error, exactly once per
(carrier, carrier message id) across batches, single deliveries and redeliveries."""

from __future__ import annotations

import asyncio
from collections import Counter

import grpc
import pytest

from ops.stack import Stack
from runtime.errors import error_info
from televote.sms.v1 import carrier_service_pb2
from tests.sms_support import (
    carrier_metadata,
    carrier_stub,
    message_id,
    post_sms,
    post_sms_batch,
    records,
    sms_message,
    sms_round,
    sms_votes,
)
from tests.vote_support import json_reason

pytestmark = pytest.mark.stack

COUNTED = "INBOUND_SMS_OUTCOME_VOTE_COUNTED"


async def test_a_json_batch_answers_each_message_on_its_own_and_bad_ones_change_nothing(
        stack: Stack, edge_channel: grpc.aio.Channel) -> None:
    test_round = await sms_round(stack, edge_channel)
    earlier = message_id()
    status, single = await asyncio.to_thread(post_sms, stack, "smart", text="V1",
                                             carrier_message_id=earlier, msisdn="+85512000001")
    assert status == 200 and single["outcome"] == COUNTED
    twice = message_id()
    batch = [
        sms_message("V2", msisdn="+85512000002"),
        sms_message("hello", msisdn="+85512000003"),
        sms_message("V3", msisdn="not a number"),
        sms_message("V1", short_code="9999"),
        sms_message("V1", msisdn="+85512000001", carrier_message_id=earlier),  # redelivered
        sms_message("V2", msisdn="+85512000001", carrier_message_id=earlier),  # other text
        sms_message("១", msisdn="+85512000004", carrier_message_id=twice),
        sms_message("១", msisdn="+85512000004", carrier_message_id=twice),  # twice in one
        sms_message("", msisdn="+85512000005"),
        sms_message("V1\u0000", msisdn="+85512000006"),  # PostgreSQL's text holds no NUL
    ]
    status, body = await asyncio.to_thread(post_sms_batch, stack, "smart", batch)
    assert status == 200, body
    results = body["results"]
    assert [r["index"] for r in results] == list(range(len(batch)))
    assert [r["carrierMessageId"] for r in results] == [m["carrierMessageId"] for m in batch]
    assert [r["ok"] for r in results] == [True, True, False, False, True, False, True, True,
                                          False, False]
    assert results[0]["answer"]["outcome"] == COUNTED and results[0]["answer"]["charge"]
    assert results[1]["answer"]["outcome"] == "INBOUND_SMS_OUTCOME_BAD_FORMAT"
    assert not results[1]["answer"]["charge"]
    assert results[2]["error"]["reason"] == "INVALID_REQUEST"
    assert "msisdn" in results[2]["error"]["message"]
    assert results[3]["error"]["reason"] == "SHORT_CODE_NOT_FOUND"
    assert results[4]["answer"] == single  # the first outcome, not a second vote
    assert results[5]["error"]["reason"] == "IDEMPOTENCY_MISMATCH"
    assert results[6]["answer"]["outcome"] == COUNTED
    assert results[6]["answer"]["language"] == "km"
    assert results[7]["answer"] == results[6]["answer"]
    assert results[8]["error"]["reason"] == "INVALID_REQUEST"
    assert results[9]["error"]["reason"] == "INVALID_REQUEST"
    assert "NUL" in results[9]["error"]["message"]
    votes = await sms_votes(stack, test_round.round_id)
    assert sorted(str(v["vote_id"]) for v in votes) == sorted(
        [single["voteId"], results[0]["answer"]["voteId"], results[6]["answer"]["voteId"]])
    assert len(await records(stack, "smart", twice)) == 1
    # A redelivery of the whole batch: the same answers, nothing counted again.
    status, again = await asyncio.to_thread(post_sms_batch, stack, "smart", batch)
    assert status == 200 and again == body
    assert len(await sms_votes(stack, test_round.round_id)) == 3


async def test_a_batch_of_a_thousand_over_grpc_is_a_thousand_votes_each_charged_once(
        stack: Stack, edge_channel: grpc.aio.Channel) -> None:
    test_round = await sms_round(stack, edge_channel)
    carriers = carrier_stub(edge_channel)
    request = carrier_service_pb2.ReceiveInboundSmsBatchRequest(
        carrier=carrier_service_pb2.CARRIER_METFONE, messages=[
            carrier_service_pb2.InboundSms(carrier_message_id=message_id(),
                                           msisdn=f"+8559{n:07d}", short_code="1255",
                                           text=f"V{1 + n % 3}") for n in range(1000)])
    metadata = carrier_metadata(stack, "metfone")
    answers: dict[str, carrier_service_pb2.ReceiveInboundSmsResponse] = {}

    def settle(reply: carrier_service_pb2.ReceiveInboundSmsBatchResponse) -> None:
        for result in reply.results:
            if result.ok:  # every copy's answer is the first one's
                assert answers.setdefault(result.carrier_message_id,
                                          result.answer) == result.answer
            else:  # no outcome yet (the machine is slow): the carrier redelivers it
                assert result.error.reason == "UNAVAILABLE", result

    # The same batch twice at once (a carrier's impatient retry): one vote per message.
    for reply in await asyncio.gather(
            carriers.ReceiveInboundSmsBatch(request, metadata=metadata, timeout=30),
            carriers.ReceiveInboundSmsBatch(request, metadata=metadata, timeout=30)):
        settle(reply)
    for _ in range(10):
        missing = [m for m in request.messages if m.carrier_message_id not in answers]
        if not missing:
            break
        settle(await carriers.ReceiveInboundSmsBatch(
            carrier_service_pb2.ReceiveInboundSmsBatchRequest(
                carrier=request.carrier, messages=missing), metadata=metadata, timeout=30))
    assert Counter(answer.outcome for answer in answers.values()) == {
        carrier_service_pb2.INBOUND_SMS_OUTCOME_VOTE_COUNTED: 1000}
    votes = await sms_votes(stack, test_round.round_id)
    assert len(votes) == 1000
    assert {str(v["vote_id"]) for v in votes} == {a.vote_id for a in answers.values()}
    (row,) = await _charged(stack, test_round.round_id)
    assert row == {"charged": 1000, "votes": 1000}


async def _charged(stack: Stack, round_id: str) -> list[dict[str, int]]:
    from tests.vote_support import query
    return await query(stack.database_url,
                       "SELECT count(*) FILTER (WHERE charged) AS charged,"
                       "       count(DISTINCT vote_id) FILTER (WHERE charged) AS votes"
                       "  FROM sms_records WHERE round_id = %s", round_id)


async def test_an_empty_batch_or_another_carriers_batch_is_refused(
        stack: Stack, edge_channel: grpc.aio.Channel) -> None:
    await sms_round(stack, edge_channel)
    status, body = await asyncio.to_thread(post_sms_batch, stack, "smart", [])
    assert status == 400 and json_reason(body) == "INVALID_REQUEST"
    status, body = await asyncio.to_thread(post_sms_batch, stack, "cellcard",
                                           [sms_message("V1")], as_carrier="smart")
    assert status == 403 and json_reason(body) == "CARRIER_MISMATCH"
    carriers = carrier_stub(edge_channel)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await carriers.ReceiveInboundSmsBatch(
            carrier_service_pb2.ReceiveInboundSmsBatchRequest(
                carrier=carrier_service_pb2.CARRIER_SMART, messages=[
                    carrier_service_pb2.InboundSms(carrier_message_id=message_id(),
                                                   msisdn="+85512345678", short_code="1255",
                                                   text="1")] * 1001),
            metadata=carrier_metadata(stack, "smart"), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(refused.value)
    assert info is not None and info.reason == "INVALID_REQUEST"
