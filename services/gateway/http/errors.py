"""The one table from gRPC status codes to HTTP, and the JSON error bodies.

Every error the gateway answers over HTTP goes through here: domain errors raised by
the gateway itself, statuses coming back from the inference service, and request
bodies that fail validation (422, as FastAPI answers). The body is always JSON:
`{"error": "<what was wrong>", "code": "<gRPC code name>"}`, plus `detail` (a list of
problems) for validation errors. One exception to the table: a full trajectory store
answers 503 with `Retry-After` (what HTTP clients and Atropos' retrying senders
expect of "come back later"), though over gRPC it is RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from grpc import aio

from services.common.errors import ClothoError, StatusCode
from services.gateway.field_paths import field_path

log = logging.getLogger(__name__)

HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
# Request bodies that do not validate, as FastAPI answers them.
VALIDATION_STATUS = 422


# The same table by code name, so a domain error's StatusCode (services/common/errors.py)
# and a gRPC status from the inference service answer alike.
_HTTP_STATUS_BY_NAME = {code.name: status for code, status in HTTP_STATUS.items()}


def http_status(code: grpc.StatusCode | StatusCode) -> int:
    return _HTTP_STATUS_BY_NAME.get(code.name, 500)


def error_response(
    code: grpc.StatusCode | StatusCode, message: str, status: int | None = None, **extra: Any
) -> JSONResponse:
    return JSONResponse(
        {"error": message, "code": code.name, **extra},
        status_code=status if status is not None else http_status(code),
    )


def validation_response(problems: list[str], detail: list[Any] | None = None) -> JSONResponse:
    return error_response(
        grpc.StatusCode.INVALID_ARGUMENT,
        "; ".join(problems),
        status=VALIDATION_STATUS,
        detail=detail if detail is not None else problems,
    )


def clotho_error_response(exc: ClothoError) -> JSONResponse:
    """The answer to a domain error (also used by the ingest fast path). A domain
    error may say more than its code: `problems` (a list of what was wrong, as the
    scored-data validation raises) answers as a validation error; `retry_after`
    (seconds, as a full trajectory store raises) answers 503 with Retry-After."""
    problems = getattr(exc, "problems", None)
    if problems is not None:
        return validation_response(problems)
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        response = error_response(exc.code, str(exc), status=503)
        response.headers["Retry-After"] = str(retry_after)
        return response
    return error_response(exc.code, str(exc))


async def _clotho_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ClothoError)
    return clotho_error_response(exc)


def rpc_error_response(exc: aio.AioRpcError) -> JSONResponse:
    """The answer to a status from the inference service (also used by the fast path)."""
    code = exc.code()
    log.info("upstream call failed: %s %s", code.name, exc.details())
    return error_response(code, f"inference service: {exc.details() or code.name}")


async def _rpc_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, aio.AioRpcError)
    return rpc_error_response(exc)


async def _request_invalid(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = []
    for err in exc.errors():
        loc = [part for part in err.get("loc", ()) if part != "body"]
        problems.append(f"{field_path(loc) or 'body'}: {err.get('msg', 'invalid')}")
    detail = [{k: v for k, v in err.items() if k in ("loc", "msg", "type")} for err in exc.errors()]
    return validation_response(problems, detail)


def install(app: FastAPI) -> None:
    """Route every error through the table."""
    app.add_exception_handler(ClothoError, _clotho_error)
    app.add_exception_handler(aio.AioRpcError, _rpc_error)
    app.add_exception_handler(RequestValidationError, _request_invalid)
