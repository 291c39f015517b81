"""SubmitVote over the edge's three protocols: native gRPC, gRPC-Web and JSON.

Every client answers with an `Answer` of one of three outcomes:
- OK: a vote id; the vote is in the ledger (vote_svc answers only after its commit);
- REFUSED: a reason from the status's google.rpc.ErrorInfo, other than UNAVAILABLE and
  DEADLINE_EXCEEDED; the server decided, nothing changed;
- ERROR: anything else (UNAVAILABLE, a deadline, the client's or vote_svc's, a reset, an
  HTTP error without a status): the vote may or may not have been recorded, which the
  verifier allows for.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Any, Protocol

import aiohttp
import grpc

from loadtest import grpcweb
from runtime.errors import error_info
from televote.vote.v1 import vote_service_pb2, vote_service_pb2_grpc, vote_types_pb2

OK, REFUSED, ERROR = "ok", "refused", "error"

SUBMIT_PATH = "/televote.vote.v1.VoteService/SubmitVote"
_GRPC_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


@dataclass(frozen=True, slots=True)
class Vote:
    """What a client sends: the fields of SubmitVoteRequest plus the voter's token."""

    token: str
    request_id: str
    round_id: str
    contestant_id: str
    vote_type: str  # FREE or PAID
    channel: str  # APP or WEB
    device_id: str = ""
    latitude: float | None = None
    longitude: float | None = None
    #: A premium SMS: the subscriber's carrier and number, and the contestant's SMS number.
    carrier: str = ""
    msisdn: str = ""
    sms_number: int = 0

    def message(self) -> vote_service_pb2.SubmitVoteRequest:
        client = vote_types_pb2.ClientMetadata(device_id=self.device_id,
                                               app_version="loadtest/1")
        if self.latitude is not None and self.longitude is not None:
            client.location.latitude = self.latitude
            client.location.longitude = self.longitude
        return vote_service_pb2.SubmitVoteRequest(
            request_id=self.request_id, round_id=self.round_id,
            contestant_id=self.contestant_id,
            vote_type=vote_types_pb2.VoteType.Value(f"VOTE_TYPE_{self.vote_type}"),
            count=1, channel=vote_types_pb2.Channel.Value(f"CHANNEL_{self.channel}"),
            client=client)

    def json_body(self) -> dict[str, Any]:
        client: dict[str, Any] = {"deviceId": self.device_id, "appVersion": "loadtest/1"}
        if self.latitude is not None and self.longitude is not None:
            client["location"] = {"latitude": self.latitude, "longitude": self.longitude}
        return {"requestId": self.request_id, "contestantId": self.contestant_id,
                "voteType": f"VOTE_TYPE_{self.vote_type}", "count": 1,
                "channel": f"CHANNEL_{self.channel}", "client": client}


@dataclass(frozen=True, slots=True)
class Answer:
    outcome: str  # OK, REFUSED or ERROR
    vote_id: str = ""
    reason: str = ""  # the ErrorInfo reason, or a description of the error
    #: Seconds the client held the request waiting for a free connection of its pool: that
    #: wait is the generator's, not the platform's (opening a connection to a slow edge is
    #: the edge's, as a phone would see it).
    held_s: float = 0.0


def _classify(reason: str, fallback: str) -> Answer:
    # vote_svc's DEADLINE_EXCEEDED (a call whose deadline passed while it waited) is, to the
    # client, the same as its own deadline passing: the vote's fate is open, so it retries.
    if reason and reason not in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
        return Answer(REFUSED, reason=reason)
    return Answer(ERROR, reason=reason or fallback)


class VoteClient(Protocol):
    async def submit(self, vote: Vote, timeout: float) -> Answer: ...

    async def close(self) -> None: ...


