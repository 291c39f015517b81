"""The guard around every handler of every service: who is calling, may they, and how
refusals look.

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

Handlers are wrapped once, when they are registered (`GuardedServer`), not by a
grpc.aio.ServerInterceptor: an interceptor runs for every call (a coroutine that looks the
handler up and builds a new one around it), and with it a no-op call cost 1.3-1.7x the CPU of a
bare grpc.aio server's; wrapped at registration only what must be judged per call is
(bench/runtime_bench.py).
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError
from opentelemetry import context as otel_context
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


class _Span:
    """The server span of one call, current while the handler runs, a child of the caller's
    trace when it sent one. Started and attached directly: the SDK's
    start_as_current_span (two generator context managers) cost twice as much, on every call
    of the vote path, for a span that is not even recorded unless tracing is exported."""

    __slots__ = ("_token", "span")

    def __init__(self, name: str, attributes: dict[str, str], metadata: dict[str, str]) -> None:
        parent = propagate.extract(metadata)
        self.span = _tracer.start_span(name, context=parent, kind=SpanKind.SERVER,
                                       attributes=attributes, record_exception=False,
                                       set_status_on_exception=False)
        # In the current context, as start_as_current_span does: the caller's context is only
        # the span's parent (its baggage, sent by anyone, does not become this call's).
        self._token = otel_context.attach(trace.set_span_in_context(self.span))

    def __enter__(self) -> trace.Span:
        return self.span

    def __exit__(self, *exc: object) -> None:
        otel_context.detach(self._token)
        self.span.end()


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


def _refusal(service: str, table: Mapping[str, frozenset[Role]],
             principal: Principal) -> ApiError | None:
    """Why `principal` may not call `service`, or None when it may."""
    if allowed(service, principal.role, table):
        return None
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


def _metadata(context: grpc.aio.ServicerContext[Any, Any]) -> dict[str, str]:
    """The call's text headers (binary `-bin` ones are of no use to the guard)."""
    return {key: value for key, value in context.invocation_metadata() or ()
            if isinstance(value, str)}


class _Method:
    """What the guard knows of one method, worked out once when its handler is registered."""

    __slots__ = ("attributes", "mesh_tls", "service", "span_name", "table")

    def __init__(self, method: str, table: Mapping[str, frozenset[Role]], mesh_tls: bool) -> None:
        self.span_name = method.lstrip("/")
        self.service, _, name = self.span_name.partition("/")
        self.table = table
        self.attributes = {"rpc.system": "grpc", "rpc.service": self.service,
                           "rpc.method": name}
        self.mesh_tls = mesh_tls

    def admit(self, context: grpc.aio.ServicerContext[Any, Any],
              metadata: dict[str, str]) -> Principal:
        """The caller, judged on this call's own peer certificate and headers; raises the
        refusal when it may not call this method."""
        peer = peer_of(context) if self.mesh_tls else None
        principal = _principal_of(metadata, peer, self.mesh_tls)
        refusal = _refusal(self.service, self.table, principal)
        if refusal is not None:
            raise refusal
        return principal


class ServiceGuard:
    """Access control, error translation and the span around every handler of a service."""

    def __init__(self, table: Mapping[str, frozenset[Role]] = SERVICE_ROLES,
                 mesh_tls: bool = False, anonymous_streams_per_ip: int = 0) -> None:
        self._table = table
        self._mesh_tls = mesh_tls
        self._streams = AnonymousStreams(anonymous_streams_per_ip)

    def wrap(self, method: str,
             handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        """`handler` of the full method name `method` ("/package.Service/Method"), guarded."""
        known = _Method(method, self._table, self._mesh_tls)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _unary(handler.unary_unary, known),
                request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _streaming(handler.unary_stream, known, self._streams),
                request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                _unary(handler.stream_unary, known),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        assert handler.stream_stream is not None
        return grpc.stream_stream_rpc_method_handler(
            _streaming(handler.stream_stream, known, self._streams),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


if TYPE_CHECKING:
    _GenericHandler = grpc.GenericRpcHandler[Any, Any]
else:  # grpc's runtime class is not generic; only its stubs are
    _GenericHandler = grpc.GenericRpcHandler


class _GuardedGenericHandler(_GenericHandler):
    """A generic handler whose every method handler comes out guarded; each is wrapped the
    first time it is looked up and kept (with the handler it wraps, so its id stays its own)."""

    def __init__(self, inner: _GenericHandler, guard: ServiceGuard) -> None:
        self._inner = inner
        self._guard = guard
        self._wrapped: dict[int, tuple[Any, grpc.RpcMethodHandler[Any, Any]]] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails,
                ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        known = self._wrapped.get(id(handler))
        if known is None or known[0] is not handler:
            known = (handler, self._guard.wrap(handler_call_details.method, handler))
            self._wrapped[id(handler)] = known
        return known[1]


class GuardedServer(grpc.aio.Server):
    """A grpc.aio server whose handlers, however registered (the generated
    `add_XServicer_to_server`, `add_generic_rpc_handlers`), all run inside the guard."""

    def __init__(self, server: grpc.aio.Server, guard: ServiceGuard) -> None:
        self._server = server
        self._guard = guard

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Iterable[_GenericHandler]) -> None:
        self._server.add_generic_rpc_handlers(tuple(
            _GuardedGenericHandler(handler, self._guard) for handler in generic_rpc_handlers))

    def add_registered_method_handlers(
            self, service_name: str,
            method_handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]) -> None:
        registered: Any = self._server  # grpc's stubs lack add_registered_method_handlers
        registered.add_registered_method_handlers(service_name, {
            name: self._guard.wrap(f"/{service_name}/{name}", handler)
            for name, handler in method_handlers.items()})

    def add_insecure_port(self, address: str) -> int:
        return self._server.add_insecure_port(address)

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        return self._server.add_secure_port(address, server_credentials)

    async def start(self) -> None:
        await self._server.start()

    async def stop(self, grace: float | None = None) -> None:
        await self._server.stop(grace)

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        return await self._server.wait_for_termination(timeout)


def _unary(behaviour: Callable[..., Any], known: _Method) -> Callable[..., Any]:
    async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        metadata = _metadata(context)
        with _Span(known.span_name, known.attributes, metadata) as span:
            try:
                principal = known.admit(context, metadata)
                _check_decoded(request)
                _principal.set(principal)
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


def _streaming(behaviour: Callable[..., Any], known: _Method, streams: AnonymousStreams,
               ) -> Callable[..., Any]:
    # A coroutine that writes, not an async generator that re-yields: one layer less per
    # message on streams that carry a countdown to ten thousand watchers.
    async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        metadata = _metadata(context)
        with _Span(known.span_name, known.attributes, metadata) as span:
            try:
                principal = known.admit(context, metadata)
                _check_decoded(request)
                _principal.set(principal)
                with streams.hold(principal, metadata):
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
