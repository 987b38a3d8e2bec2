"""Domain errors: what a service raises when a request cannot be served, each with the
status code it becomes.

Services raise these; nothing else in a service touches status codes. `code` is a
`StatusCode` named exactly as gRPC's, so this module imports no grpc and code below the
wire (the gateway's trajectory store, the engines) can raise them. Two places turn them
into answers: services/common/method_handlers.py (gRPC statuses, every method handler of
every server wrapped once) and services/gateway/http/errors.py (HTTP, one table).
"""

from __future__ import annotations

import enum


class StatusCode(enum.Enum):
    """The gRPC status codes a domain error can carry, by gRPC's names."""

    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    UNAVAILABLE = "unavailable"
    FAILED_PRECONDITION = "failed_precondition"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    ABORTED = "aborted"
    UNAUTHENTICATED = "unauthenticated"
    PERMISSION_DENIED = "permission_denied"
    INTERNAL = "internal"


class ClothoError(Exception):
    """Base of every domain error; `code` is the status it becomes."""

    code = StatusCode.INTERNAL


class InvalidArgument(ClothoError):
    code = StatusCode.INVALID_ARGUMENT


class NotFound(ClothoError):
    code = StatusCode.NOT_FOUND


class ResourceExhausted(ClothoError):
    code = StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ClothoError):
    code = StatusCode.UNAVAILABLE


class FailedPrecondition(ClothoError):
    code = StatusCode.FAILED_PRECONDITION


class DeadlineExceeded(ClothoError):
    code = StatusCode.DEADLINE_EXCEEDED


class Aborted(ClothoError):
    code = StatusCode.ABORTED
