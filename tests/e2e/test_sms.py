"""Premium SMS on 1255 through the edge: a carrier's message is counted once, answered, and
charged only when it counts (issue 17)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from ops.stack import Stack
from runtime.errors import error_info
from televote.sms.v1 import carrier_service_pb2
from televote.vote.v1 import (
    vote_gateway_service_pb2,
    vote_gateway_service_pb2_grpc,
    vote_types_pb2,
)
from tests.sms_support import (
    SHORT_CODE,
    carrier_metadata,
    carrier_stub,
    get_sms,
    inbound,
    message_id,
    post_sms,
    records,
    sms_round,
    sms_votes,
)
from tests.support_windows import close_test_round
from tests.vote_support import (
    early_in_a_minute,
    json_reason,
    new_id,
    refusal,
    stub,
    vote_request,
)

pytestmark = pytest.mark.stack

COUNTED = carrier_service_pb2.INBOUND_SMS_OUTCOME_VOTE_COUNTED


async def test_a_counted_sms_is_one_premium_sms_vote_charged_at_the_bound_price(
        stack: Stack, edge_channel: grpc.aio.Channel) -> None:
    test_round = await sms_round(stack, edge_channel)
    sent = message_id()
    status, body = await asyncio.to_thread(post_sms, stack, "smart", text="V2",
                                           carrier_message_id=sent)
    assert status == 200, body
    assert body["outcome"] == "INBOUND_SMS_OUTCOME_VOTE_COUNTED"
    assert body["charge"] is True
    assert body["price"] == {"currencyCode": "USD", "amountMicros": "500000"}
    assert body["contestantNumber"] == 2
    assert "C2" in body["replyText"] and body["language"] == "en"
    (vote,) = await sms_votes(stack, test_round.round_id)
    assert str(vote["vote_id"]) == body["voteId"]
    assert vote["vote_type"] == "PREMIUM_SMS" and vote["channel"] == "SMS"
    assert str(vote["contestant_id"]) == test_round.contestants[1]
    # The ledger names a pseudonym, never the number.
    assert vote["user_id"].startswith("sms:") and "12345678" not in vote["user_id"]
    (record,) = await records(stack, "smart", sent)
    assert record["outcome"] == "COUNTED" and record["charged"]
    assert record["price_micros"] == 500_000 and str(record["vote_id"]) == body["voteId"]
    assert "12345678" not in record["pseudonym"]


@pytest.mark.parametrize(("text", "outcome", "language"), [
    ("hello", "INBOUND_SMS_OUTCOME_BAD_FORMAT", "en"),
    ("V9", "INBOUND_SMS_OUTCOME_INVALID_CONTESTANT", "en"),
    ("១", "INBOUND_SMS_OUTCOME_VOTE_COUNTED", "km"),
    ("ជំរាបសួរ", "INBOUND_SMS_OUTCOME_BAD_FORMAT", "km"),
])
async def test_each_outcome_through_the_edge_as_json_and_its_reply_language(
        stack: Stack, edge_channel: grpc.aio.Channel, text: str, outcome: str,
        language: str) -> None:
    await sms_round(stack, edge_channel)
    status, body = await asyncio.to_thread(post_sms, stack, "cellcard", text=text,
                                           msisdn="+855 97 123 4567")
    assert status == 200, body
    assert body["outcome"] == outcome
    assert body["charge"] is (outcome == "INBOUND_SMS_OUTCOME_VOTE_COUNTED")
    assert body["language"] == language and body["replyText"]


async def test_each_outcome_through_the_edge_as_grpc(
        stack: Stack, edge_channel: grpc.aio.Channel) -> None:
    test_round = await sms_round(stack, edge_channel)
    carriers = carrier_stub(edge_channel)
    metadata = carrier_metadata(stack, "metfone")
    counted = await carriers.ReceiveInboundSms(inbound("metfone", text="vote 1"),
                                               metadata=metadata, timeout=10)
    assert counted.outcome == COUNTED and counted.charge and counted.vote_id
    assert counted.price.amount_micros == 500_000
    bad = await carriers.ReceiveInboundSms(inbound("metfone", text="VOTE"), metadata=metadata,
                                           timeout=10)
    assert bad.outcome == carrier_service_pb2.INBOUND_SMS_OUTCOME_BAD_FORMAT
    assert not bad.charge and not bad.vote_id and bad.price.amount_micros == 0
    await close_test_round(stack.database_url, stack.redis_url, test_round)
    closed = await carriers.ReceiveInboundSms(inbound("metfone", text="1"), metadata=metadata,
                                              timeout=10)
    assert closed.outcome == carrier_service_pb2.INBOUND_SMS_OUTCOME_LINES_CLOSED
    assert not closed.charge
    assert closed.reply_text in ("Voting is closed. Watch XFactor every Saturday!",
                                 "ការបោះឆ្នោតបានបិទហើយ។ សូមទស្សនា XFactor រៀងរាល់ថ្ងៃសៅរ៍!")


async def test_a_rate_limited_subscriber_is_told_and_not_charged(
        stack: Stack, edge_channel: grpc.aio.Channel) -> None:
    await sms_round(stack, edge_channel, rate_limit=2)
    await early_in_a_minute()
    outcomes = []
    for _ in range(3):
        status, body = await asyncio.to_thread(post_sms, stack, "smart", text="1",
                                               msisdn="012 999 111")
        assert status == 200, body
        outcomes.append((body["outcome"], body["charge"]))
    assert outcomes == [("INBOUND_SMS_OUTCOME_VOTE_COUNTED", True)] * 2 + [
        ("INBOUND_SMS_OUTCOME_RATE_LIMITED", False)]


async def test_kannels_get_url_form_with_the_token_as_a_query_parameter_counts(
        stack: Stack, edge_channel: grpc.aio.Channel) -> None:
    test_round = await sms_round(stack, edge_channel)
    status, body = await asyncio.to_thread(get_sms, stack, "smart", text=" v.3 ")
    assert status == 200, body
    assert body["outcome"] == "INBOUND_SMS_OUTCOME_VOTE_COUNTED" and body["charge"] is True
    assert len(await sms_votes(stack, test_round.round_id)) == 1


async def test_a_redelivery_returns_the_first_outcome_and_other_content_is_refused(
        stack: Stack, edge_channel: grpc.aio.Channel) -> None:
    test_round = await sms_round(stack, edge_channel)
    sent = message_id()
    first = await asyncio.to_thread(post_sms, stack, "smart", text="1", carrier_message_id=sent)
    again = await asyncio.to_thread(post_sms, stack, "smart", text="1", carrier_message_id=sent)
    assert first == again and first[1]["charge"] is True
    other = await asyncio.to_thread(post_sms, stack, "smart", text="2", carrier_message_id=sent)
    assert other[0] == 409 and json_reason(other[1]) == "IDEMPOTENCY_MISMATCH"
    sender = await asyncio.to_thread(post_sms, stack, "smart", text="1",
                                     carrier_message_id=sent, msisdn="+85599888777")
    assert sender[0] == 409 and json_reason(sender[1]) == "IDEMPOTENCY_MISMATCH"
    # The same id from another carrier is another message.
    status, body = await asyncio.to_thread(post_sms, stack, "cellcard", text="1",
                                           carrier_message_id=sent)
    assert status == 200 and body["charge"] is True
    assert len(await sms_votes(stack, test_round.round_id)) == 2
    assert len(await records(stack, "smart", sent)) == 1


async def test_200_concurrent_copies_of_one_message_are_one_vote_and_one_charge(
        stack: Stack, edge_channel: grpc.aio.Channel) -> None:
    test_round = await sms_round(stack, edge_channel)
    carriers = carrier_stub(edge_channel)
    metadata = carrier_metadata(stack, "smart")
    request = inbound("smart", text="V1")
    replies = await asyncio.gather(*(
        carriers.ReceiveInboundSms(request, metadata=metadata, timeout=15)
        for _ in range(200)))
    assert {(r.outcome, r.charge, r.vote_id, r.message_id) for r in replies} == {
        (COUNTED, True, replies[0].vote_id, replies[0].message_id)}
    assert len(await sms_votes(stack, test_round.round_id)) == 1
    (record,) = await records(stack, "smart", request.carrier_message_id)
    assert record["charged"] and str(record["vote_id"]) == replies[0].vote_id


async def test_an_sms_received_1_ms_after_the_sms_close_is_closed_and_not_charged(
        stack: Stack, edge_channel: grpc.aio.Channel) -> None:
    test_round = await sms_round(stack, edge_channel, duration_ms=1500,
                                 offsets={"sms": 500})
    sms_close_ms = test_round.closes_at_ms + 500
    await asyncio.sleep(max(0.0, (sms_close_ms + 1) / 1000 - time.time()))
    assert time.time() * 1000 >= sms_close_ms + 1
    # The carrier says it got the message before the close: lines-open is judged by when
    # the edge received it.
    request = inbound("smart", text="1")
    request.received_at.FromMilliseconds(sms_close_ms - 200)
    reply = await carrier_stub(edge_channel).ReceiveInboundSms(
        request, metadata=carrier_metadata(stack, "smart"), timeout=10)
    assert reply.outcome == carrier_service_pb2.INBOUND_SMS_OUTCOME_LINES_CLOSED
    assert not reply.charge and not reply.vote_id
    assert await sms_votes(stack, test_round.round_id) == []


async def test_a_carrier_received_at_later_than_the_edge_or_too_old_is_refused(
        stack: Stack, edge_channel: grpc.aio.Channel) -> None:
    await sms_round(stack, edge_channel)
    for when in ("9999-12-31T23:59:59Z",
                 (datetime.now(UTC) + timedelta(minutes=1)).isoformat().replace("+00:00", "Z"),
                 (datetime.now(UTC) - timedelta(hours=1)).isoformat().replace("+00:00", "Z")):
        sent = message_id()
        status, body = await asyncio.to_thread(post_sms, stack, "smart", text="1",
                                               carrier_message_id=sent, receivedAt=when)
        assert status == 400 and json_reason(body) == "INVALID_REQUEST", (when, body)
        assert await records(stack, "smart", sent) == []


@pytest.mark.parametrize(("fields", "status", "reason"), [
    ({"short_code": "9999"}, 404, "SHORT_CODE_NOT_FOUND"),
    ({"msisdn": "+66812345678"}, 400, "INVALID_REQUEST"),
    ({"msisdn": "12345"}, 400, "INVALID_REQUEST"),
    ({"msisdn": "+855 12 34"}, 400, "INVALID_REQUEST"),
    ({"text": ""}, 400, "INVALID_REQUEST"),
    ({"text": "   "}, 400, "INVALID_REQUEST"),
    ({"text": "1" * 1601}, 400, "INVALID_REQUEST"),
    ({"carrier_message_id": "x" * 129}, 400, "INVALID_REQUEST"),
    ({"as_carrier": "cellcard"}, 403, "CARRIER_MISMATCH"),
])
async def test_bad_input_gets_a_reason_and_records_nothing(
        stack: Stack, edge_channel: grpc.aio.Channel, fields: dict[str, str], status: int,
        reason: str) -> None:
    test_round = await sms_round(stack, edge_channel)
    sent = fields.pop("carrier_message_id", message_id())
    code, body = await asyncio.to_thread(post_sms, stack, "smart", **{
        "text": "1", "carrier_message_id": sent, **fields})
    assert (code, json_reason(body)) == (status, reason), body
    assert await records(stack, "smart", sent) == []
    assert await sms_votes(stack, test_round.round_id) == []


async def test_an_unknown_carrier_in_the_path_is_a_400(
        stack: Stack, edge_channel: grpc.aio.Channel) -> None:
    await sms_round(stack, edge_channel)
    code, _ = await asyncio.to_thread(post_sms, stack, "orange", text="1", as_carrier="smart")
    assert code == 400


async def test_a_smart_token_is_refused_on_cellcard_traffic_and_on_app_votes(
        stack: Stack, edge_channel: grpc.aio.Channel) -> None:
    test_round = await sms_round(stack, edge_channel)
    smart = carrier_metadata(stack, "smart")
    code, reason, _ = await refusal(carrier_stub(edge_channel).ReceiveInboundSms(
        inbound("cellcard", text="1"), metadata=smart, timeout=10))
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "CARRIER_MISMATCH")
    # The voters' API is not a carrier's.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub(edge_channel).SubmitVote(vote_request(test_round), metadata=smart,
                                            timeout=10)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # The gateway takes from a carrier only premium SMS votes of SMS subscribers: not an app
    # voter's free or paid votes.
    gateway = vote_gateway_service_pb2_grpc.VoteGatewayServiceStub(edge_channel)
    votes = [vote_gateway_service_pb2.GatewayVote(
        request_id=new_id(), user_id=user, round_id=test_round.round_id,
        contestant_id=test_round.contestants[0], vote_type=vote_type, count=1, channel=channel)
        for user, vote_type, channel in (
            ("app-voter-1", vote_types_pb2.VOTE_TYPE_FREE, vote_types_pb2.CHANNEL_APP),
            ("app-voter-1", vote_types_pb2.VOTE_TYPE_PAID, vote_types_pb2.CHANNEL_WEB),
            ("app-voter-1", vote_types_pb2.VOTE_TYPE_PREMIUM_SMS, vote_types_pb2.CHANNEL_SMS),
            ("sms:abc", vote_types_pb2.VOTE_TYPE_PREMIUM_SMS, vote_types_pb2.CHANNEL_SMS))]
    reply = await gateway.SubmitVotes(vote_gateway_service_pb2.SubmitVotesRequest(votes=votes),
                                      metadata=smart, timeout=10)
    assert [r.error.reason for r in reply.results[:3]] == ["CARRIER_VOTE_NOT_ALLOWED"] * 3
    assert reply.results[3].ok
    votes_in_round = await stack_votes(stack, test_round.round_id)
    assert [v["user_id"] for v in votes_in_round] == ["sms:abc"]


async def test_a_gateway_vote_stamped_in_the_future_is_refused(
        stack: Stack, edge_channel: grpc.aio.Channel) -> None:
    test_round = await sms_round(stack, edge_channel)
    gateway = vote_gateway_service_pb2_grpc.VoteGatewayServiceStub(edge_channel)
    vote = vote_gateway_service_pb2.GatewayVote(
        request_id=new_id(), user_id="sms:future", round_id=test_round.round_id,
        contestant_id=test_round.contestants[0],
        vote_type=vote_types_pb2.VOTE_TYPE_PREMIUM_SMS, count=1,
        channel=vote_types_pb2.CHANNEL_SMS)
    vote.received_at.FromJsonString("9999-12-31T23:59:59Z")
    reply = await gateway.SubmitVotes(vote_gateway_service_pb2.SubmitVotesRequest(votes=[vote]),
                                      metadata=carrier_metadata(stack, "smart"), timeout=10)
    (result,) = reply.results
    assert not result.ok and result.error.reason == "INVALID_REQUEST"
    assert await stack_votes(stack, test_round.round_id) == []


async def stack_votes(stack: Stack, round_id: str) -> list[dict[str, object]]:
    from tests.vote_support import query
    return await query(stack.database_url, "SELECT user_id FROM votes WHERE round_id = %s",
                       round_id)


async def test_delivery_reports_are_recorded_and_a_charge_we_did_not_ask_for_is_disputed(
        stack: Stack, edge_channel: grpc.aio.Channel) -> None:
    await sms_round(stack, edge_channel)
    carriers = carrier_stub(edge_channel)
    metadata = carrier_metadata(stack, "smart")
    counted = inbound("smart", text="1")
    bad = inbound("smart", text="nope")
    for request in (counted, bad):
        await carriers.ReceiveInboundSms(request, metadata=metadata, timeout=10)
    delivered = await carriers.ReceiveDeliveryReport(
        carrier_service_pb2.ReceiveDeliveryReportRequest(
            carrier=carrier_service_pb2.CARRIER_SMART,
            carrier_message_id=counted.carrier_message_id,
            status=carrier_service_pb2.DELIVERY_STATUS_DELIVERED, charged=True),
        metadata=metadata, timeout=10)
    assert not delivered.disputed
    disputed = await carriers.ReceiveDeliveryReport(
        carrier_service_pb2.ReceiveDeliveryReportRequest(
            carrier=carrier_service_pb2.CARRIER_SMART, carrier_message_id=bad.carrier_message_id,
            status=carrier_service_pb2.DELIVERY_STATUS_DELIVERED, charged=True),
        metadata=metadata, timeout=10)
    assert disputed.disputed
    (record,) = await records(stack, "smart", counted.carrier_message_id)
    assert record["delivery_status"] == "DELIVERED" and record["delivered_at"] is not None
    code, reason, _ = await refusal(carriers.ReceiveDeliveryReport(
        carrier_service_pb2.ReceiveDeliveryReportRequest(
            carrier=carrier_service_pb2.CARRIER_SMART, carrier_message_id="never-sent",
            status=carrier_service_pb2.DELIVERY_STATUS_DELIVERED),
        metadata=metadata, timeout=10))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "MESSAGE_NOT_FOUND")
    assert error_info  # imported for refusal's callers
    assert SHORT_CODE == "1255"


async def test_kill_9_of_sms_svc_during_a_burst_counts_and_charges_each_message_once(
        stack: Stack, edge_channel: grpc.aio.Channel) -> None:
    test_round = await sms_round(stack, edge_channel)
    carriers = carrier_stub(edge_channel)
    metadata = carrier_metadata(stack, "smart")
    requests = [inbound("smart", text=f"V{1 + n % 3}", msisdn=f"+8551{n:07d}")
                for n in range(150)]
    first: dict[str, carrier_service_pb2.ReceiveInboundSmsResponse] = {}
    answered = asyncio.Event()

    async def send(request: carrier_service_pb2.ReceiveInboundSmsRequest) -> None:
        try:
            first[request.carrier_message_id] = await carriers.ReceiveInboundSms(
                request, metadata=metadata, timeout=20)
            if len(first) >= 20:
                answered.set()
        except grpc.aio.AioRpcError as error:  # the carrier got no success: it redelivers
            assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL,
                                    grpc.StatusCode.UNKNOWN), error

    burst = asyncio.gather(*(send(request) for request in requests))
    await asyncio.wait_for(answered.wait(), 30)
    await stack.kill("sms_svc")
    await burst
    assert 20 <= len(first) < len(requests)
    await stack.restart("sms_svc")
    for _ in range(60):  # the carrier redelivers what it got no success for, and more
        pending = [r for r in requests if r.carrier_message_id not in first]
        if not pending:
            break
        await asyncio.gather(*(send(request) for request in pending))
        await asyncio.sleep(0.5)
    assert len(first) == len(requests)
    # Every success the carrier saw before the kill stands: a redelivery gets the same vote.
    again = await asyncio.gather(*(carriers.ReceiveInboundSms(r, metadata=metadata, timeout=20)
                                   for r in requests))
    for request, reply in zip(requests, again, strict=True):
        assert reply == first[request.carrier_message_id]
        assert reply.outcome == COUNTED and reply.charge
    votes = await sms_votes(stack, test_round.round_id)
    assert len(votes) == len(requests)
    assert {str(v["vote_id"]) for v in votes} == {r.vote_id for r in again}
    charged = await stack_charged(stack, test_round.round_id)
    assert charged == len(requests)


async def stack_charged(stack: Stack, round_id: str) -> int:
    from tests.vote_support import query
    (row,) = await query(stack.database_url, "SELECT count(*) AS n FROM sms_records"
                         " WHERE round_id = %s AND charged", round_id)
    return int(row["n"])


@pytest.mark.parametrize("how", ["json", "query"])
async def test_invalid_utf8_text_is_a_400_and_records_nothing(
        stack: Stack, edge_channel: grpc.aio.Channel, how: str) -> None:
    import urllib.error
    import urllib.request

    from runtime.access import Role
    from tests.vote_support import token
    test_round = await sms_round(stack, edge_channel)
    carrier_token = token(stack, Role.CARRIER, "smart")
    sent = message_id()
    if how == "json":
        request = urllib.request.Request(
            f"{stack.edge_url}/v1/carriers/CARRIER_SMART/sms", method="POST",
            data=(b'{"carrierMessageId": "' + sent.encode() + b'", "msisdn": "+85512345678",'
                  b' "shortCode": "1255", "text": "V\xff\xfe1"}'),
            headers={"content-type": "application/json",
                     "authorization": f"Bearer {carrier_token}"})
    else:
        request = urllib.request.Request(
            f"{stack.edge_url}/v1/carriers/CARRIER_SMART/sms?carrier_message_id={sent}"
            f"&msisdn=85512345678&short_code=1255&text=V%FF%FE1&access_token={carrier_token}")

    def call() -> int:
        try:
            with urllib.request.urlopen(request, timeout=15) as response:
                return int(response.status)
        except urllib.error.HTTPError as error:
            return int(error.code)
    assert await asyncio.to_thread(call) == 400
    assert await records(stack, "smart", sent) == []
    assert await sms_votes(stack, test_round.round_id) == []


async def test_the_sms_records_are_append_only(
        stack: Stack, edge_channel: grpc.aio.Channel) -> None:
    from tests.vote_support import query
    await sms_round(stack, edge_channel)
    sent = message_id()
    await asyncio.to_thread(post_sms, stack, "smart", text="1", carrier_message_id=sent)
    for table in ("sms_messages", "sms_outcomes"):
        with pytest.raises(Exception, match="append-only"):
            await query(stack.database_url, f"UPDATE {table} SET message_id = message_id")
        with pytest.raises(Exception, match="append-only"):
            await query(stack.database_url, f"DELETE FROM {table}")
    (record,) = await records(stack, "smart", sent)
    assert record["charged"]


async def test_binding_1255_as_json_is_idempotent_audited_and_moves_the_votes(
        stack: Stack, edge_channel: grpc.aio.Channel) -> None:
    import json
    import urllib.request

    from runtime.access import Role
    from tests.support_windows import open_test_round
    from tests.vote_support import http, query, token
    operator = token(stack, Role.OPERATOR, "producer")
    first = await open_test_round(stack.database_url, stack.redis_url)
    second = await open_test_round(stack.database_url, stack.redis_url)
    request_id = new_id()
    body = {"requestId": request_id, "carrier": "CARRIER_SMART", "showId": first.show_id}
    status, bound = await asyncio.to_thread(http, stack, "POST", "/v1/short-codes/1255/bindings",
                                            operator, body)
    assert status == 200, bound
    assert bound["shortCode"]["price"] == {"currencyCode": "USD", "amountMicros": "500000"}
    again = await asyncio.to_thread(http, stack, "POST", "/v1/short-codes/1255/bindings",
                                    operator, body)
    assert again == (200, bound)
    other = await asyncio.to_thread(http, stack, "POST", "/v1/short-codes/1255/bindings",
                                    operator, {**body, "showId": second.show_id})
    assert other[0] == 409 and json_reason(other[1]) == "IDEMPOTENCY_MISMATCH"
    audited = await query(stack.database_url, "SELECT * FROM audit_log WHERE action ="
                          " 'sms.short_code.bind' AND details->>'request_id' = %s", request_id)
    assert len(audited) == 1 and audited[0]["actor_subject"] == "producer"
    status, _ = await asyncio.to_thread(post_sms, stack, "smart", text="1")
    assert len(await sms_votes(stack, first.round_id)) == 1
    status, moved = await asyncio.to_thread(
        http, stack, "POST", "/v1/short-codes/1255/bindings", operator,
        {"requestId": new_id(), "carrier": "CARRIER_SMART", "showId": second.show_id,
         "price": {"currencyCode": "USD", "amountMicros": "250000"}})
    assert status == 200, moved
    _, counted = await asyncio.to_thread(post_sms, stack, "smart", text="1")
    assert counted["price"]["amountMicros"] == "250000"
    assert len(await sms_votes(stack, second.round_id)) == 1
    # A carrier cannot bind; an unknown show is NOT_FOUND.
    from tests.sms_support import edge_http
    status, _ = await asyncio.to_thread(
        edge_http, stack, "POST", "/v1/short-codes/1255/bindings",
        token(stack, Role.CARRIER, "smart"), json.dumps(body).encode())
    assert status == 403
    status, missing = await asyncio.to_thread(
        http, stack, "POST", "/v1/short-codes/1255/bindings", operator,
        {"requestId": new_id(), "carrier": "CARRIER_SMART", "showId": new_id()})
    assert status == 404 and json_reason(missing) == "SHOW_NOT_FOUND"
    assert json and urllib.request