class GrpcClient:
    """Native gRPC through the edge, over a few HTTP/2 connections (an app per connection
    would be more, but the edge spreads streams of one connection over its upstreams)."""

    def __init__(self, target: str, connections: int = 4) -> None:
        # A local subchannel pool per channel, or every channel would share one connection.
        self._channels = [grpc.aio.insecure_channel(
            target, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(connections)]
        self._stubs = itertools.cycle(
            [vote_service_pb2_grpc.VoteServiceStub(channel) for channel in self._channels])

    async def submit(self, vote: Vote, timeout: float) -> Answer:
        stub = next(self._stubs)
        try:
            reply = await stub.SubmitVote(vote.message(), timeout=timeout,
                                          metadata=(("authorization", f"Bearer {vote.token}"),))
        except grpc.aio.AioRpcError as error:
            info = error_info(error)
            return _classify(info.reason if info else "", error.code().name)
        return Answer(OK, vote_id=reply.vote_id)

    async def close(self) -> None:
        await asyncio.gather(*(channel.close(None) for channel in self._channels))


async def _queued(_: aiohttp.ClientSession, context: SimpleNamespace,
                  __: aiohttp.TraceConnectionQueuedStartParams) -> None:
    context.trace_request_ctx.queued_at = time.monotonic()


async def _dequeued(_: aiohttp.ClientSession, context: SimpleNamespace,
                    __: aiohttp.TraceConnectionQueuedEndParams) -> None:
    sent = context.trace_request_ctx
    sent.held_s += time.monotonic() - sent.queued_at


class _HttpClient:
    """HTTP/1.1 through aiohttp. Its pool allows as many connections as the driver has calls
    in flight (every viewer's browser or phone has its own): a smaller pool would queue votes
    inside the generator while the edge sat idle."""

    def __init__(self, base_url: str, connections: int = 4000) -> None:
        self._base_url = base_url.rstrip("/")
        trace = aiohttp.TraceConfig()
        trace.on_connection_queued_start.append(_queued)
        trace.on_connection_queued_end.append(_dequeued)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=connections, force_close=False),
            trace_configs=[trace])

    async def close(self) -> None:
        await self._session.close()

    def _request(self, vote: Vote) -> tuple[str, dict[str, str], dict[str, Any]]:
        """The path, headers and body (aiohttp's `json=` or `data=`) of the vote's POST."""
        raise NotImplementedError

    def _read(self, status: int, headers: dict[str, str], body: bytes) -> Answer:
        """The edge's answer to the POST."""
        raise NotImplementedError

    async def submit(self, vote: Vote, timeout: float) -> Answer:
        path, headers, body = self._request(vote)
        sent = SimpleNamespace(held_s=0.0, queued_at=0.0)
        try:
            async with self._session.post(
                    f"{self._base_url}{path}", headers=headers, trace_request_ctx=sent,
                    timeout=aiohttp.ClientTimeout(total=timeout), **body) as response:
                answer = self._read(response.status, dict(response.headers),
                                    await response.read())
        except TimeoutError:
            answer = Answer(ERROR, reason="DEADLINE_EXCEEDED")
        except aiohttp.ClientError as error:
            answer = Answer(ERROR, reason=f"HTTP_CLIENT_{type(error).__name__}")
        return replace(answer, held_s=sent.held_s) if sent.held_s else answer


def _error_reason(document: dict[str, Any]) -> str:
    """The ErrorInfo reason of a JSON error body (the edge's transcoded google.rpc.Status)."""
    return next((str(detail.get("reason", "")) for detail in document.get("details", [])
                 if str(detail.get("@type", "")).endswith("google.rpc.ErrorInfo")), "")


def _json_document(body: bytes) -> dict[str, Any]:
    try:
        document = json.loads(body) if body else {}
    except ValueError:
        return {}
    return document if isinstance(document, dict) else {}


class JsonClient(_HttpClient):
    """POST /v1/rounds/{round}/votes through the edge's JSON transcoding."""

    def _request(self, vote: Vote) -> tuple[str, dict[str, str], dict[str, Any]]:
        return (f"/v1/rounds/{vote.round_id}/votes",
                {"authorization": f"Bearer {vote.token}"}, {"json": vote.json_body()})

    def _read(self, status: int, headers: dict[str, str], body: bytes) -> Answer:
        document = _json_document(body)
        if status == 200 and document.get("voteId"):
            return Answer(OK, vote_id=str(document["voteId"]))
        return _classify(_error_reason(document), f"HTTP_{status}")


