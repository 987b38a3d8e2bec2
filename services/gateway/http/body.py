"""ASGI middleware for request bodies: a size limit and `Content-Encoding: gzip`, and
the fast path for the ingest routes.

Atropos environments may gzip large `/scored_data_list` posts; the body is inflated
here so every route sees plain JSON. The limit applies to the bytes received and to
the inflated body, so a small gzip bomb cannot exhaust memory.

`/scored_data`, `/scored_data_list` and `/batch` are the gateway's hottest routes;
once their body is read they are answered right here (`fast_routes`), without the
framework's routing, middleware and telemetry layers, which cost about as much as the
handler. Cross-origin requests (an `Origin` header) take the full path, where CORS
answers them.

A JSON body no route can take (nested too deep, text that cannot be encoded: see
json_guard.py) is refused 400 here, naming the field, before any route reads it; the
fast routes ask only once their own parser has refused a body.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

from grpc import aio
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.errors import ClothoError
from services.gateway.http.errors import clotho_error_response, rpc_error_response
from services.gateway.http.json_guard import body_problem

# A fast route: the request body and scope in; a 200's JSON body and any headers
# beyond content-type and content-length out (domain errors and the inference
# service's statuses raised, answered through the error table), or None: not this
# request (it takes the full stack).
FastRoute = Callable[[bytes, Scope], Awaitable[tuple[bytes, list[tuple[bytes, bytes]]] | None]]


# Set in the scope of a request a fast route left to the full stack.
_DECLINED = "clotho.fast_route_declined"


class BodyTooLarge(Exception):
    pass


class BadGzip(Exception):
    pass


def _gunzip(data: bytes, limit: int) -> bytes:
    # wbits 16+MAX_WBITS: gzip header and trailer; max_length bounds the output.
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise BadGzip(str(exc)) from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise BodyTooLarge()
    if not inflater.eof:
        raise BadGzip("truncated gzip stream")
    return out


def _error(path: str, status: int, message: str, code: str, param: str | None = None) -> dict[str, Any]:
    """The gateway's error body, or OpenAI's shape on `/v1/*`."""
    if path == "/v1" or path.startswith("/v1/"):
        kind = "invalid_request_error"
        return {"error": {"message": message, "type": kind, "param": param, "code": code.lower()}}
    return {"error": message, "code": code}


async def _refuse_json(send: Send, path: str, problem: tuple[str, str]) -> None:
    """400 for a body no route can take (json_guard.py)."""
    field, message = problem
    await _reply(send, 400, _error(path, 400, message, "INVALID_ARGUMENT", param=field))


async def _reply(send: Send, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class RequestBodyMiddleware:
    """Reads the whole request body (bounded by `max_bytes`), inflates gzip, and hands
    the app a replay of it; later receive() calls go to the client (disconnects)."""

    def __init__(
        self, app: ASGIApp, max_bytes: int, fast_routes: dict[tuple[str, str], FastRoute] | None = None
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.fast_routes = fast_routes or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = [(k.lower(), v) for k, v in scope.get("headers", [])]
        encoding = b""
        length = None
        cross_origin = False
        for key, value in headers:
            if key == b"content-encoding":
                encoding = value.lower()
            elif key == b"content-length" and value.strip().isdigit():
                length = int(value)
            elif key == b"origin":
                cross_origin = True
        path = scope.get("path", "")
        too_large = _error(path, 413, f"request body exceeds max_body_bytes ({self.max_bytes})", "RESOURCE_EXHAUSTED")
        if length is not None and length > self.max_bytes:
            await _reply(send, 413, too_large)
            return

        chunks = []
        received = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.max_bytes:
                await _reply(send, 413, too_large)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)

        if b"gzip" in encoding:
            if body:
                try:
                    body = _gunzip(body, self.max_bytes)
                except BodyTooLarge:
                    await _reply(send, 413, too_large)
                    return
                except BadGzip as exc:
                    await _reply(send, 400, _error(path, 400, f"invalid gzip body: {exc}", "INVALID_ARGUMENT"))
                    return
            headers = [(k, v) for k, v in headers if k not in (b"content-encoding", b"content-length")]
            headers.append((b"content-length", str(len(body)).encode()))
            scope = {**scope, "headers": headers}

        fast = self.fast_routes.get((scope["method"], scope["path"]))
        if fast is not None and not cross_origin and not scope.get(_DECLINED):
            if await _answer(fast, body, scope, receive, send):
                return
            # The full stack behind the fast entry has this middleware again: it
            # need not ask the route a second time.
            scope = {**scope, _DECLINED: True}
        problem = body_problem(body) if body else None
        if problem is not None:
            await _refuse_json(send, path, problem)
            return

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _answer(route: FastRoute, body: bytes, scope: Scope, receive: Receive, send: Send) -> bool:
    """Answer with a fast route; False when the route leaves the request to the full
    stack (nothing sent)."""
    error: Response | None = None
    try:
        answered = await route(body, scope)
    except ClothoError as exc:
        # The ingest parser refuses what json_guard finds without naming the field.
        problem = body_problem(body)
        if problem is not None:
            await _refuse_json(send, scope.get("path", ""), problem)
            return True
        error = clotho_error_response(exc)
    except aio.AioRpcError as exc:
        error = rpc_error_response(exc)
    if error is not None:
        # As the full stack answers a same-origin request: CORS adds Vary.
        error.headers["vary"] = "Origin"
        await error(scope, receive, send)
        return True
    if answered is None:
        return False
    answer, headers = answered
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(answer)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": answer})
    return True
