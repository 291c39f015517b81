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

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from runtime.access import Principal, Role
from runtime.coalesce import Coalescer, company_wait_ms
from runtime.vote_results import RETRYABLE
from televote.vote.v1 import (
    vote_gateway_service_pb2,
    vote_gateway_service_pb2_grpc,
    vote_types_pb2,
)

log = logging.getLogger(__name__)

METADATA = Principal(Role.INTERNAL, "sms_svc").to_metadata()


class VoteUndecidedError(Exception):
    """vote_svc gave no answer for the vote before the message's deadline."""


def sms_vote(*, request_id: str, user_id: str, round_id: str, contestant_id: str,
             received_at: Timestamp) -> vote_gateway_service_pb2.GatewayVote:
    """One premium SMS vote, stamped with when the edge received the message."""
    return vote_gateway_service_pb2.GatewayVote(
        request_id=request_id, user_id=user_id, round_id=round_id,
        contestant_id=contestant_id, vote_type=vote_types_pb2.VOTE_TYPE_PREMIUM_SMS,
        count=1, channel=vote_types_pb2.CHANNEL_SMS, received_at=received_at)


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

    async def vote(self, votes: list[vote_gateway_service_pb2.GatewayVote],
                   ) -> list[vote_gateway_service_pb2.VoteResult | VoteUndecidedError]:
        """vote_svc's decision on each SMS vote: accepted, or refused for a reason that a
        retry would not change; VoteUndecidedError for one still undecided at the deadline.
        Votes that vote_svc did not decide are sent again together."""
        results: list[vote_gateway_service_pb2.VoteResult | VoteUndecidedError | None] = [
            None] * len(votes)
        deadline = time.monotonic() + self._deadline_ms / 1000
        delay = 0.05
        pending = list(range(len(votes)))
        while pending:
            replies = await self._batches.submit_many(
                [votes[i] for i in pending],
                wait_ms=company_wait_ms(len(pending), self._wait_ms))
            undecided: list[tuple[int, str]] = []
            for i, reply in zip(pending, replies, strict=True):
                if isinstance(reply, grpc.aio.AioRpcError):
                    undecided.append((i, reply.code().name))
                elif isinstance(reply, BaseException):
                    raise reply
                elif reply.ok or reply.error.reason not in RETRYABLE:
                    results[i] = reply
                else:
                    if reply.error.HasField("retry_delay"):
                        delay = max(delay, reply.error.retry_delay.ToMilliseconds() / 1000)
                    undecided.append((i, reply.error.reason))
            if undecided and time.monotonic() + delay >= deadline:
                for i, reason in undecided:
                    results[i] = VoteUndecidedError(reason)
                break
            pending = [i for i, _ in undecided]
            if pending:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        assert all(result is not None for result in results)
        return results  # type: ignore[return-value]

    async def _send(self, votes: list[vote_gateway_service_pb2.GatewayVote],
                    ) -> Sequence[vote_gateway_service_pb2.VoteResult]:
        reply = await self._stub.SubmitVotes(
            vote_gateway_service_pb2.SubmitVotesRequest(votes=votes), metadata=METADATA,
            timeout=self._deadline_ms / 1000)
        return list(reply.results)
