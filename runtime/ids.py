"""Ids in requests: one rule for every service.

An id field (request_id, round_id, show_id, ...) takes a UUID in its standard text form,
8-4-4-4-12 hexadecimal digits with hyphens, in either case, and is stored and compared in
lower case. Other spellings Python's uuid.UUID would take (no hyphens, braces, `urn:uuid:`)
are refused: the id is also a key (idempotency, advisory locks, Redis), and a key with two
spellings is two keys. A refusal is INVALID_ARGUMENT with reason INVALID_REQUEST and a
BadRequest field violation naming the field.
"""

from __future__ import annotations

import re

from runtime.errors import FieldViolation, invalid_argument

_CANONICAL = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_ANY_CASE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}"
                       r"-[0-9a-fA-F]{12}")


def canonical(value: str) -> str | None:
    """The stored form of an id, or None when `value` is not one."""
    if _CANONICAL.fullmatch(value):  # what clients send: the vote path's common case
        return value
    if _ANY_CASE.fullmatch(value):
        return value.lower()
    return None


def is_id(value: str) -> bool:
    return canonical(value) is not None


def parse(value: str, field: str, description: str = "must be a UUID") -> str:
    """The stored form of the id in request field `field`, or INVALID_REQUEST naming it."""
    parsed = canonical(value)
    if parsed is None:
        raise invalid_argument(FieldViolation(field, description))
    return parsed
