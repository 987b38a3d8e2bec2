"""Server spans of the gateway's HTTP routes, continuing the caller's traceparent.

One span per request, opened and closed by GatewayApp around its dispatch while
tracing is on (services.common.telemetry.enabled; off, GatewayApp pays one attribute
read and nothing here runs): a SERVER span named by method and route
(`POST /scored_data`, `GET /v1/models/{model_id:path}`), its attributes set in bulk
(method, path, route, status), ended when the response (streamed ones included) is
complete. FastAPI's own telemetry is off: it made the server span, an operation span
per endpoint and, with ours, an internal span per inference route, three spans where
one says the same. The caller's context is only extracted when a header the
configured propagators read is there. When the export takes them (OTLP/gRPC, or
none), the server span is not an SDK span but a ServerSpan (an HttpServerSpan, or
for the usual request the C RootSpan, see http_spans): the same fields for a
fraction of the CPU (an ingest request paid ~45 us for the SDK's), opened inline
(`begin_request` / `end_request`: no coroutine or closure of their own per request;
the span itself wraps `send` to keep the status). Other exports read SDK spans:
`traced_request` runs the request under one.

`RequestSpan` is the inference routes' span around the gRPC calls they make: the
request's server span when there is one (the usual case), else a server span of its
own. A streamed response outlives the handler, so it can take the span over
(`hand_off`) and end it when the stream ends; otherwise the span ends when the
handler returns. A borrowed server span is ended by end_request (or traced_request),
never by them.
"""

from __future__ import annotations

import contextvars
import importlib
import logging
from collections.abc import Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanContext, SpanKind, StatusCode
from opentelemetry.trace.propagation import _SPAN_KEY
from opentelemetry.trace.span import DEFAULT_TRACE_STATE

from services.common import current_span, server_span, telemetry
from services.common.server_span import HttpServerSpan, RootSpan, ServerSpan
from services.common.span_sink import buffer_of
from services.common.telemetry import extract_context, server_span_recorder

tracer = trace.get_tracer("clotho.gateway")
_log = logging.getLogger(__name__)

# The server span of the request being answered when it is an SDK span (set by
# traced_request); an HttpServerSpan (begin_request) or a RootSpan (HttpSpans.begin)
# is known by its type.
_server_span: contextvars.ContextVar[trace.Span | None] = contextvars.ContextVar("clotho_server_span", default=None)
_REQUEST_SPAN_TYPES = (HttpServerSpan,) if RootSpan is None else (HttpServerSpan, RootSpan)


class RequestSpan:
    def __init__(self, name: str, headers: Mapping[str, str]) -> None:
        current = trace.get_current_span()
        self._owned = True
        if type(current) in _REQUEST_SPAN_TYPES or (
            current is not trace.INVALID_SPAN and current is _server_span.get()
        ):
            self.span = current
            self._owned = False
        elif current.get_span_context().is_valid:
            self.span = tracer.start_span(name, kind=SpanKind.INTERNAL)
        else:
            self.span = tracer.start_span(name, context=extract_context(headers), kind=SpanKind.SERVER)
        self._use: Any = None
        self._handed_off = False

    def __enter__(self) -> RequestSpan:
        if self._owned:
            self._use = trace.use_span(self.span, end_on_exit=False)
            self._use.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self._owned:
            return
        try:
            self._use.__exit__(*exc)
        finally:
            if not self._handed_off:
                self.span.end()

    def context(self) -> otel_context.Context:
        """The trace context to carry into gRPC calls made for this request."""
        return trace.set_span_in_context(self.span)

    def hand_off(self) -> trace.Span:
        """The caller (a streamed response) now ends the span (a borrowed server span:
        a stand-in whose end does nothing; traced_request ends the real one)."""
        if not self._owned:
            return trace.NonRecordingSpan(self.span.get_span_context())
        self._handed_off = True
        return self.span


