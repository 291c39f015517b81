"""The server interceptor every service runs: who is calling, may they, and how refusals look.

It wraps each handler so that
- the caller's Principal is in a contextvar for the handler: with mutual TLS, the end user the
  edge verified when the caller's certificate is the edge's, the named service (role internal)
  when it is a service's, anonymous otherwise (runtime/mesh.py); in plaintext (a lone service
  in a test), whatever the claims header says,
- a role outside the access table is refused with PERMISSION_DENIED before the handler runs,
- an ApiError raised anywhere below becomes the rich google.rpc.Status it describes,
- any other exception is logged with its trace and answered INTERNAL without leaking details,
- the call is one OpenTelemetry server span (parent from the caller's `traceparent`), with the
  gRPC status code the caller saw.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind

from runtime.access import ANONYMOUS, MESH_SERVICES, SERVICE_ROLES, Principal, Role, allowed
from runtime.errors import ApiError, FieldViolation, invalid_argument
from runtime.mesh import EDGE, peer_of, service_of

log = logging.getLogger(__name__)

_tracer = trace.get_tracer("televote.rpc")

_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar(
    "principal", default=ANONYMOUS)


def current_principal() -> Principal:
    """The authenticated caller of the RPC being handled."""
    return _principal.get()


async def _refuse(context: grpc.aio.ServicerContext[Any, Any], error: Exception,
                  span: trace.Span) -> None:
    if isinstance(error, NotImplementedError):
        # The generated base servicer's answer for an RPC this build does not implement.
        error = ApiError(grpc.StatusCode.UNIMPLEMENTED, "NOT_IMPLEMENTED",
                         "this RPC is not implemented yet")
    if isinstance(error, ApiError):
        span.set_attribute("rpc.grpc.status_code", error.code.value[0])
        await context.abort_with_status(error.to_status())  # type: ignore[attr-defined]
    log.exception("unhandled error in handler")
    span.set_attribute("rpc.grpc.status_code", grpc.StatusCode.INTERNAL.value[0])
    await context.abort(grpc.StatusCode.INTERNAL, "internal error")


def _span(method: str, metadata: dict[str, str]) -> Any:
    """The server span of one call, a child of the caller's trace when it sent one."""
    service, _, name = method.lstrip("/").partition("/")
    return _tracer.start_as_current_span(
        method.lstrip("/"), context=propagate.extract(metadata), kind=SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
        record_exception=False, set_status_on_exception=False)


def _principal_of(metadata: dict[str, str], peer: str | None, mesh_tls: bool) -> Principal:
    if not mesh_tls:
        return Principal.from_metadata(metadata)
    if peer == EDGE:
        claimed = Principal.from_metadata(metadata)
        # The edge never forwards an internal role (no token carries one).
        return ANONYMOUS if claimed.role == Role.INTERNAL else claimed
    if peer is not None and service_of(peer) in MESH_SERVICES:
        return Principal(Role.INTERNAL, service_of(peer))
    return ANONYMOUS


def _admit(method: str, metadata: dict[str, str], table: Mapping[str, frozenset[Role]],
           principal: Principal) -> Principal | ApiError:
    service = method.lstrip("/").split("/", 1)[0]
    if allowed(service, principal.role, table):
        return principal
    if principal.role == ANONYMOUS.role:
        return ApiError(grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED",
                        f"{service} needs a bearer token")
    return ApiError(grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED",
                    f"role {principal.role.value} may not call {service}")


class _Undecodable:
    """A request whose bytes are no valid message (a string field that is not UTF-8, which
    the edge's transcoder passes on from a query parameter): answered INVALID_ARGUMENT by the
    handler wrapper instead of the INTERNAL grpc gives when a deserializer raises."""

    def __init__(self, problem: str) -> None:
        self.problem = problem


