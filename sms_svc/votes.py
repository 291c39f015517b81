"""SMS votes to vote_svc: many messages' votes in one SubmitVotes batch, retried until they
are decided.

A batch vote_svc refuses as a whole (OVERLOADED at the close-of-lines peak, UNAVAILABLE) or a
vote it could not record is sent again after the retry delay vote_svc asks for, until the
message's deadline: each vote is idempotent on its request id, so a retry never counts twice,
and it keeps the time the edge received the message, so lines-open is judged alike.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from datetime import datetime

import grpc

from runtime.access import Principal, Role
from runtime.coalesce import Coalescer
from televote.vote.v1 import (
    vote_gateway_service_pb2,
    vote_gateway_service_pb2_grpc,
    vote_types_pb2,
)

log = logging.getLogger(__name__)

METADATA = Principal(Role.INTERNAL, "sms_svc").to_metadata()

#: vote_svc's refusals that a later try may turn into an answer.
RETRYABLE = frozenset({"UNAVAILABLE", "OVERLOADED", "DEADLINE_EXCEEDED"})


class VoteUndecidedError(Exception):
    """vote_svc gave no answer for the vote before the message's deadline."""


class VoteSender:
    """Coalesces concurrent messages' votes into SubmitVotes calls."""

    def __init__(self, channel: grpc.aio.Channel, *, wait_ms: float, max_batch: int,
                 deadline_ms: float) -> None:
        self._stub = vote_gateway_service_pb2_grpc.VoteGatewayServiceStub(channel)
        self._wait_ms = wait_ms
        self._deadline_ms = deadline_ms
        self._batches: Coalescer[vote_gateway_service_pb2.GatewayVote,
                                 vote_gateway_service_pb2.VoteResult] = Coalescer(
            self._send, max_batch=max_batch)

    async def vote(self, *, request_id: str, user_id: str, round_id: str, contestant_id: str,
                   received_at: datetime) -> vote_gateway_service_pb2.VoteResult:
        """vote_svc's decision on one SMS vote: accepted, or refused for a reason that a
        retry would not change. Raises VoteUndecidedError after the deadline."""
        vote = vote_gateway_service_pb2.GatewayVote(
            request_id=request_id, user_id=user_id, round_id=round_id,
            contestant_id=contestant_id, vote_type=vote_types_pb2.VOTE_TYPE_PREMIUM_SMS,
            count=1, channel=vote_types_pb2.CHANNEL_SMS)
        vote.received_at.FromDatetime(received_at)
        deadline = time.monotonic() + self._deadline_ms / 1000
        delay = 0.05
        while True:
            try:
                result = await self._batches.submit(vote, wait_ms=self._wait_ms)
                if result.ok or result.error.reason not in RETRYABLE:
                    return result
                if result.error.HasField("retry_delay"):
                    delay = result.error.retry_delay.ToMilliseconds() / 1000
                reason = result.error.reason
            except grpc.aio.AioRpcError as error:
                reason = error.code().name
            if time.monotonic() + delay >= deadline:
                raise VoteUndecidedError(reason)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _send(self, votes: list[vote_gateway_service_pb2.GatewayVote],
                    ) -> Sequence[vote_gateway_service_pb2.VoteResult]:
        reply = await self._stub.SubmitVotes(
            vote_gateway_service_pb2.SubmitVotesRequest(votes=votes), metadata=METADATA,
            timeout=self._deadline_ms / 1000)
        return list(reply.results)