def _parent_context(scope: Any) -> otel_context.Context | None:
    """The caller's context when the request carries a header the configured
    propagators read (`traceparent`, `baggage`, ...); None (the current one) else."""
    fields = telemetry.propagation().field_bytes
    headers = scope.get("headers", ())
    for key, _ in headers:  # ASGI header names are lower-case
        if key in fields:
            return extract_context({k.decode("latin-1"): v.decode("latin-1") for k, v in headers if k in fields})
    return None


_current_context = current_span.context_var
_Context = otel_context.Context
_EMPTY: dict[str, Any] = {}


def begin_request(scope: Any, send: Any) -> tuple[Any, Any, Any]:
    """Open the request's server span as a ServerSpan (the export takes them):
    (span, the `send` to answer through, the context token to end_request with);
    the span is made current. (None, None, None) when the export needs SDK spans:
    then run the request under traced_request.

    GatewayApp calls this and end_request around its own dispatch, with no
    coroutine or closure of their own per request: the span stands in for `send`
    (HttpServerSpan.send_status) and keeps the response's status. What the API's
    helpers do (get_current_span, set_span_in_context, attach) is done on the
    Context and its ContextVar directly: each of them reads the current context
    again. A request with no trace header under no current span (the usual one) is
    a root: the recorder's short way (Recorder.start_root)."""
    recorder = server_span_recorder("clotho.gateway")  # looked up once, then cached there
    if recorder is None:
        return None, None, None
    method, path = scope["method"], scope["path"]
    parent = _parent_context(scope)
    var = _current_context
    base = (otel_context.get_current() if var is None else var.get()) if parent is None else parent
    parent_span: Any = base.get(_SPAN_KEY) if base else None
    attributes = {"http.request.method": method, "url.path": path}
    if parent_span is None and recorder.root_inline:
        span: Any = recorder.start_root(f"{method} {path}", SpanKind.SERVER, attributes, HttpServerSpan)
    else:
        span = recorder.start(
            f"{method} {path}",
            None if parent_span is None else parent_span.get_span_context(),
            SpanKind.SERVER,
            attributes,
            base,
            HttpServerSpan,
        )
    ctx = _Context({**base, _SPAN_KEY: span} if base else {_SPAN_KEY: span})
    token = otel_context.attach(ctx) if var is None else var.set(ctx)
    if type(span) is not HttpServerSpan:  # not sampled: nothing to record
        return span, send, token
    span.send = send
    span.status_code = 0
    return span, span.send_status, token


def end_request(span: Any, scope: Any, token: Any, error: BaseException | None) -> None:
    """Close what begin_request opened, after the app answered (or raised `error`)."""
    var = _current_context
    if var is None:
        otel_context.detach(token)
    else:
        try:
            var.reset(token)
        except (ValueError, RuntimeError):  # a token of another context, or used: as otel_context.detach
            _log.exception("Failed to detach context")
    if type(span) is not HttpServerSpan:
        return
    # An ended span waits in the export queue (hundreds at a time): it must not keep
    # the request's objects (uvicorn's response cycle, its scope and buffers) alive
    # that long, where every garbage collection walks them.
    span.send = None
    if span._end_time is not None:
        return
    status = span.status_code
    if error is not None or status >= 500 or not status:
        _finish(span, scope, status, error)
        return
    # _finish's success case, written into the span's own attribute dict.
    path = scope["path"]
    route = scope.get("route")
    route = path if route is None else getattr(route, "path", None) or path
    if route != path:
        span._name = f"{scope['method']} {route}"
    attributes = span._attributes
    attributes["http.route"] = route
    attributes["http.response.status_code"] = status
    span.end()


