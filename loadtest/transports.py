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
from dataclasses import dataclass
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


class _HttpClient:
    def __init__(self, base_url: str, connections: int = 64) -> None:
        self._base_url = base_url.rstrip("/")
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=connections, force_close=False))

    async def close(self) -> None:
        await self._session.close()

    async def _post(self, path: str, timeout: float, headers: dict[str, str],
                    **body: Any) -> tuple[int, dict[str, str], bytes] | Answer:
        """Status, headers and body of a POST to the edge, or the transport's failure."""
        try:
            async with self._session.post(
                    f"{self._base_url}{path}", headers=headers,
                    timeout=aiohttp.ClientTimeout(total=timeout), **body) as response:
                return response.status, dict(response.headers), await response.read()
        except TimeoutError:
            return Answer(ERROR, reason="DEADLINE_EXCEEDED")
        except aiohttp.ClientError as error:
            return Answer(ERROR, reason=f"HTTP_CLIENT_{type(error).__name__}")


class JsonClient(_HttpClient):
    """POST /v1/rounds/{round}/votes through the edge's JSON transcoding."""

    async def submit(self, vote: Vote, timeout: float) -> Answer:
        answer = await self._post(f"/v1/rounds/{vote.round_id}/votes", timeout,
                                  {"authorization": f"Bearer {vote.token}"},
                                  json=vote.json_body())
        if isinstance(answer, Answer):
            return answer
        status, _, body = answer
        try:
            document = json.loads(body) if body else {}
        except ValueError:
            document = {}
        if status == 200 and document.get("voteId"):
            return Answer(OK, vote_id=str(document["voteId"]))
        reason = next((str(detail.get("reason", "")) for detail in document.get("details", [])
                       if str(detail.get("@type", "")).endswith("google.rpc.ErrorInfo")), "")
        return _classify(reason, f"HTTP_{status}")


class GrpcWebClient(_HttpClient):
    """Binary gRPC-Web through the edge's grpc_web filter, over HTTP/1.1 like a browser."""

    async def submit(self, vote: Vote, timeout: float) -> Answer:
        answer = await self._post(
            SUBMIT_PATH, timeout, {"authorization": f"Bearer {vote.token}",
                                   "content-type": grpcweb.CONTENT_TYPE, "x-grpc-web": "1",
                                   "accept": grpcweb.CONTENT_TYPE},
            data=grpcweb.frame(vote.message().SerializeToString()))
        if isinstance(answer, Answer):
            return answer
        status, headers, body = answer
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

    async def submit(self, vote: Vote, timeout: float) -> Answer:
        answer = await self._post(
            f"/v1/carriers/CARRIER_{vote.carrier}/sms", timeout,
            {"authorization": f"Bearer {vote.token}"},
            json={"carrierMessageId": vote.request_id, "msisdn": vote.msisdn,
                  "shortCode": "1255", "text": f"V{vote.sms_number}"})
        if isinstance(answer, Answer):
            return answer
        status, _, body = answer
        try:
            document = json.loads(body) if body else {}
        except ValueError:
            document = {}
        outcome = str(document.get("outcome", ""))
        if status == 200 and outcome == "INBOUND_SMS_OUTCOME_VOTE_COUNTED":
            if not document.get("charge"):
                return Answer(ERROR, reason="SMS_COUNTED_NOT_CHARGED")
            return Answer(OK, vote_id=str(document["voteId"]))
        if status == 200:
            if document.get("charge"):
                return Answer(ERROR, reason="SMS_CHARGED_NOT_COUNTED")
            return Answer(REFUSED, reason=_SMS_OUTCOMES.get(outcome, outcome))
        reason = next((str(detail.get("reason", "")) for detail in document.get("details", [])
                       if str(detail.get("@type", "")).endswith("google.rpc.ErrorInfo")), "")
        return _classify(reason, f"HTTP_{status}")


def client_for(path: str, edge_target: str, edge_url: str) -> VoteClient:
    if path == "grpc":
        return GrpcClient(edge_target)
    if path == "json":
        return JsonClient(edge_url)
    if path == "grpcweb":
        return GrpcWebClient(edge_url)
    if path == "sms":
        return SmsClient(edge_url)
    raise ValueError(f"unknown path {path!r}")
