"""Retry-safe mutations (AIP-155): the same request id, the same answer. The one mechanism
every operator mutation uses (show control, wallet grants, fraud reviews, blocks, exemptions,
policies).

The outcome is stored in the same PostgreSQL transaction as the change it describes
(`request_outcomes`), so a retry either finds the committed outcome or runs as if for the
first time; an advisory lock on the request id makes concurrent retries wait for each other
instead of both running. The key is the id's canonical text (runtime.ids), so two spellings
of one id are one request. A refusal `perform` raises changes nothing and is not remembered:
a retry runs again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message
from psycopg import AsyncConnection

from runtime import ids
from runtime.errors import ApiError

ResponseT = TypeVar("ResponseT", bound=Message)

_DESCRIPTION = "must be a UUID, the same for every retry of this request"


def require_request_id(request_id: str) -> str:
    """The canonical request id; a missing or malformed one is refused before anything is
    done."""
    return ids.parse(request_id, "request_id", _DESCRIPTION)


def fingerprint(method: str, request: Message) -> bytes:
    """What makes a retry the same request: the method and every field, the id canonical."""
    if "request_id" in request.DESCRIPTOR.fields_by_name:
        canonical = type(request)()
        canonical.CopyFrom(request)
        canonical.request_id = require_request_id(canonical.request_id)  # type: ignore[attr-defined]
        request = canonical
    return hashlib.sha256(
        method.encode() + b"\0" + request.SerializeToString(deterministic=True)).digest()


async def once(connection: AsyncConnection[Any], method: str, request_id: str, request: Message,
               response_type: type[ResponseT],
               perform: Callable[[], Awaitable[ResponseT]]) -> ResponseT:
    """Run `perform` once per request id inside the caller's open transaction; a retry gets
    the first answer, a different request under the same id IDEMPOTENCY_MISMATCH."""
    key = require_request_id(request_id)
    digest = fingerprint(method, request)
    await connection.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (key,))
    cursor = await connection.execute(
        "SELECT fingerprint, response FROM request_outcomes WHERE request_id = %s", (key,))
    previous = await cursor.fetchone()
    if previous is not None:
        if bytes(previous["fingerprint"]) != digest:
            raise ApiError(grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_MISMATCH",
                           "this request_id was used for a different request")
        return response_type.FromString(bytes(previous["response"]))
    response = await perform()
    await connection.execute(
        "INSERT INTO request_outcomes (request_id, method, fingerprint, response)"
        " VALUES (%s, %s, %s, %s)", (key, method, digest, response.SerializeToString()))
    return response
