"""sms_svc's servicers: validate, call the domain, map to the contract."""

from __future__ import annotations

import urllib.parse
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import grpc

from runtime import ids
from runtime.errors import ApiError, FieldViolation, invalid_argument
from runtime.gateway_time import edge_received_at
from runtime.idempotency import once, require_request_id
from runtime.interceptors import current_principal
from runtime.storage import Storage
from runtime.vote_results import vote_error
from sms_svc.inbound import InboundProcessor, InboundSms
from sms_svc.replies import Outcome
from sms_svc.store import Answer, Binding, SmsStore
from televote.sms.v1 import (
    carrier_service_pb2,
    carrier_service_pb2_grpc,
    short_code_service_pb2,
    short_code_service_pb2_grpc,
)
from televote.vote.v1 import vote_types_pb2

#: Carrier enum -> its name in the records; a carrier's token has the lower-case name as its
#: subject ("smart").
CARRIERS = {carrier_service_pb2.CARRIER_SMART: "SMART",
            carrier_service_pb2.CARRIER_CELLCARD: "CELLCARD",
            carrier_service_pb2.CARRIER_METFONE: "METFONE"}
CARRIER_ENUMS = {name: number for number, name in CARRIERS.items()}

#: Outcome (a StrEnum: found by its text too) -> the contract's.
OUTCOMES: dict[str, carrier_service_pb2.InboundSmsOutcome.ValueType] = {
    Outcome.COUNTED: carrier_service_pb2.INBOUND_SMS_OUTCOME_VOTE_COUNTED,
    Outcome.CLOSED: carrier_service_pb2.INBOUND_SMS_OUTCOME_LINES_CLOSED,
    Outcome.INVALID_FORMAT: carrier_service_pb2.INBOUND_SMS_OUTCOME_BAD_FORMAT,
    Outcome.UNKNOWN_CONTESTANT: carrier_service_pb2.INBOUND_SMS_OUTCOME_INVALID_CONTESTANT,
    Outcome.RATE_LIMITED: carrier_service_pb2.INBOUND_SMS_OUTCOME_RATE_LIMITED,
    Outcome.BLOCKED: carrier_service_pb2.INBOUND_SMS_OUTCOME_BLOCKED,
}

_STATUSES = {
    carrier_service_pb2.DELIVERY_STATUS_DELIVERED: "DELIVERED",
    carrier_service_pb2.DELIVERY_STATUS_ACCEPTED: "ACCEPTED",
    carrier_service_pb2.DELIVERY_STATUS_FAILED: "FAILED",
    carrier_service_pb2.DELIVERY_STATUS_EXPIRED: "EXPIRED",
    carrier_service_pb2.DELIVERY_STATUS_REJECTED: "REJECTED",
}
#: Kannel's DLR types (%d) -> status.
_GATEWAY_DLR_TYPES = {1: "DELIVERED", 2: "FAILED", 4: "ACCEPTED", 8: "ACCEPTED", 16: "REJECTED"}

#: At most this many messages in one ReceiveInboundSmsBatch.
MAX_BATCH = 1000

DEFAULT_PRICE = vote_types_pb2.Money(currency_code="USD", amount_micros=500_000)


def caller_carrier(carrier: int) -> str:
    """The carrier named by the request, which must be the caller's own."""
    name: str | None = CARRIERS.get(carrier)  # type: ignore[call-overload]
    if name is None:
        raise invalid_argument(FieldViolation("carrier", "must be a carrier"))
    if current_principal().subject != name.lower():
        raise ApiError(grpc.StatusCode.PERMISSION_DENIED, "CARRIER_MISMATCH",
                       "a carrier's token posts only that carrier's traffic")
    return name


def _time(stamp: Any) -> datetime:
    return datetime.fromtimestamp(stamp.seconds + stamp.nanos / 1e9, UTC)


def _valid_time(stamp: Any, name: str) -> datetime:
    if not (0 <= stamp.seconds <= 253_402_300_799 and 0 <= stamp.nanos < 1_000_000_000):
        raise invalid_argument(FieldViolation(name, "not a valid time"))
    return _time(stamp)