def _finish(span: Any, scope: Any, status: int, error: BaseException | None) -> None:
    """The route, status and error of a recording server span; then it ends."""
    if span.is_recording():
        # The route template, when the router matched one (Starlette leaves it
        # in the scope); else the path.
        path = scope["path"]
        route = getattr(scope.get("route"), "path", None) or path
        if route != path:
            span.update_name(f"{scope['method']} {route}")
        ended: dict[str, Any] = {"http.route": route}
        if status:
            ended["http.response.status_code"] = status
        if error is not None or status >= 500 or not status:
            ended["error.type"] = type(error).__qualname__ if error is not None else str(status or "incomplete")
            span.set_attributes(ended)
            span.set_status(StatusCode.ERROR)
        else:
            span.set_attributes(ended)
    span.end()


class PySpans:
    """begin_request / end_request behind the interface of the C HttpSpans
    (services.common._otlp_fast), when that does not apply."""

    @staticmethod
    def begin(scope: Any, send: Any) -> tuple[Any, Any, Any]:
        return begin_request(scope, send)

    @staticmethod
    def end(span: Any, send: Any, scope: Any, token: Any, error: BaseException | None) -> None:
        end_request(span, scope, token, error)


_py_spans = PySpans()
try:  # built by `pip install` (optional, as the encoder it lives with)
    _fast: Any = importlib.import_module("services.common._otlp_fast")
    _HttpSpans: Any = _fast.HttpSpans
except (ImportError, AttributeError):
    _HttpSpans = None


def _detach_failed(error: BaseException) -> None:
    _log.error("Failed to detach context", exc_info=error)


def http_spans() -> Any:
    """What GatewayApp opens and closes a request's server span with while tracing is
    on: `begin(scope, send)` -> (span, send, token) as begin_request's, and
    `end(span, send, scope, token, error)` as end_request's.

    The C HttpSpans when the recorder starts roots inline (the default sampler, random
    ids) and the context is the default ContextVar one: the common request (no
    header the propagators read, an empty current context) is opened and closed
    without a Python frame, its span one object (a RootSpan: the span, its own
    `send`, its ids, times, name and attributes kept as C fields until asked for;
    ServerSpan's methods for the rest), and any other request, or a span that did
    not end in success, goes through begin_request / end_request and _finish, which
    it was built with. A recorder that is no longer telemetry's (tests swap them)
    sends every request that way too. Else PySpans (begin_request / end_request)."""
    recorder = server_span_recorder("clotho.gateway")
    var = _current_context
    if _HttpSpans is None or recorder is None or not recorder.root_inline or var is None:
        return _py_spans
    propagation = telemetry.propagation()
    return _HttpSpans(
        recorder,
        ServerSpan,
        var,
        _Context,
        _SPAN_KEY,
        SpanContext,
        recorder._root_sampled,
        DEFAULT_TRACE_STATE,
        server_span._UNSET,
        SpanKind.SERVER,
        recorder.on_end,
        vars(propagate),
        propagation.textmap,
        tuple(propagation.field_bytes),
        vars(telemetry),
        "clotho.gateway",
        begin_request,
        end_request,
        _finish,
        _detach_failed,
        buffer_of(recorder.on_end),
    )


async def traced_request(app: Any, scope: Any, receive: Any, send: Any) -> None:
    """Run the ASGI `app` for one HTTP request under its server span (an SDK span:
    exports that read SDK spans; GatewayApp takes begin_request's way otherwise)."""
    method, path = scope["method"], scope["path"]
    parent = _parent_context(scope)
    attributes = {"http.request.method": method, "url.path": path}
    span = tracer.start_span(f"{method} {path}", context=parent, kind=SpanKind.SERVER, attributes=attributes)
    status = 0

    async def send_status(message: Any) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        await send(message)

    token = otel_context.attach(trace.set_span_in_context(span, parent))
    span_token = _server_span.set(span)
    error: BaseException | None = None
    try:
        await app(scope, receive, send_status)
    except BaseException as exc:
        error = exc
        raise
    finally:
        _server_span.reset(span_token)
        otel_context.detach(token)
        _finish(span, scope, status, error)
