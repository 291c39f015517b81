"""Retry-safe mutations for operator RPCs (AIP-155): the same request id, the same answer.

The outcome is stored in the same PostgreSQL transaction as the change it describes, so a
retry either finds the committed outcome or runs as if for the first time; an advisory lock
on the request id makes concurrent retries wait for each other instead of both running.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message
from psycopg import AsyncConnection

from runtime.errors import ApiError, FieldViolation, invalid_argument

ResponseT = TypeVar("ResponseT", bound=Message)


def require_request_id(request_id: str) -> None:
    """Refuse a missing or malformed request id before anything is done."""
    try:
        uuid.UUID(request_id)
    except ValueError:
        raise invalid_argument(FieldViolation(
            "request_id", "must be a UUID, the same for every retry of this request")) from None


async def once(connection: AsyncConnection[Any], method: str, request_id: str, request: Message,
               response_type: type[ResponseT],
               perform: Callable[[], Awaitable[ResponseT]]) -> ResponseT:
    """Run `perform` once per request id inside the caller's open transaction."""
    require_request_id(request_id)
    fingerprint = hashlib.sha256(
        method.encode() + b"\0" + request.SerializeToString(deterministic=True)).digest()
    await connection.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                             (request_id,))
    cursor = await connection.execute(
        "SELECT fingerprint, response FROM request_outcomes WHERE request_id = %s",
        (request_id,))
    previous = await cursor.fetchone()
    if previous is not None:
        if bytes(previous["fingerprint"]) != fingerprint:
            raise ApiError(grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_MISMATCH",
                           "this request_id was used for a different request")
        return response_type.FromString(bytes(previous["response"]))
    response = await perform()
    await connection.execute(
        "INSERT INTO request_outcomes (request_id, method, fingerprint, response)"
        " VALUES (%s, %s, %s, %s)",
        (request_id, method, fingerprint, response.SerializeToString()))
    return response