def _lenient(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError as error:
            return _Undecodable(str(error))
    return parse


def _check_decoded(request: Any) -> None:
    if isinstance(request, _Undecodable):
        raise invalid_argument(FieldViolation(
            "", "the request is not a valid message (e.g. text that is not UTF-8): "
                + request.problem))


if TYPE_CHECKING:
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # grpc's runtime class is not generic; only its stubs are
    _Interceptor = grpc.aio.ServerInterceptor


class ServiceInterceptor(_Interceptor):
    """Access control and error translation around every handler of a service."""

    def __init__(self, table: Mapping[str, frozenset[Role]] = SERVICE_ROLES,
                 mesh_tls: bool = False, anonymous_streams_per_ip: int = 0) -> None:
        self._table = table
        self._mesh_tls = mesh_tls
        self._streams = AnonymousStreams(anonymous_streams_per_ip)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails],
                               Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        metadata = {key: value for key, value in handler_call_details.invocation_metadata or ()
                    if isinstance(value, str)}
        method = handler_call_details.method
        table, mesh_tls = self._table, self._mesh_tls

        def admission(context: grpc.aio.ServicerContext[Any, Any]) -> Principal | ApiError:
            peer = peer_of(context) if mesh_tls else None
            return _admit(method, metadata, table, _principal_of(metadata, peer, mesh_tls))
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _unary(handler.unary_unary, admission, method, metadata),
                request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _streaming(handler.unary_stream, admission, method, metadata, self._streams),
                request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                _unary(handler.stream_unary, admission, method, metadata),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        assert handler.stream_stream is not None
        return grpc.stream_stream_rpc_method_handler(
            _streaming(handler.stream_stream, admission, method, metadata, self._streams),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


_Admission = Callable[[grpc.aio.ServicerContext[Any, Any]], Principal | ApiError]


def _unary(behaviour: Callable[..., Any], admission: _Admission, method: str,
           metadata: dict[str, str]) -> Callable[..., Any]:
    async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        with _span(method, metadata) as span:
            try:
                admitted = admission(context)
                if isinstance(admitted, ApiError):
                    raise admitted
                _check_decoded(request)
                _principal.set(admitted)
                return await behaviour(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as error:
                await _refuse(context, error, span)
    return handle


#: The caller's address as the edge saw it (envoy/edge.yaml replaces any a client sends).
CLIENT_IP_HEADER = "x-televote-client-ip"


class AnonymousStreams:
    """The server streams anonymous callers hold open in this process, per client address.

    The edge limits how fast one address opens streams (ops/edge.py); this caps how many it
    holds at once on one replica, so one address cannot take every stream slot a replica
    has. Callers with a token are limited per subject at the edge instead."""

    def __init__(self, per_ip: int) -> None:
        self.per_ip = per_ip
        self._open: Counter[str] = Counter()

    @contextlib.contextmanager
    def hold(self, principal: Principal, metadata: dict[str, str]) -> Iterator[None]:
        if principal.role != Role.ANONYMOUS or self.per_ip <= 0:
            yield
            return
        address = metadata.get(CLIENT_IP_HEADER, "")
        if self._open[address] >= self.per_ip:
            raise ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_STREAMS",
                           f"at most {self.per_ip} open streams per address without a token")
        self._open[address] += 1
        try:
            yield
        finally:
            self._open[address] -= 1
            if not self._open[address]:
                del self._open[address]


def _streaming(behaviour: Callable[..., Any], admission: _Admission, method: str,
               metadata: dict[str, str], streams: AnonymousStreams,
               ) -> Callable[..., Awaitable[None]]:
    # A coroutine that writes, not an async generator that re-yields: one layer less per
    # message on streams that carry a countdown to ten thousand watchers.
    async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        with _span(method, metadata) as span:
            try:
                admitted = admission(context)
                if isinstance(admitted, ApiError):
                    raise admitted
                _check_decoded(request)
                _principal.set(admitted)
                with streams.hold(admitted, metadata):
                    result = behaviour(request, context)
                    if inspect.isasyncgen(result):
                        async for response in result:
                            await context.write(response)
                    else:  # a handler that writes with context.write() and returns
                        await result
            except grpc.aio.AbortError:
                raise
            except Exception as error:
                await _refuse(context, error, span)
    return handle
