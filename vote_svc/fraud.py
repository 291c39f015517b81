"""Fraud scoring of votes, batched: the votes of a few milliseconds go to fraud_svc in one call.

When scoring is unavailable (fraud_svc down, too slow, UNIMPLEMENTED, no FRAUD_TARGET) the
votes are admitted as UNSCORED by default (VOTE_FRAUD_FAIL_OPEN): voting during a live show
must not stop because a side system failed. They are recorded with fraud_action 'UNSCORED' in
the ledger and scored afterwards (vote_svc/rescore.py); a BLOCK found then is carried out as a
rejection the final result leaves out, as long as the round has no final result yet. With
VOTE_FRAUD_FAIL_OPEN=false they are refused with UNAVAILABLE instead.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any

import grpc

from runtime.access import Principal, Role
from runtime.coalesce import Coalescer
from televote.fraud.v1 import (
    fraud_scoring_service_pb2,
    fraud_scoring_service_pb2_grpc,
    fraud_types_pb2,
)

log = logging.getLogger(__name__)

#: How vote_svc calls FraudScoringService (live batches and re-scoring alike).
SCORING_METADATA = Principal(Role.INTERNAL, "vote_svc").to_metadata()
MAX_BATCH = 1000

_ACTIONS = {
    fraud_types_pb2.FRAUD_ACTION_ALLOW: "ALLOW",
    fraud_types_pb2.FRAUD_ACTION_REVIEW: "REVIEW",
    fraud_types_pb2.FRAUD_ACTION_BLOCK: "BLOCK",
    fraud_types_pb2.FRAUD_ACTION_REFUSE: "REFUSE",
}


@dataclass(frozen=True)
class Score:
    """ALLOW, REVIEW, BLOCK, REFUSE (a geographic rule), or UNSCORED (scoring unavailable)."""

    action: str
    score: float | None = None
    decision_id: str = ""
    #: For REFUSE: the reason and message the vote is refused with (GEO_RESTRICTED, ...).
    refusal_reason: str = ""
    refusal_message: str = ""


UNSCORED = Score("UNSCORED")


class ScoringUnavailableError(Exception):
    """Scoring failed and the config says not to admit unscored votes."""


class _StreamEndedError(Exception):
    """The scoring stream ended before the batch was answered."""


class _ScoringStream:
    """One ScoreVoteStream call carrying every batch (a batch is a message, not a call),
    opened when needed and again after it ends. Batches are matched to answers by number."""

    def __init__(self, stub: fraud_scoring_service_pb2_grpc.FraudScoringServiceStub) -> None:
        self._stub = stub
        self._call: Any = None
        self._writing = asyncio.Lock()  # one write at a time on a call
        self._waiting: dict[int, asyncio.Future[
            fraud_scoring_service_pb2.ScoreVoteStreamResponse]] = {}
        self._numbers = itertools.count()
        self._reader: asyncio.Task[None] | None = None

    async def score(self, votes: list[fraud_scoring_service_pb2.VoteFacts], timeout_s: float
                    ) -> fraud_scoring_service_pb2.ScoreVoteStreamResponse:
        """The batch's answer; raises AioRpcError, TimeoutError or _StreamEndedError."""
        if self._call is None:
            # No request iterator: batches are written with call.write() as they come.
            self._call = self._stub.ScoreVoteStream(  # type: ignore[call-arg]
                metadata=SCORING_METADATA)
            self._reader = asyncio.get_running_loop().create_task(self._read(self._call))
        call, number = self._call, next(self._numbers)
        answer: asyncio.Future[fraud_scoring_service_pb2.ScoreVoteStreamResponse] = \
            asyncio.get_running_loop().create_future()
        self._waiting[number] = answer
        try:
            async with asyncio.timeout(timeout_s):
                async with self._writing:
                    await call.write(fraud_scoring_service_pb2.ScoreVoteStreamRequest(
                        batch=number, votes=votes))
                return await answer
        except (grpc.aio.UsageError, asyncio.InvalidStateError):
            # Written after the call ended (grpc.aio raises either, depending on how far the
            # call had got): it is being replaced. Not an INTERNAL error for the voter.
            raise _StreamEndedError() from None
        finally:
            del self._waiting[number]

    async def _read(self, call: Any) -> None:
        error: Exception = _StreamEndedError()
        try:
            async for response in call:
                answer = self._waiting.get(response.batch)
                if answer is not None and not answer.done():
                    answer.set_result(response)
        except grpc.aio.AioRpcError as failure:
            error = failure
        finally:
            # Whatever was not answered on this call never will be.
            if self._call is call:
                self._call = None
            for answer in self._waiting.values():
                if not answer.done():
                    answer.set_exception(error)