class GrpcWebClient(_HttpClient):
    """Binary gRPC-Web through the edge's grpc_web filter, over HTTP/1.1 like a browser."""

    def _request(self, vote: Vote) -> tuple[str, dict[str, str], dict[str, Any]]:
        return (SUBMIT_PATH, {"authorization": f"Bearer {vote.token}",
                              "content-type": grpcweb.CONTENT_TYPE, "x-grpc-web": "1",
                              "accept": grpcweb.CONTENT_TYPE},
                {"data": grpcweb.frame(vote.message().SerializeToString())})

    def _read(self, status: int, headers: dict[str, str], body: bytes) -> Answer:
        try:
            reply = grpcweb.parse(body, headers)
        except ValueError:
            return Answer(ERROR, reason=f"HTTP_{status}")
        if reply.status == 0 and reply.messages:
            return Answer(OK, vote_id=vote_service_pb2.SubmitVoteResponse.FromString(
                reply.messages[0]).vote_id)
        return _classify(reply.reason, _GRPC_CODE_NAMES.get(reply.status, str(reply.status)))


#: What became of an SMS -> how the verifier reads it (a vote's refusal reasons).
_SMS_OUTCOMES = {"INBOUND_SMS_OUTCOME_LINES_CLOSED": "VOTING_CLOSED",
                 "INBOUND_SMS_OUTCOME_RATE_LIMITED": "RATE_LIMITED",
                 "INBOUND_SMS_OUTCOME_BLOCKED": "FRAUD_BLOCKED",
                 "INBOUND_SMS_OUTCOME_BAD_FORMAT": "SMS_BAD_FORMAT",
                 "INBOUND_SMS_OUTCOME_INVALID_CONTESTANT": "INVALID_CONTESTANT"}


class SmsClient(_HttpClient):
    """A carrier's webhook: POST /v1/carriers/{carrier}/sms with the carrier's token; the
    request id is the carrier's message id (a redelivery sends it again)."""

    def _request(self, vote: Vote) -> tuple[str, dict[str, str], dict[str, Any]]:
        return (f"/v1/carriers/CARRIER_{vote.carrier}/sms",
                {"authorization": f"Bearer {vote.token}"},
                {"json": {"carrierMessageId": vote.request_id, "msisdn": vote.msisdn,
                          "shortCode": "1255", "text": f"V{vote.sms_number}"}})

    def _read(self, status: int, headers: dict[str, str], body: bytes) -> Answer:
        document = _json_document(body)
        outcome = str(document.get("outcome", ""))
        if status == 200 and outcome == "INBOUND_SMS_OUTCOME_VOTE_COUNTED":
            if not document.get("charge"):
                return Answer(ERROR, reason="SMS_COUNTED_NOT_CHARGED")
            return Answer(OK, vote_id=str(document["voteId"]))
        if status == 200:
            if document.get("charge"):
                return Answer(ERROR, reason="SMS_CHARGED_NOT_COUNTED")
            return Answer(REFUSED, reason=_SMS_OUTCOMES.get(outcome, outcome))
        return _classify(_error_reason(document), f"HTTP_{status}")


def client_for(path: str, edge_target: str, edge_url: str,
               connections: int = 4000) -> VoteClient:
    """The client of a path; HTTP ones may open up to `connections` (one per call in
    flight)."""
    if path == "grpc":
        return GrpcClient(edge_target)
    if path == "json":
        return JsonClient(edge_url, connections)
    if path == "grpcweb":
        return GrpcWebClient(edge_url, connections)
    if path == "sms":
        return SmsClient(edge_url, connections)
    raise ValueError(f"unknown path {path!r}")
