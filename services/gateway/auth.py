"""Optional bearer tokens on the HTTP API, one for each family of routes, and on the
gRPC GatewayService.

Stock Atropos environments send no token to the trajectory API (`/register-env`,
`/scored_data`, `/batch`, ...) but do send `Authorization: Bearer <api_key>` to their
inference server, so the two are configured apart: `trajectory_token` guards the
trajectory routes, `inference_token` guards `/generate`, `/get_model_info` and
`/v1/*`. Either left unset leaves its routes open. `/health` and `/metrics` stay open
for probes and scrapers, and CORS preflights pass (browsers send no credentials on
them).

The check runs as the outermost middleware, before the body is read: a request
without the token costs no body buffering. A refusal is 401 with a JSON body (OpenAI's
error shape on `/v1/*`, the gateway's elsewhere) and `WWW-Authenticate: Bearer`.

Both also guard gRPC: every `clotho.v1.GatewayService` call (unary and streaming
alike) must carry metadata `authorization: Bearer <token>`, or it ends UNAUTHENTICATED
before any handler runs (`GrpcBearerInterceptor`, the server's first interceptor).
`GatewayService.Generate` takes the inference token, as its twin `/generate` does;
every other method the trajectory token. `grpc.health.v1.Health` and server reflection stay open for
probes. Clients send the token with `clotho.client.GatewayClient(target, token=...)`
(or `bearer_interceptors` on a channel), the trainer with `--gateway-token`.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc
from grpc import aio
from starlette.types import ASGIApp, Receive, Scope, Send

from clotho.client import plain_token

OPEN_PATHS = frozenset({"/health", "/metrics"})
INFERENCE = "inference"
TRAJECTORY = "trajectory"


def route_family(path: str) -> str | None:
    """Which token guards a path: "inference", "trajectory", or None (always open)."""
    if path in OPEN_PATHS:
        return None
    if path in ("/generate", "/get_model_info", "/v1") or path.startswith("/v1/"):
        return INFERENCE
    return TRAJECTORY


def _parse_bearer(value: str) -> str | None:
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def bearer_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    for key, value in headers:
        if key.lower() == b"authorization":
            return _parse_bearer(value.decode("latin-1"))
    return None


def _matches(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def _body(path: str, message: str) -> dict[str, Any]:
    if path.startswith("/v1"):
        return {"error": {"message": message, "type": "authentication_error", "param": None, "code": "invalid_api_key"}}
    return {"error": message, "code": "UNAUTHENTICATED"}


class BearerAuthMiddleware:
    """Refuses requests whose route family has a token they do not carry."""

    def __init__(self, app: ASGIApp, trajectory_token: str | None = None, inference_token: str | None = None) -> None:
        self.app = app
        self.tokens = {TRAJECTORY: trajectory_token or None, INFERENCE: inference_token or None}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") == "OPTIONS":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        family = route_family(path)
        expected = self.tokens.get(family) if family else None
        if expected is None:
            await self.app(scope, receive, send)
            return
        given = bearer_token(scope.get("headers", []))
        if _matches(given, expected):
            await self.app(scope, receive, send)
            return
        setting = f"{family}_token"
        message = (
            f"missing bearer token: {path} needs 'Authorization: Bearer <{setting}>'"
            if given is None
            else f"wrong bearer token for {path} (the gateway's {setting})"
        )
        payload = json.dumps(_body(path, message)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    (b"www-authenticate", b'Bearer realm="clotho"'),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


# Probes and tooling: the only services a guarded gRPC server leaves open.
OPEN_GRPC_SERVICES = frozenset(
    {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"}
)


def _grpc_bearer(metadata: Iterable[Any] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            return _parse_bearer(value.decode("latin-1") if isinstance(value, bytes) else value)
    return None


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that ends the call UNAUTHENTICATED. The
    streaming ones are async generators, as the tracing interceptor expects."""

    async def unary(_request: Any, context: aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def streaming(_request: Any, context: aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - never reached; makes this an async generator

    serde = (handler.request_deserializer, handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, *serde)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, *serde)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming, *serde)
    return grpc.stream_stream_rpc_method_handler(streaming, *serde)


# gRPC methods whose REST twins are inference routes; every other method is trajectory.
GRPC_INFERENCE_METHODS = frozenset({"/clotho.v1.GatewayService/Generate"})


class GrpcBearerInterceptor(aio.ServerInterceptor):
    """Refuses, UNAUTHENTICATED, every call without `authorization: Bearer <token>`
    metadata, except to the open services (health, reflection). The token is the
    trajectory token, or the inference token for GRPC_INFERENCE_METHODS; a family
    whose token is unset stays open. Fails closed: a service added to the server later
    is guarded by the trajectory token."""

    def __init__(self, token: str | None, inference_token: str | None = None) -> None:
        self._tokens = {TRAJECTORY: token or None, INFERENCE: inference_token or None}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        # method is "/package.Service/Method".
        if handler is None or method.lstrip("/").partition("/")[0] in OPEN_GRPC_SERVICES:
            return handler
        family = INFERENCE if method in GRPC_INFERENCE_METHODS else TRAJECTORY
        expected = self._tokens[family]
        if expected is None:
            return handler
        given = _grpc_bearer(handler_call_details.invocation_metadata)
        if _matches(given, expected):
            return handler
        setting = f"{family}_token"
        message = (
            f"missing bearer token: {method} needs metadata 'authorization: Bearer <{setting}>'"
            if given is None
            else f"wrong bearer token for {method} (the gateway's {setting})"
        )
        return _refusal(handler, message)


def grpc_interceptors(trajectory_token: Any, inference_token: Any = None) -> list[aio.ServerInterceptor]:
    """The gateway's gRPC auth check when either token (str or SecretStr) is set: pass
    as build_server's `interceptors`."""
    token, inference = plain_token(trajectory_token), plain_token(inference_token)
    return [GrpcBearerInterceptor(token, inference)] if token or inference else []


def install(app: Any, trajectory_token: Any, inference_token: Any) -> None:
    """Guard `app` when either token (a str or pydantic SecretStr) is set. Call it after
    every other middleware was added: the last added runs first."""
    trajectory_token, inference_token = plain_token(trajectory_token), plain_token(inference_token)
    if trajectory_token or inference_token:
        app.add_middleware(BearerAuthMiddleware, trajectory_token=trajectory_token, inference_token=inference_token)