class FraudScorer:
    """Gathers VoteFacts for `batch_ms`, sends them as one batch on the scoring stream."""

    def __init__(self, channel: grpc.aio.Channel | None, *, batch_ms: float, timeout_ms: float,
                 fail_open: bool, retry_ms: float) -> None:
        self._stub = (fraud_scoring_service_pb2_grpc.FraudScoringServiceStub(channel)
                      if channel is not None else None)
        self._stream = _ScoringStream(self._stub) if self._stub is not None else None
        self._batch_ms = batch_ms
        self._timeout_s = timeout_ms / 1000
        self._fail_open = fail_open
        self._retry_s = retry_ms / 1000
        self._skip_until = 0.0
        self._batches: Coalescer[fraud_scoring_service_pb2.VoteFacts, Score | None] = \
            Coalescer(self._send, max_batch=MAX_BATCH)

    @property
    def available(self) -> bool:
        """False when votes would be admitted unscored anyway (no target, or backing off)."""
        return self._stub is not None and time.monotonic() >= self._skip_until

    async def score(self, facts: list[fraud_scoring_service_pb2.VoteFacts]) -> list[Score]:
        """Scores of `facts`, in order; raises ScoringUnavailableError only when failing closed."""
        if not self.available:
            return self._unavailable(len(facts))
        wait_ms = self._batch_ms
        results = await asyncio.gather(*(self._batches.submit(fact, wait_ms=wait_ms)
                                         for fact in facts))
        if any(result is None for result in results):
            return self._unavailable(len(facts))
        return results  # type: ignore[return-value]  # no None in it

    def unavailable(self, count: int) -> list[Score]:
        """What votes get when scoring is unavailable (or raises, when failing closed)."""
        return self._unavailable(count)

    def _unavailable(self, count: int) -> list[Score]:
        if not self._fail_open:
            raise ScoringUnavailableError()
        return [UNSCORED] * count

    async def _send(self, facts: list[fraud_scoring_service_pb2.VoteFacts],
                    ) -> list[Score | None]:
        """One batch's scores, or None for each when scoring is unavailable."""
        assert self._stream is not None
        try:
            reply = await self._stream.score(facts, self._timeout_s)
            if reply.HasField("error"):
                raise ValueError(f"status {reply.error.code}: {reply.error.message}")
            if len(reply.scores) != len(facts):
                raise ValueError(f"{len(reply.scores)} scores for {len(facts)} votes")
        except (grpc.aio.AioRpcError, ValueError, TimeoutError, _StreamEndedError) as error:
            # Not worth a stack trace per batch: say what failed and back off for a moment.
            code = (error.code().name if isinstance(error, grpc.aio.AioRpcError)
                    else str(error) or type(error).__name__)
            log.warning("fraud scoring unavailable (%s); admitting unscored", code)
            self._skip_until = time.monotonic() + self._retry_s
            return [None] * len(facts)
        return [Score(_ACTIONS.get(s.action, "UNSCORED"), s.score, s.decision_id,
                      s.refusal_reason, s.refusal_message)
                for s in reply.scores]
