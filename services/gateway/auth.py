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
before any handler runs (`grpc_bearer_interceptor`, the server's first interceptor).
`GatewayService.Generate` takes the inference token, as its twin `/generate` does;
every other method the trajectory token. `grpc.health.v1.Health` and server reflection stay open for
probes. Clients send the token with `clotho.client.GatewayClient(target, token=...)`
(or `bearer_interceptors` on a channel), the trainer with `--gateway-token`.
"""

from __future__ import annotations

import json
from typing import Any

from grpc import aio
from starlette.types import ASGIApp, Receive, Scope, Send

from clotho.client import plain_token
from services.common.access import BearerInterceptor, parse_bearer, token_matches

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


def bearer_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    for key, value in headers:
        if key.lower() == b"authorization":
            return parse_bearer(value.decode("latin-1"))
    return None


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
        if token_matches(given, expected):
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


# gRPC methods whose REST twins are inference routes; every other method is trajectory.
GRPC_INFERENCE_METHODS = frozenset({"/clotho.v1.GatewayService/Generate"})


def grpc_bearer_interceptor(token: str | None, inference_token: str | None = None) -> aio.ServerInterceptor:
    """Refuses, UNAUTHENTICATED, every call without `authorization: Bearer <token>`
    metadata, except to the open services (health, reflection). The token is the
    trajectory token, or the inference token for GRPC_INFERENCE_METHODS; a family
    whose token is unset stays open. Fails closed: a service added to the server later
    is guarded by the trajectory token. (services/common/access.py's BearerInterceptor
    with the gateway's two families.)"""
    tokens = {TRAJECTORY: token or None, INFERENCE: inference_token or None}

    def rule(method: str) -> tuple[str | None, str]:
        family = INFERENCE if method in GRPC_INFERENCE_METHODS else TRAJECTORY
        return tokens[family], f"{family}_token"

    return BearerInterceptor(rule, whose="the gateway's")


def grpc_interceptors(trajectory_token: Any, inference_token: Any = None) -> list[aio.ServerInterceptor]:
    """The gateway's gRPC auth check when either token (str or SecretStr) is set: pass
    as build_server's `interceptors`."""
    token, inference = plain_token(trajectory_token), plain_token(inference_token)
    return [grpc_bearer_interceptor(token, inference)] if token or inference else []


def install(app: Any, trajectory_token: Any, inference_token: Any) -> None:
    """Guard `app` when either token (a str or pydantic SecretStr) is set. Call it after
    every other middleware was added: the last added runs first."""
    trajectory_token, inference_token = plain_token(trajectory_token), plain_token(inference_token)
    if trajectory_token or inference_token:
        app.add_middleware(BearerAuthMiddleware, trajectory_token=trajectory_token, inference_token=inference_token)
