"""The server interceptor every service runs: who is calling, may they, and how refusals look.

It wraps each handler so that
- the caller's Principal (from the edge's verified claims) is in a contextvar for the handler,
- a role outside the access table is refused with PERMISSION_DENIED before the handler runs,
- an ApiError raised anywhere below becomes the rich google.rpc.Status it describes,
- any other exception is logged with its trace and answered INTERNAL without leaking details,
- the call is one OpenTelemetry server span (parent from the caller's `traceparent`), with the
  gRPC status code the caller saw.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind

from runtime.access import ANONYMOUS, SERVICE_ROLES, Principal, Role, allowed
from runtime.errors import ApiError, FieldViolation, invalid_argument

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


def _admit(method: str, metadata: dict[str, str],
           table: Mapping[str, frozenset[Role]]) -> Principal | ApiError:
    principal = Principal.from_metadata(metadata)
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

    def __init__(self, table: Mapping[str, frozenset[Role]] = SERVICE_ROLES) -> None:
        self._table = table

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
        admission = _admit(method, metadata, self._table)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _unary(handler.unary_unary, admission, method, metadata),
                request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _streaming(handler.unary_stream, admission, method, metadata),
                request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                _unary(handler.stream_unary, admission, method, metadata),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        assert handler.stream_stream is not None
        return grpc.stream_stream_rpc_method_handler(
            _streaming(handler.stream_stream, admission, method, metadata),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


def _unary(behaviour: Callable[..., Any], admission: Principal | ApiError, method: str,
           metadata: dict[str, str]) -> Callable[..., Any]:
    async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        with _span(method, metadata) as span:
            try:
                if isinstance(admission, ApiError):
                    raise admission
                _check_decoded(request)
                _principal.set(admission)
                return await behaviour(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as error:
                await _refuse(context, error, span)
    return handle


def _streaming(behaviour: Callable[..., Any], admission: Principal | ApiError, method: str,
               metadata: dict[str, str]) -> Callable[..., Awaitable[None]]:
    # A coroutine that writes, not an async generator that re-yields: one layer less per
    # message on streams that carry a countdown to ten thousand watchers.
    async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        with _span(method, metadata) as span:
            try:
                if isinstance(admission, ApiError):
                    raise admission
                _check_decoded(request)
                _principal.set(admission)
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
