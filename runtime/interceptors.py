"""The server interceptor every service runs: who is calling, may they, and how refusals look.

It wraps each handler so that
- the caller's Principal (from the edge's verified claims) is in a contextvar for the handler,
- a role outside the access table is refused with PERMISSION_DENIED before the handler runs,
- an ApiError raised anywhere below becomes the rich google.rpc.Status it describes,
- any other exception is logged with its trace and answered INTERNAL without leaking details.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import grpc

from runtime.access import ANONYMOUS, SERVICE_ROLES, Principal, Role, allowed
from runtime.errors import ApiError

log = logging.getLogger(__name__)

_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar(
    "principal", default=ANONYMOUS)


def current_principal() -> Principal:
    """The authenticated caller of the RPC being handled."""
    return _principal.get()


async def _refuse(context: grpc.aio.ServicerContext[Any, Any], error: Exception) -> None:
    if isinstance(error, NotImplementedError):
        # The generated base servicer's answer for an RPC whose issue has not landed yet.
        error = ApiError(grpc.StatusCode.UNIMPLEMENTED, "NOT_IMPLEMENTED",
                         "this RPC is not implemented yet")
    if isinstance(error, ApiError):
        await context.abort_with_status(error.to_status())  # type: ignore[attr-defined]
    log.exception("unhandled error in handler")
    await context.abort(grpc.StatusCode.INTERNAL, "internal error")


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
        admission = _admit(handler_call_details.method, metadata, self._table)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _unary(handler.unary_unary, admission),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _streaming(handler.unary_stream, admission),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                _unary(handler.stream_unary, admission),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        assert handler.stream_stream is not None
        return grpc.stream_stream_rpc_method_handler(
            _streaming(handler.stream_stream, admission),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


def _unary(behaviour: Callable[..., Any], admission: Principal | ApiError) -> Callable[..., Any]:
    async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            if isinstance(admission, ApiError):
                raise admission
            _principal.set(admission)
            return await behaviour(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await _refuse(context, error)
    return handle


def _streaming(behaviour: Callable[..., Any],
               admission: Principal | ApiError) -> Callable[..., AsyncIterator[Any]]:
    async def handle(request: Any,
                     context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        try:
            if isinstance(admission, ApiError):
                raise admission
            _principal.set(admission)
            result = behaviour(request, context)
            if inspect.isasyncgen(result):
                async for response in result:
                    yield response
            else:  # a handler that writes with context.write() and returns
                await result
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await _refuse(context, error)
    return handle
