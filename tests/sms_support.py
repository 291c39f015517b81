"""Helpers of the SMS tests: a carrier's client (JSON POST, JSON GET as Kannel calls it, and
native gRPC through the edge), binding short code 1255, and reading the SMS records."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any

import grpc

from ops.stack import Stack
from runtime.access import Role
from televote.sms.v1 import (
    carrier_service_pb2,
    carrier_service_pb2_grpc,
    short_code_service_pb2,
    short_code_service_pb2_grpc,
)
from tests.conftest import bearer
from tests.support_windows import TestRound, open_test_round
from tests.vote_support import query, token

SHORT_CODE = "1255"
CARRIERS = {"smart": carrier_service_pb2.CARRIER_SMART,
            "cellcard": carrier_service_pb2.CARRIER_CELLCARD,
            "metfone": carrier_service_pb2.CARRIER_METFONE}


def message_id() -> str:
    return f"msg-{uuid.uuid4()}"


async def bind(stack: Stack, channel: grpc.aio.Channel, show_id: str, *,
               carriers: tuple[str, ...] = ("smart", "cellcard", "metfone"),
               price_micros: int | None = None) -> None:
    """Bind 1255 on `carriers` to the show (as an operator, through the edge)."""
    stub = short_code_service_pb2_grpc.ShortCodeServiceStub(channel)
    for carrier in carriers:
        request = short_code_service_pb2.BindShortCodeRequest(
            request_id=str(uuid.uuid4()), carrier=CARRIERS[carrier], short_code=SHORT_CODE,
            show_id=show_id)
        if price_micros is not None:
            request.price.currency_code = "USD"
            request.price.amount_micros = price_micros
        await stub.BindShortCode(request, timeout=10, metadata=bearer(
            stack.settings.state_dir, Role.OPERATOR, "producer"))


async def sms_round(stack: Stack, channel: grpc.aio.Channel, **options: Any) -> TestRound:
    """An OPEN round of a live episode whose show 1255 is bound to on every carrier."""
    test_round = await open_test_round(stack.database_url, stack.redis_url, **options)
    await bind(stack, channel, test_round.show_id)
    return test_round


def post_sms(stack: Stack, carrier: str, *, text: str, msisdn: str = "+85512345678",
             carrier_message_id: str | None = None, short_code: str = SHORT_CODE,
             as_carrier: str | None = None, **extra: Any) -> tuple[int, dict[str, Any]]:
    """A carrier's JSON webhook: POST /v1/carriers/CARRIER_X/sms."""
    body = {"carrierMessageId": carrier_message_id or message_id(), "msisdn": msisdn,
            "shortCode": short_code, "text": text, **extra}
    return edge_http(stack, "POST", f"/v1/carriers/CARRIER_{carrier.upper()}/sms",
                 token(stack, Role.CARRIER, as_carrier or carrier), json.dumps(body).encode())


def post_sms_batch(stack: Stack, carrier: str, messages: list[dict[str, Any]], *,
                   as_carrier: str | None = None) -> tuple[int, dict[str, Any]]:
    """A carrier's batch webhook: POST /v1/carriers/CARRIER_X/sms:batch with a JSON array of
    messages (each with carrierMessageId, msisdn, shortCode, text)."""
    return edge_http(stack, "POST", f"/v1/carriers/CARRIER_{carrier.upper()}/sms:batch",
                     token(stack, Role.CARRIER, as_carrier or carrier),
                     json.dumps({"messages": messages}).encode())


def sms_message(text: str, *, msisdn: str = "+85512345678", short_code: str = SHORT_CODE,
                carrier_message_id: str | None = None) -> dict[str, Any]:
    """One message of a batch, as JSON."""
    return {"carrierMessageId": carrier_message_id or message_id(), "msisdn": msisdn,
            "shortCode": short_code, "text": text}


def get_sms(stack: Stack, carrier: str, *, text: str, msisdn: str = "85512345678",
            carrier_message_id: str | None = None, short_code: str = SHORT_CODE,
            ) -> tuple[int, dict[str, Any]]:
    """The same as Kannel's get-url sends it: GET with query parameters, token included."""
    params = urllib.parse.urlencode({
        "carrier_message_id": carrier_message_id or message_id(), "msisdn": msisdn,
        "short_code": short_code, "text": text,
        "access_token": token(stack, Role.CARRIER, carrier)})
    return edge_http(stack, "GET", f"/v1/carriers/CARRIER_{carrier.upper()}/sms?{params}", None,
                 None)


def edge_http(stack: Stack, method: str, path: str, bearer_token: str | None,
          data: bytes | None) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(f"{stack.edge_url}{path}", data=data, method=method)
    request.add_header("content-type", "application/json")
    if bearer_token is not None:
        request.add_header("authorization", f"Bearer {bearer_token}")
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        raw = error.read()
        try:
            return error.code, json.loads(raw or b"{}")
        except ValueError:
            return error.code, {"raw": raw.decode(errors="replace")}


def carrier_stub(channel: grpc.aio.Channel) -> carrier_service_pb2_grpc.CarrierServiceStub:
    return carrier_service_pb2_grpc.CarrierServiceStub(channel)


def carrier_metadata(stack: Stack, carrier: str) -> tuple[tuple[str, str]]:
    return bearer(stack.settings.state_dir, Role.CARRIER, carrier)


def inbound(carrier: str, *, text: str, msisdn: str = "+85512345678",
            carrier_message_id: str | None = None,
            short_code: str = SHORT_CODE) -> carrier_service_pb2.ReceiveInboundSmsRequest:
    return carrier_service_pb2.ReceiveInboundSmsRequest(
        carrier=CARRIERS[carrier], carrier_message_id=carrier_message_id or message_id(),
        msisdn=msisdn, short_code=short_code, text=text)


async def records(stack: Stack, carrier: str, carrier_message_id: str) -> list[dict[str, Any]]:
    return await query(stack.database_url,
                       "SELECT * FROM sms_records WHERE carrier = %s AND carrier_message_id = %s",
                       carrier.upper(), carrier_message_id)


async def sms_votes(stack: Stack, round_id: str) -> list[dict[str, Any]]:
    return await query(stack.database_url,
                       "SELECT * FROM votes WHERE round_id = %s AND channel = 'SMS'", round_id)