def _query_text(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The text of a message an SMS gateway sent as a query parameter, decoded as the form
    encoding gateways use ("+" is a space, "%2B" a plus: Kannel's `%a`), which the edge's
    transcoder does not do; None for a message sent in a body."""
    for key, value in metadata or ():
        if key == "x-envoy-original-path" and isinstance(value, str) and "?" in value:
            try:
                fields = urllib.parse.parse_qs(value.partition("?")[2], keep_blank_values=True,
                                               errors="strict")
            except UnicodeDecodeError:
                raise invalid_argument(FieldViolation("text", "not UTF-8")) from None
            texts = fields.get("text")
            return texts[0] if texts else None
    return None


def _arrived(metadata: Sequence[tuple[str, str | bytes]] | None) -> datetime:
    # Inside the mesh (tests calling the replica) there is no edge: this host's clock.
    return edge_received_at(metadata) or datetime.now(UTC)


def _inbound(carrier: str, message: Any, arrived: datetime, text: str) -> InboundSms:
    """One message of a request (ReceiveInboundSmsRequest or a batch's InboundSms)."""
    return InboundSms(
        carrier=carrier, carrier_message_id=message.carrier_message_id,
        msisdn=message.msisdn, short_code=message.short_code, text=text, received_at=arrived,
        gateway_received_at=(_valid_time(message.received_at, "received_at")
                             if message.HasField("received_at") else None))


def _answer(response: carrier_service_pb2.ReceiveInboundSmsResponse, answer: Answer,
            ) -> carrier_service_pb2.ReceiveInboundSmsResponse:
    """`answer` written into `response` (in place: a batch's answers are filled where they
    are, at half the cost of building each and copying it in)."""
    response.outcome = OUTCOMES[answer.outcome]
    response.reply_text = answer.reply_text
    response.charge = answer.charged
    response.message_id = answer.message_id
    response.vote_id = answer.vote_id
    response.contestant_number = answer.contestant_number
    response.language = answer.language
    if answer.charged:
        response.price.currency_code = answer.currency_code
        response.price.amount_micros = answer.price_micros
    return response


class CarrierServicer(carrier_service_pb2_grpc.CarrierServiceServicer):
    """Carriers' webhooks (JSON POST or GET with query parameters, or gRPC)."""

    def __init__(self, store: SmsStore, inbound: InboundProcessor) -> None:
        self._store = store
        self._inbound = inbound

    async def ReceiveInboundSms(self, request: carrier_service_pb2.ReceiveInboundSmsRequest,
                                context: grpc.aio.ServicerContext[Any, Any],
                                ) -> carrier_service_pb2.ReceiveInboundSmsResponse:
        carrier = caller_carrier(request.carrier)
        metadata = context.invocation_metadata()
        text = _query_text(metadata) or request.text  # type: ignore[arg-type]
        answer = await self._inbound.receive(
            _inbound(carrier, request, _arrived(metadata), text))  # type: ignore[arg-type]
        return _answer(carrier_service_pb2.ReceiveInboundSmsResponse(), answer)

    async def ReceiveInboundSmsBatch(
            self, request: carrier_service_pb2.ReceiveInboundSmsBatchRequest,
            context: grpc.aio.ServicerContext[Any, Any],
    ) -> carrier_service_pb2.ReceiveInboundSmsBatchResponse:
        carrier = caller_carrier(request.carrier)
        if not 1 <= len(request.messages) <= MAX_BATCH:
            raise invalid_argument(FieldViolation("messages", f"1 to {MAX_BATCH} messages"))
        arrived = _arrived(context.invocation_metadata())  # type: ignore[arg-type]
        batch: list[InboundSms | ApiError] = []
        for message in request.messages:
            try:
                batch.append(_inbound(carrier, message, arrived, message.text))
            except ApiError as error:  # its received_at is not a time
                batch.append(error)
        valid = [sms for sms in batch if isinstance(sms, InboundSms)]
        outcomes = iter(await self._inbound.receive_many(valid))
        response = carrier_service_pb2.ReceiveInboundSmsBatchResponse()
        for index, (message, sms) in enumerate(zip(request.messages, batch, strict=True)):
            outcome = next(outcomes) if isinstance(sms, InboundSms) else sms
            result = response.results.add(index=index,
                                          carrier_message_id=message.carrier_message_id,
                                          ok=not isinstance(outcome, ApiError))
            if isinstance(outcome, ApiError):
                result.error.CopyFrom(vote_error(outcome))
            else:
                _answer(result.answer, outcome)
        return response

    async def ReceiveDeliveryReport(
            self, request: carrier_service_pb2.ReceiveDeliveryReportRequest,
            context: grpc.aio.ServicerContext[Any, Any],
    ) -> carrier_service_pb2.ReceiveDeliveryReportResponse:
        carrier = caller_carrier(request.carrier)
        bad = []
        if not request.carrier_message_id or len(request.carrier_message_id) > 128:
            bad.append(FieldViolation("carrier_message_id", "1 to 128 characters"))
        status = (_STATUSES.get(request.status)
                  or _GATEWAY_DLR_TYPES.get(request.gateway_dlr_type))
        if status is None:
            bad.append(FieldViolation("status", "a delivery status, or a known "
                                                "gateway_dlr_type"))
        if request.charged_amount.amount_micros < 0:
            bad.append(FieldViolation("charged_amount", "must not be negative"))
        if bad or status is None:
            raise invalid_argument(*bad)
        reported = (_valid_time(request.reported_at, "reported_at")
                    if request.HasField("reported_at") else None)
        found = await self._store.deliver(
            carrier=carrier, carrier_message_id=request.carrier_message_id, status=status,
            carrier_charged=request.charged,
            charged_micros=request.charged_amount.amount_micros,
            error_code=request.carrier_error_code[:64], reported_at=reported)
        if found is None:
            raise ApiError(grpc.StatusCode.NOT_FOUND, "MESSAGE_NOT_FOUND",
                           "no message with that carrier message id")
        message_id, disputed = found
        return carrier_service_pb2.ReceiveDeliveryReportResponse(message_id=message_id,
                                                                 disputed=disputed)


def _short_code(binding: Binding) -> carrier_service_pb2.ShortCode:
    message = carrier_service_pb2.ShortCode(
        carrier=CARRIER_ENUMS[binding.carrier], short_code=binding.short_code,
        show_id=binding.show_id, bound_by=binding.bound_by,
        price=vote_types_pb2.Money(currency_code=binding.currency_code,
                                   amount_micros=binding.price_micros))
    if binding.bound_at is not None:
        message.bound_at.FromDatetime(binding.bound_at)
    return message


class ShortCodeServicer(short_code_service_pb2_grpc.ShortCodeServiceServicer):
    """Operators bind short codes to shows."""

    def __init__(self, storage: Storage, store: SmsStore) -> None:
        self._storage = storage
        self._store = store

    async def BindShortCode(self, request: short_code_service_pb2.BindShortCodeRequest,
                            context: grpc.aio.ServicerContext[Any, Any],
                            ) -> short_code_service_pb2.BindShortCodeResponse:
        request_id = require_request_id(request.request_id)
        bad = []
        carrier = CARRIERS.get(request.carrier)
        if carrier is None:
            bad.append(FieldViolation("carrier", "must be a carrier"))
        if not (request.short_code.isascii() and request.short_code.isdigit()
                and 3 <= len(request.short_code) <= 8):
            bad.append(FieldViolation("short_code", "3 to 8 digits"))
        show_id = ids.canonical(request.show_id) or ""
        if not show_id:
            bad.append(FieldViolation("show_id", "must be a show id (UUID)"))
        price = request.price if request.HasField("price") else DEFAULT_PRICE
        if not (len(price.currency_code) == 3 and price.currency_code.isalpha()
                and price.currency_code.isupper()):
            bad.append(FieldViolation("price.currency_code", "an ISO 4217 code, e.g. USD"))
        if not 0 <= price.amount_micros <= 100_000_000:
            bad.append(FieldViolation("price.amount_micros", "0 to 100 units"))
        if bad:
            raise invalid_argument(*bad)
        assert carrier is not None
        principal = current_principal()

        async def perform() -> short_code_service_pb2.BindShortCodeResponse:
            bound = await self._store.bind(connection, principal, Binding(
                carrier, request.short_code, show_id, price.amount_micros,
                price.currency_code), request_id)
            if bound is None:
                raise ApiError(grpc.StatusCode.NOT_FOUND, "SHOW_NOT_FOUND", "no such show")
            return short_code_service_pb2.BindShortCodeResponse(short_code=_short_code(bound))

        async with self._storage.pool.connection() as connection, connection.transaction():
            return await once(connection, "sms.BindShortCode", request_id, request,
                              short_code_service_pb2.BindShortCodeResponse, perform)

    async def ListShortCodes(self, request: short_code_service_pb2.ListShortCodesRequest,
                             context: grpc.aio.ServicerContext[Any, Any],
                             ) -> short_code_service_pb2.ListShortCodesResponse:
        return short_code_service_pb2.ListShortCodesResponse(
            short_codes=[_short_code(binding) for binding in await self._store.bindings()])
