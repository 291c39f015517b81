"""Property-based fuzzing of every public RPC through the edge (issue 21).

For each RPC the edge routes, Hypothesis sends (a) JSON shaped like the request message, with
wrong types, garbage and oversized values mixed in, to its HTTP route, and (b) arbitrary bytes
as the protobuf message over native gRPC, as a caller the access table admits. The property:
the answer is one of the documented codes (never INTERNAL/UNKNOWN, never HTTP 5xx), and a
refused request leaves the tables the public RPCs write unchanged.

tests/e2e/test_fuzz.py runs a few examples per RPC (CI); bench/fuzz_bench.py runs many more.
"""

from __future__ import annotations

import http.client
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import grpc
import psycopg
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from ops import edge, tokens
from ops.stack import Stack
from runtime.access import SERVICE_ROLES, Role, routed_services

#: HTTP answers a refusal may have: 400 (INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE),
#: 401, 403, 404, 409 (ALREADY_EXISTS, ABORTED), 413 (too large), 429 (rate limited,
#: RESOURCE_EXHAUSTED), 501 (an RPC whose issue has not landed).
HTTP_REFUSALS = frozenset({400, 401, 403, 404, 409, 413, 429, 501})
GRPC_REFUSALS = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.ABORTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNIMPLEMENTED})

#: What the public RPCs write. Counted before and after a refused request: background work
#: (closing rounds, checkpoints) changes other tables and rows in place, never these counts.
WRITTEN_BY_PUBLIC_RPCS = (
    "shows", "episodes", "contestants", "rounds", "performances", "votes", "wallets",
    "wallet_credits", "fraud_blocks", "fraud_travellers", "fraud_policies", "request_outcomes")


@dataclass(frozen=True)
class Rpc:
    service: str
    name: str
    verb: str
    path: str
    has_body: bool
    server_streaming: bool
    request: descriptor_pb2.DescriptorProto

    @property
    def grpc_path(self) -> str:
        return f"/{self.service}/{self.name}"

    @property
    def role(self) -> Role:
        """The caller the access table admits (anonymous where it may)."""
        roles = SERVICE_ROLES[self.service]
        for role in (Role.ANONYMOUS, Role.VOTER, Role.OPERATOR, Role.CARRIER):
            if role in roles:
                return role
        raise AssertionError(f"{self.service} is not public")


def public_rpcs() -> list[Rpc]:
    files = descriptor_pb2.FileDescriptorSet.FromString(edge.DESCRIPTOR_SET.read_bytes())
    messages = {f".{proto.package}.{message.name}": message
                for proto in files.file for message in proto.message_type}
    routed = set(routed_services())
    rpcs = []
    for proto in files.file:
        for service in proto.service:
            full_name = f"{proto.package}.{service.name}"
            if full_name not in routed:
                continue
            for method in service.method:
                rule = method.options.Extensions[annotations_pb2.http]
                verb = rule.WhichOneof("pattern") or "post"
                path = getattr(rule, verb) if rule.WhichOneof("pattern") else ""
                rpcs.append(Rpc(full_name, method.name, verb.upper(), path, rule.body == "*",
                                method.server_streaming, messages[method.input_type]))
    return rpcs


_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
    st.floats(allow_nan=False), st.text(max_size=40), st.just(""), st.just("x" * 5000),
    st.uuids().map(str), st.sampled_from(["NaN", "-1", "1e309", "\u0000", "' OR 1=1 --"]))
_JSON = st.recursive(_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=12)


def json_body(message: descriptor_pb2.DescriptorProto) -> SearchStrategy[dict[str, Any]]:
    """Objects with the message's JSON field names, each a value of any JSON type."""
    names = [field.json_name or field.name for field in message.field]
    if not names:
        return st.dictionaries(st.text(max_size=10), _JSON, max_size=3)
    return st.dictionaries(st.sampled_from(names), _JSON, max_size=len(names))


_SEGMENT = st.one_of(st.uuids().map(str), st.text(min_size=1, max_size=30),
                     st.just("x" * 2000))


def http_path(rpc: Rpc) -> SearchStrategy[str]:
    """The RPC's route with every {variable} filled by arbitrary text."""
    variables = re.findall(r"\{[^}]+\}", rpc.path)

    def fill(values: list[str]) -> str:
        path = rpc.path
        for variable, value in zip(variables, values, strict=True):
            path = path.replace(variable, quote(value, safe=""), 1)
        return path

    return st.lists(_SEGMENT, min_size=len(variables), max_size=len(variables)).map(fill)


def bearer(stack: Stack, rpc: Rpc) -> dict[str, str]:
    if rpc.role is Role.ANONYMOUS:
        return {}
    token = tokens.mint(stack.settings.state_dir, rpc.role, f"fuzz-{uuid.uuid4()}")
    return {"authorization": f"Bearer {token}"}


def written_counts(stack: Stack) -> dict[str, int]:
    with psycopg.connect(stack.database_url) as connection:
        return {table: int(connection.execute(
            f"SELECT count(*) FROM {table}").fetchone()[0])  # type: ignore[index]
            for table in WRITTEN_BY_PUBLIC_RPCS}


def call_json(stack: Stack, rpc: Rpc, path: str, body: dict[str, Any] | None) -> int:
    """The HTTP status of one JSON call; a stream that opens is closed at once."""
    connection = http.client.HTTPConnection(stack.settings.edge_host, stack.edge_port,
                                            timeout=20)
    headers = {"content-type": "application/json", **bearer(stack, rpc)}
    try:
        connection.request(rpc.verb, path,
                           body=None if body is None else json.dumps(body).encode(),
                           headers=headers)
        response = connection.getresponse()
        if not rpc.server_streaming:
            response.read()
        return response.status
    finally:
        connection.close()


def call_grpc(channel: grpc.Channel, stack: Stack, rpc: Rpc, payload: bytes) -> grpc.StatusCode:
    """The status of one native gRPC call with `payload` as its serialized request."""
    metadata = tuple(bearer(stack, rpc).items())
    try:
        if rpc.server_streaming:
            # A stream that opens and waits for its next event was admitted: its deadline
            # ends it.
            stream = channel.unary_stream(rpc.grpc_path)(payload, metadata=metadata, timeout=2)
            next(stream, None)
            stream.cancel()
            return grpc.StatusCode.OK
        channel.unary_unary(rpc.grpc_path)(payload, metadata=metadata, timeout=20)
    except grpc.RpcError as error:
        code = error.code()  # type: ignore[attr-defined]
        if rpc.server_streaming and code in (grpc.StatusCode.DEADLINE_EXCEEDED,
                                             grpc.StatusCode.CANCELLED):
            return grpc.StatusCode.OK
        return code  # type: ignore[no-any-return]
    return grpc.StatusCode.OK
