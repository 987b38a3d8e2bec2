"""Server spans of the mesh's gRPC services (grpc.aio servers), light.

opentelemetry-instrumentation-grpc's aio server interceptor wrapped every call, traced
or not: a wrapt proxy around the servicer context, the caller's context extracted and
a span started through the SDK (~25-30 us of CPU, see server_span.py) and, for a
streamed response, an async generator of its own that every message passed through --
and it did all of that with tracing off too, on every Generate and weight-update call.
The spans here keep what its spans said (a SERVER span named by the full method,
`rpc.system`, `rpc.service`, `rpc.method`, `rpc.grpc.status_code`, an ERROR status for
the codes the semantic conventions call server errors, the caller's `traceparent`
continued, the span current while the handler runs), opened and closed by the handler
wrapper every method gets once, at registration (services/common/method_handlers.py):
- tracing off (no SDK), a call only has its metadata looked at: a trace context
  carried there is made current, so it passes on to the next hop;
- the span is a services.common.server_span.ServerSpan when the export takes them,
  else an SDK span (console and OTLP/HTTP exports);
- the servicer context is not wrapped: the status is read from it when the call ends;
- health probes (grpc.health.v1.Health) make no span.
The peer address and user agent attributes of the instrumentation are not recorded:
they cost a parse per call, and a mesh's peers are its own services.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from typing import Any, Literal

import grpc
from grpc import aio
from opentelemetry import context as otel_context
from opentelemetry.trace import DEFAULT_TRACE_STATE, SpanContext, SpanKind
from opentelemetry.trace.propagation import _SPAN_KEY
from opentelemetry.trace.status import Status, StatusCode

from services.common import telemetry
from services.common.client_span import rpc_method
from services.common.current_span import context_var

TRACER_NAME = "clotho.grpc.server"
_STATUS_CODE = "rpc.grpc.status_code"
# What the semantic conventions count as a server's error; the rest (INVALID_ARGUMENT,
# NOT_FOUND, ...) are the caller's.
_SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
_CODES = {code.value[0]: code for code in grpc.StatusCode}
log = logging.getLogger(__name__)
_new_context = tuple.__new__  # SpanContext's own __new__ re-checks what the parse checked
try:  # built by `pip install` (services/common/_otlp_fast.c)
    _carried_traceparent: Any = importlib.import_module("services.common._otlp_fast").carried_traceparent
except ImportError:  # pragma: no cover - a checkout whose C extension is not built
    _carried_traceparent = None


def _carried(metadata: Any) -> dict[str, str] | None:
    """The metadata entries the configured propagators read, or None."""
    fields = telemetry.propagation().fields
    carrier = None
    for key, value in metadata or ():
        if key in fields:
            if carrier is None:
                carrier = {}
            carrier[key] = value if isinstance(value, str) else value.decode("latin-1")
    return carrier


def _short_parent(metadata: Any, recorder: Any) -> SpanContext | Literal[False] | None:
    """The caller's span context for the short way (None: no trace context carried),
    or False when the propagators must read the metadata (not the default ones, or
    anything but a lone well-formed traceparent). In C when built (one call: no
    regex, no int parses, no dict of the carried entries, in a process where this
    runs cold)."""
    propagation = telemetry.propagation()
    if not propagation.default:
        return False
    if _carried_traceparent is None:
        carrier = _carried(metadata)
        if carrier is None:
            return None
        parent = telemetry.remote_parent(carrier)
        return False if parent is None else parent
    found = _carried_traceparent(metadata, propagation.fields)
    if not found:  # None (nothing carried) or False
        return found  # type: ignore[no-any-return]
    trace_id, span_id, flags = found
    return _new_context(SpanContext, (trace_id, span_id, True, recorder._flags(flags), DEFAULT_TRACE_STATE, True))


class MethodSpans:
    """The server spans of one traced method, made for it once (see method_handlers.wrap)."""

    __slots__ = ("attributes", "method")

    def __init__(self, method: str, attributes: dict[str, Any]) -> None:
        self.method = method
        self.attributes = {**attributes, _STATUS_CODE: 0}

    def open(self, context: Any) -> tuple[Any, Any] | None:
        """At a call's start: (its span or None, the context token to detach), or None
        when there is nothing to do (tracing off and no trace context carried).

        The usual traced call (the tracer's Recorder sampling inline, the default
        ContextVar context, nothing current, no header or a lone traceparent of the
        mesh's) goes the short way: the span from the Recorder under the caller's span context, and a Context
        holding it alone set as current. This runs cold in the inference process (the
        model's forward pass has evicted it from every cache between two calls), where
        each Python layer skipped counts several times its warm cost."""
        metadata = context.invocation_metadata()
        if telemetry.enabled:
            var = context_var
            recorder = telemetry.server_span_recorder(TRACER_NAME)
            # A sampler the recorder must ask reads the parent from a Context: the long way.
            if var is not None and recorder is not None and recorder._inline is not None and not var.get():
                parent = _short_parent(metadata, recorder)
                if parent is not False:
                    span = recorder.start(self.method, parent, SpanKind.SERVER, self.attributes.copy())
                    return span, var.set(otel_context.Context({_SPAN_KEY: span}))
        carrier = _carried(metadata)
        incoming = telemetry.extract_context(carrier) if carrier is not None else None
        if not telemetry.enabled:
            return None if incoming is None else (None, otel_context.attach(incoming))
        base = incoming if incoming is not None else otel_context.get_current()
        span = telemetry.start_span(TRACER_NAME, self.method, base, SpanKind.SERVER, self.attributes)
        return span, otel_context.attach(otel_context.Context({**base, _SPAN_KEY: span}))


def method_spans(method: str) -> MethodSpans | None:
    """The span maker of a method, or None for one never traced (health probes)."""
    _, attributes, traced = rpc_method(method)
    return MethodSpans(method, attributes) if traced else None


def close(opened: tuple[Any, Any], context: Any, error: BaseException | None) -> None:
    """At a call's end: what MethodSpans.open returned, the servicer context and what
    the call raised (None when it returned)."""
    span, token = opened
    try:
        if context_var is not None:  # what detach does, without its layers
            context_var.reset(token)
        else:
            otel_context.detach(token)
    except Exception:  # a stream closed from another task: its context is gone anyway
        log.debug("trace context of a call not detached", exc_info=True)
    if span is None:
        return
    code = context.code()
    if isinstance(code, int):
        code = _CODES.get(code, grpc.StatusCode.UNKNOWN)
    if code is None:
        if error is None:
            code = grpc.StatusCode.OK
        elif isinstance(error, asyncio.CancelledError):
            code = grpc.StatusCode.CANCELLED
        else:
            code = grpc.StatusCode.UNKNOWN
    if code is not grpc.StatusCode.OK:
        span.set_attribute(_STATUS_CODE, code.value[0])
        if code in _SERVER_ERRORS:
            span.set_status(Status(StatusCode.ERROR, f"{code}:{context.details() or ''}"))
    if error is not None and not isinstance(error, (aio.AbortError, asyncio.CancelledError)):
        span.record_exception(error)
    span.end()
