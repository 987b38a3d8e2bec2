"""Every method handler a service registers, wrapped once as it is registered: domain
errors (services/common/errors.py) raised by a servicer become gRPC statuses, and the
call gets its server span (services/common/server_rpc_span.py). build_server
(services/common/server.py) hands the generated add_XServicer_to_server a `Registrar` in
place of the server, which wraps each handler before the server sees it.

A request that does not decode as its method's message is refused INVALID_ARGUMENT
(services/common/request_decoding.py). Anything else a servicer raises is a bug: it is
logged in full here and the client gets INTERNAL with a generic message that names no
exception class, path or internal state.

Why not grpc.aio ServerInterceptors (what this was): an interceptor runs on every call
(a coroutine per interceptor in the chain) and can only wrap a handler per call, so the
error mapping and the span each rebuilt an RpcMethodHandler, its closures and the
tolerant deserializer for every call, traced or not. Wrapped once, a call pays for
what it does: the error mapping's try, and the span only where tracing asks for one.
The interceptors a service still passes (the service-token check) run first, as
before: a refused call never reaches the wrapped handler.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any, TypeVar

import grpc
from grpc import aio

from services.common import server_rpc_span
from services.common.errors import ClothoError
from services.common.request_decoding import DecodedStream, Undecodable, tolerant_deserializer

log = logging.getLogger(__name__)

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


def grpc_code(exc: ClothoError) -> grpc.StatusCode:
    """The gRPC status of a domain error."""
    return grpc.StatusCode[exc.code.name]


# What a client is told about an unexpected failure (the server's log has the rest).
INTERNAL_MESSAGE = "internal error (logged by the server)"


async def _abort(context: aio.ServicerContext[Any, Any], exc: ClothoError) -> None:
    await context.abort(grpc_code(exc), str(exc))


async def _internal(context: aio.ServicerContext[Any, Any], method: str) -> None:
    log.exception("unexpected error in %s", method)
    await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)


async def _undecodable(context: aio.ServicerContext[Any, Any], stream: DecodedStream | None) -> None:
    """Ends the call INVALID_ARGUMENT when a message of its request stream did not
    decode, whatever the servicer made of that (a unary request has no stream)."""
    if stream is not None and stream.failure is not None:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, stream.failure)


async def _failed(
    exc: Exception, context: aio.ServicerContext[Any, Any], stream: DecodedStream | None, method: str
) -> None:
    """The status of a call whose servicer raised `exc` (awaited in the except clause,
    so a bug is logged with its traceback): INVALID_ARGUMENT for an undecodable request
    message, a domain error's own status, else a generic INTERNAL. Always raises."""
    await _undecodable(context, stream)
    if isinstance(exc, ClothoError):
        await _abort(context, exc)
    await _internal(context, method)


def wrap(handler: grpc.RpcMethodHandler[_Req, _Resp], method: str) -> grpc.RpcMethodHandler[_Req, _Resp]:
    """`handler` (of the full method name `method`) with every behaviour wrapped: domain
    errors become statuses, anything unexpected a generic INTERNAL, and each call is
    traced as server_rpc_span.MethodSpans decides (health probes: never).

    grpc's stubs type the behaviours as grpc.server's synchronous callables; under aio
    they return awaitables (or async iterators), hence Callable[..., Any] here."""
    request_streaming = bool(handler.stream_unary or handler.stream_stream)
    spans = server_rpc_span.method_spans(method)

    def unary(fn: Callable[..., Any]) -> Callable[..., Any]:
        async def call(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            opened = spans.open(context) if spans is not None else None
            error: BaseException | None = None
            stream = DecodedStream(request) if request_streaming else None
            try:
                if stream is None and isinstance(request, Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
                try:
                    result = await fn(request if stream is None else stream, context)
                except aio.AbortError:
                    raise  # context.abort() already chose the status
                except Exception as exc:  # noqa: BLE001 - a bug in a servicer: logged in full, answered INTERNAL
                    await _failed(exc, context, stream, method)
                else:
                    if stream is not None:
                        await _undecodable(context, stream)
                    return result
            except BaseException as exc:
                error = exc
                raise
            finally:
                if opened is not None:
                    server_rpc_span.close(opened, context, error)

        return call

    def streaming(fn: Callable[..., Any]) -> Callable[..., AsyncIterator[Any]]:
        async def call(request: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            opened = spans.open(context) if spans is not None else None
            error: BaseException | None = None
            stream = DecodedStream(request) if request_streaming else None
            try:
                if stream is None and isinstance(request, Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
                try:
                    async for item in fn(request if stream is None else stream, context):
                        yield item
                except aio.AbortError:
                    raise
                except Exception as exc:  # noqa: BLE001 - a bug in a servicer: logged in full, answered INTERNAL
                    await _failed(exc, context, stream, method)
                else:
                    if stream is not None:
                        await _undecodable(context, stream)
            except BaseException as exc:
                error = exc
                raise
            finally:
                if opened is not None:
                    server_rpc_span.close(opened, context, error)

        return call

    return _rewrap(handler, unary, streaming, tolerant_deserializer(handler.request_deserializer, method))


def _rewrap(
    handler: grpc.RpcMethodHandler[_Req, _Resp],
    unary: Callable[[Callable[..., Any]], Callable[..., Any]],
    streaming: Callable[[Callable[..., Any]], Callable[..., Any]],
    request_deserializer: Any,
) -> grpc.RpcMethodHandler[_Req, _Resp]:
    """`handler` with its behaviour wrapped: `unary(fn)` for a unary response; for a
    streamed one `streaming(fn)` when the behaviour is an async generator, else
    `unary(fn)` (a coroutine that writes through the context, as grpc.health.v1 Watch
    does: the wrapper must be of the same kind, grpc.aio asks which)."""
    deserializer = request_deserializer or handler.request_deserializer

    def either(fn: Callable[..., Any]) -> Callable[..., Any]:
        return streaming(fn) if inspect.isasyncgenfunction(fn) else unary(fn)

    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            unary(handler.unary_unary), deserializer, handler.response_serializer
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            unary(handler.stream_unary), deserializer, handler.response_serializer
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            either(handler.unary_stream), deserializer, handler.response_serializer
        )
    if handler.stream_stream is None:
        return handler  # a handler with no behaviour has nothing to wrap
    return grpc.stream_stream_rpc_method_handler(
        either(handler.stream_stream), deserializer, handler.response_serializer
    )


class _WrappedGeneric(grpc.GenericRpcHandler):
    """A generic handler whose method handlers come out wrapped (each wrapped once: the
    wrapping is kept while the generic handler hands out the same handler)."""

    def __init__(self, inner: grpc.GenericRpcHandler) -> None:
        self._inner = inner
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        hit = self._wrapped.get(method)
        if hit is not None and hit[0] is handler:
            return hit[1]
        wrapped = wrap(handler, method)
        if len(self._wrapped) < 1024:
            self._wrapped[method] = (handler, wrapped)
        return wrapped


class Registrar:
    """Stands in for a grpc.aio server in the generated add_XServicer_to_server (and
    health's, reflection's): every method handler registered through it reaches the
    server wrapped (see `wrap`)."""

    def __init__(self, server: aio.Server) -> None:
        self._server = server

    def add_registered_method_handlers(self, service: str, handlers: Mapping[str, Any]) -> None:
        self._server.add_registered_method_handlers(
            service, {name: wrap(h, f"/{service}/{name}") for name, h in handlers.items()}
        )

    def add_generic_rpc_handlers(self, generic_handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(tuple(_WrappedGeneric(h) for h in generic_handlers))
