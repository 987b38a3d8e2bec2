"""The one interceptor that turns domain errors (services/common/errors.py) raised by a
servicer into gRPC statuses; every server gets it from services/common/server.py.

A request that does not decode as its method's message is refused INVALID_ARGUMENT
(services/common/request_decoding.py). Anything else a servicer raises is a bug: it is logged in full here and the client gets
INTERNAL with a generic message that names no exception class, path or internal state.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from grpc import aio

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


async def _decoded(
    request: Any, streaming: bool, context: aio.ServicerContext[Any, Any]
) -> tuple[Any, DecodedStream | None]:
    """The request as the servicer sees it: a unary request that did not decode is
    refused here; a stream is read through DecodedStream."""
    if streaming:
        stream = DecodedStream(request)
        return stream, stream
    if isinstance(request, Undecodable):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
    return request, None


async def _undecodable(context: aio.ServicerContext[Any, Any], stream: DecodedStream | None) -> None:
    """Ends the call INVALID_ARGUMENT when a message of its request stream did not
    decode, whatever the servicer made of that."""
    if stream is not None and stream.failure is not None:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, stream.failure)


def _wrap(handler: grpc.RpcMethodHandler[_Req, _Resp], method: str) -> grpc.RpcMethodHandler[_Req, _Resp]:
    """Wrap every behaviour of a method handler so domain errors become statuses and
    anything unexpected becomes a generic INTERNAL.

    grpc's stubs type the behaviours as grpc.server's synchronous callables; under aio
    they return awaitables (or async iterators), hence Callable[..., Any] here."""

    request_streaming = bool(handler.stream_unary or handler.stream_stream)

    def unary(fn: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
        async def call(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            request, stream = await _decoded(request, request_streaming, context)
            try:
                result = await fn(request, context)
            except ClothoError as exc:
                await _undecodable(context, stream)
                await _abort(context, exc)
            except aio.AbortError:
                raise  # context.abort() already chose the status
            except Exception:  # noqa: BLE001 - a bug in a servicer: logged in full, answered INTERNAL
                await _undecodable(context, stream)
                await _internal(context, method)
            else:
                await _undecodable(context, stream)
                return result

        return call

    def streaming(fn: Callable[..., Any]) -> Callable[..., AsyncIterator[Any]]:
        async def call(request: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            request, stream = await _decoded(request, request_streaming, context)
            try:
                async for item in fn(request, context):
                    yield item
            except ClothoError as exc:
                await _undecodable(context, stream)
                await _abort(context, exc)
            except aio.AbortError:
                raise
            except Exception:  # noqa: BLE001 - a bug in a servicer: logged in full, answered INTERNAL
                await _undecodable(context, stream)
                await _internal(context, method)
            else:
                await _undecodable(context, stream)

        return call

    return rewrap(handler, unary, streaming, tolerant_deserializer(handler.request_deserializer, method))


def rewrap(
    handler: grpc.RpcMethodHandler[_Req, _Resp],
    unary: Callable[[Callable[..., Any]], Callable[..., Any]],
    streaming: Callable[[Callable[..., Any]], Callable[..., Any]],
    request_deserializer: Any = None,
) -> grpc.RpcMethodHandler[_Req, _Resp]:
    """`handler` with its behaviour wrapped by an interceptor: `unary(fn)` for a unary
    response; for a streamed one `streaming(fn)` when the behaviour is an async
    generator, else `unary(fn)` (a coroutine that writes through the context, as
    grpc.health.v1 Watch does: the wrapper must be of the same kind, grpc.aio asks
    which). The request deserializer is replaced when one is given."""
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


class ErrorInterceptor(aio.ServerInterceptor):
    """Turns ClothoError subclasses raised by servicers into their gRPC status."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[_Req, _Resp] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[_Req, _Resp] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return _wrap(handler, handler_call_details.method)
