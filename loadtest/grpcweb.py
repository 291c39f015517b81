"""gRPC-Web framing (binary `application/grpc-web+proto`), as a browser client speaks it.

A message is a 5-byte header (flags, big-endian length) and the payload; the server ends the
body with a trailer frame (flag 0x80) holding `grpc-status`, `grpc-message` and
`grpc-status-details-bin` as HTTP/1-style header lines. A call that fails before any message
may instead answer "trailers-only", with the status in the HTTP response headers.
Spec: https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-WEB.md

Kept to these few functions (and tested) rather than a dependency: the Python gRPC-Web
packages are server-side or unmaintained, and the framing is all a client needs.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

from google.rpc import error_details_pb2, status_pb2

CONTENT_TYPE = "application/grpc-web+proto"
TRAILER_FLAG = 0x80
_HEADER = struct.Struct(">BI")


def frame(message: bytes) -> bytes:
    """One uncompressed data frame."""
    return _HEADER.pack(0, len(message)) + message


def trailer_frame(trailers: Mapping[str, str]) -> bytes:
    """The frame that ends a response: its trailers as header lines."""
    payload = "".join(f"{name}:{value}\r\n" for name, value in trailers.items()).encode(
        "latin-1")
    return _HEADER.pack(TRAILER_FLAG, len(payload)) + payload


@dataclass
class Reply:
    """A decoded gRPC-Web response."""

    status: int  # the gRPC status code, 0 for OK
    message: str = ""
    messages: list[bytes] = field(default_factory=list)
    reason: str = ""  # the google.rpc.ErrorInfo reason, when the status carries one


def parse(body: bytes, headers: Mapping[str, str]) -> Reply:
    """Split a response body into messages and trailers; trailers-only answers use headers."""
    messages: list[bytes] = []
    trailers: dict[str, str] = {}
    offset = 0
    while offset + _HEADER.size <= len(body):
        flags, length = _HEADER.unpack_from(body, offset)
        offset += _HEADER.size
        payload = body[offset:offset + length]
        if len(payload) != length:
            raise ValueError("truncated gRPC-Web frame")
        offset += length
        if flags & TRAILER_FLAG:
            for line in payload.decode("latin-1").split("\r\n"):
                name, _, value = line.partition(":")
                if name:
                    trailers[name.strip().lower()] = value.strip()
        else:
            messages.append(payload)
    if offset != len(body):
        raise ValueError("trailing bytes after the last gRPC-Web frame")
    if "grpc-status" not in trailers:
        trailers = {k.lower(): v for k, v in headers.items()}
    if "grpc-status" not in trailers:
        raise ValueError("no grpc-status in the trailers or the headers")
    return Reply(int(trailers["grpc-status"]), trailers.get("grpc-message", ""), messages,
                 _reason(trailers.get("grpc-status-details-bin", "")))


def _reason(details: str) -> str:
    if not details:
        return ""
    status = status_pb2.Status.FromString(base64.b64decode(details + "=" * (-len(details) % 4)))
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    return ""
