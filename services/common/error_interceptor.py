"""The one interceptor that turns domain errors (services/common/errors.py) raised by a
servicer into gRPC statuses; every server gets it from services/common/server.py."""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from services.common.errors import ClothoError

log = logging.getLogger(__name__)


def grpc_code(exc: ClothoError) -> grpc.StatusCode:
    """The gRPC status of a domain error."""
    return grpc.StatusCode[exc.code.name]


async def _abort(context: aio.ServicerContext, exc: ClothoError) -> None:
    await context.abort(grpc_code(exc), str(exc))


def _wrap(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """Wrap every behaviour of a method handler so domain errors become statuses."""

    def unary(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def call(request: Any, context: aio.ServicerContext) -> Any:
            try:
                return await fn(request, context)
            except ClothoError as exc:
                await _abort(context, exc)

        return call

    def streaming(fn: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
        async def call(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for item in fn(request, context):
                    yield item
            except ClothoError as exc:
                await _abort(context, exc)

        return call

    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            unary(handler.unary_unary),
            handler.request_deserializer,
            handler.response_serializer,
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            unary(handler.stream_unary),
            handler.request_deserializer,
            handler.response_serializer,
        )

    def either(fn: Callable[..., Any]) -> Callable[..., Any]:
        # A streaming handler is an async generator, or a coroutine that writes through
        # the context (grpc.health.v1 Watch does that).
        return streaming(fn) if inspect.isasyncgenfunction(fn) else unary(fn)

    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            either(handler.unary_stream),
            handler.request_deserializer,
            handler.response_serializer,
        )
    return grpc.stream_stream_rpc_method_handler(
        either(handler.stream_stream),
        handler.request_deserializer,
        handler.response_serializer,
    )


class ErrorInterceptor(aio.ServerInterceptor):
    """Turns ClothoError subclasses raised by servicers into their gRPC status."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return _wrap(handler)
