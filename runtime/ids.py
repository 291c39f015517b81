"""Ids in requests: one rule for every service.

An id field (request_id, round_id, show_id, ...) takes a UUID in any spelling Python's
uuid.UUID reads (any case; hyphens or none; braces; `urn:uuid:`), and the service goes on
with its canonical text: lower case, 8-4-4-4-12 hexadecimal digits with hyphens. Every id is
also a key (idempotency, advisory locks, Redis), so only the canonical text is ever stored or
hashed: two spellings of one id are one key. A refusal is INVALID_ARGUMENT with reason
INVALID_REQUEST and a BadRequest field violation naming the field.
"""

from __future__ import annotations

import re
import uuid

from runtime.errors import FieldViolation, invalid_argument

_CANONICAL = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def canonical(value: str) -> str | None:
    """The canonical text of an id, or None when `value` is not one."""
    if _CANONICAL.fullmatch(value):  # what clients send: the vote path's common case
        return value
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return None


def is_id(value: str) -> bool:
    return canonical(value) is not None


def parse(value: str, field: str, description: str = "must be a UUID") -> str:
    """The canonical text of the id in request field `field`, or INVALID_REQUEST naming it."""
    if not value:
        raise invalid_argument(FieldViolation(field, "required"))
    parsed = canonical(value)
    if parsed is None:
        raise invalid_argument(FieldViolation(field, description))
    return parsed
