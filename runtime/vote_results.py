"""A vote's answer inside a batch: the agreement between vote_svc, which answers each vote of a
SubmitVotes call with a `VoteResult` (accepted, or a `VoteError`), and its callers that read
those answers (sms_svc, which also answers each message of a carrier's batch with a
`VoteError`).

One function writes an ApiError as a VoteError, one reads it back, and one set says which
refusals a later try may turn into an answer: so what vote_svc means by a refusal and what a
caller understands by it cannot drift apart.
"""

from __future__ import annotations

import grpc

from runtime.errors import ApiError
from televote.vote.v1 import vote_gateway_service_pb2, vote_types_pb2

#: Refusals of a vote (or of its whole batch) that say nothing about the vote itself: vote_svc
#: could not decide it now (OVERLOADED at the close-of-lines peak, UNAVAILABLE, its deadline).
#: Sent again with the same request id, it is decided, never counted twice.
RETRYABLE = frozenset({"UNAVAILABLE", "OVERLOADED", "DEADLINE_EXCEEDED"})

_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}


def vote_error(error: ApiError) -> vote_types_pb2.VoteError:
    """An ApiError as one item of a batch's answer carries it."""
    written = vote_types_pb2.VoteError(code=error.code.value[0], reason=error.reason,
                                       message=error.message)
    if error.retry_after_seconds is not None:
        written.retry_delay.FromMilliseconds(round(error.retry_after_seconds * 1000))
    return written


def api_error(error: vote_types_pb2.VoteError) -> ApiError:
    """A batch item's VoteError as the ApiError it was written from."""
    return ApiError(_STATUS_CODES.get(error.code, grpc.StatusCode.UNKNOWN), error.reason,
                    error.message,
                    retry_after_seconds=(error.retry_delay.ToMilliseconds() / 1000
                                         if error.HasField("retry_delay") else None))


def vote_result(index: int, result: vote_types_pb2.AcceptedVote | ApiError,
                ) -> vote_gateway_service_pb2.VoteResult:
    """vote_svc's answer to the vote at `index` of a SubmitVotes call."""
    if isinstance(result, ApiError):
        return vote_gateway_service_pb2.VoteResult(index=index, ok=False,
                                                   error=vote_error(result))
    return vote_gateway_service_pb2.VoteResult(index=index, ok=True, accepted=result)


def refusal(result: vote_gateway_service_pb2.VoteResult) -> ApiError | None:
    """Why vote_svc refused the vote (None: it accepted it)."""
    return None if result.ok else api_error(result.error)
