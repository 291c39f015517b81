"""The one way a televote service refuses a request.

Handlers and domain logic raise `ApiError`; the server's guard turns it into a
google.rpc.Status carrying exactly one ErrorInfo (domain "televote", a stable UPPER_SNAKE
reason) plus BadRequest or RetryInfo where they help (AIP-193). Clients and tests branch on
the reason, never on the message text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "televote"


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request, named by its path (e.g. `client.gps.latitude`)."""

    field: str
    description: str


@dataclass
class ApiError(Exception):
    """A refusal with a gRPC status code and a reason code."""

    code: grpc.StatusCode
    reason: str
    message: str
    metadata: Mapping[str, str] = field(default_factory=dict)
    field_violations: Sequence[FieldViolation] = ()
    retry_after_seconds: float | None = None

    def __post_init__(self) -> None:
        super().__init__(f"{self.reason}: {self.message}")

    def to_status(self) -> grpc.Status:
        """The rich status to abort an RPC with."""
        return rpc_status.to_status(self.to_proto())

    def to_proto(self) -> status_pb2.Status:
        """The rich status as a message (for an error answered inside a stream)."""
        details = [_pack(error_details_pb2.ErrorInfo(
            reason=self.reason, domain=DOMAIN, metadata=dict(self.metadata)))]
        if self.field_violations:
            details.append(_pack(error_details_pb2.BadRequest(field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=violation.field, description=violation.description)
                for violation in self.field_violations
            ])))
        if self.retry_after_seconds is not None:
            delay = duration_pb2.Duration()
            delay.FromMilliseconds(max(0, round(self.retry_after_seconds * 1000)))
            details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
        return status_pb2.Status(
            code=_CODE_NUMBERS[self.code], message=self.message, details=details)


def invalid_argument(*violations: FieldViolation, reason: str = "INVALID_REQUEST") -> ApiError:
    """A malformed request: INVALID_ARGUMENT with one BadRequest entry per bad field."""
    summary = "; ".join(f"{v.field}: {v.description}" for v in violations)
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, reason, summary or "invalid request",
                    field_violations=violations)


def error_info(error: grpc.aio.AioRpcError | grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo carried by a failed call, for callers (and tests) that branch on reasons."""
    return status_detail(rpc_status.from_call(error), error_details_pb2.ErrorInfo())  # type: ignore[arg-type]


def retry_delay_ms(error: grpc.aio.AioRpcError | grpc.RpcError) -> int | None:
    """The delay a failed call's RetryInfo asks for, in ms, or None without one."""
    info = status_detail(rpc_status.from_call(error),  # type: ignore[arg-type]
                         error_details_pb2.RetryInfo())
    return None if info is None else info.retry_delay.ToMilliseconds()


Detail = TypeVar("Detail", error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo)


def status_detail(status: status_pb2.Status | None, empty: Detail) -> Detail | None:
    """The first of `status`'s details of `empty`'s type, unpacked into `empty`, or None."""
    for detail in status.details if status is not None else ():
        if detail.Is(empty.DESCRIPTOR):
            detail.Unpack(empty)
            return empty
    return None


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


_CODE_NUMBERS = {code: getattr(code_pb2, code.name) for code in grpc.StatusCode}
