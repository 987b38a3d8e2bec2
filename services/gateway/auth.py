"""Optional bearer tokens on the HTTP API, one for each family of routes.

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
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

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
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
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
        if given is not None and hmac.compare_digest(given.encode(), expected.encode()):
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


def _plain(token: Any) -> str | None:
    value = token.get_secret_value() if hasattr(token, "get_secret_value") else token
    return value or None


def install(app: Any, trajectory_token: Any, inference_token: Any) -> None:
    """Guard `app` when either token (a str or pydantic SecretStr) is set. Call it after
    every other middleware was added: the last added runs first."""
    trajectory_token, inference_token = _plain(trajectory_token), _plain(inference_token)
    if trajectory_token or inference_token:
        app.add_middleware(BearerAuthMiddleware, trajectory_token=trajectory_token, inference_token=inference_token)
