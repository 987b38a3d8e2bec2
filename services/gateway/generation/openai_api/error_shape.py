"""OpenAI's error shape, `{"error": {"message", "type", "param", "code"}}`, with the
status from the gateway's one gRPC-to-HTTP table, and the route class that answers
every error of the OpenAI routes in it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from grpc import aio

from services.common.errors import ClothoError
from services.gateway.http.errors import http_status

log = logging.getLogger(__name__)

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def error_type(status: int) -> str:
    return _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


def error_response(status: int, message: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, code, param), status_code=status)


def error_from_exception(exc: Exception) -> tuple[int, dict[str, Any]]:
    if isinstance(exc, ClothoError):
        status = http_status(exc.code)
        return status, error_body(status, str(exc), exc.code.name.lower(), getattr(exc, "param", None))
    assert isinstance(exc, aio.AioRpcError)
    code = exc.code()
    status = http_status(code)
    return status, error_body(status, f"inference service: {exc.details() or code.name}", code.name.lower())


class OpenAIRoute(APIRoute):
    """Routes whose errors leave in OpenAI's shape instead of the gateway's."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except (ClothoError, aio.AioRpcError) as exc:
                status, body = error_from_exception(exc)
                if status >= 500:
                    log.info("%s %s: %s", request.method, request.url.path, body["error"]["message"])
                return JSONResponse(body, status_code=status)

        return handle
