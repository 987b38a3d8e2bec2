"""Server spans of the gateway's HTTP routes, continuing the caller's traceparent.

FastAPI's own telemetry opens a server span for every route it answers. The ingest
routes (`/scored_data`, `/scored_data_list`, `/batch`) are answered on the fast entry
below FastAPI (GatewayApp), so `traced_fast_route` opens theirs, only while tracing is
on (services.common.telemetry.enabled): off, the fast entry pays one attribute read.

`RequestSpan` is the inference routes' span around the gRPC calls they make: a child
of FastAPI's span when there is one, else a server span of its own. A streamed
response outlives the handler, so it can take the span over (`hand_off`) and end it
when the stream ends; otherwise the span ends when the handler returns.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

from services.common.telemetry import extract_context

tracer = trace.get_tracer("clotho.gateway")


class RequestSpan:
    def __init__(self, name: str, headers: Mapping[str, str]) -> None:
        if trace.get_current_span().get_span_context().is_valid:
            self.span = tracer.start_span(name, kind=SpanKind.INTERNAL)
        else:
            self.span = tracer.start_span(name, context=extract_context(headers), kind=SpanKind.SERVER)
        self._use: Any = None
        self._handed_off = False

    def __enter__(self) -> RequestSpan:
        self._use = trace.use_span(self.span, end_on_exit=False)
        self._use.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self._use.__exit__(*exc)
        finally:
            if not self._handed_off:
                self.span.end()

    def context(self) -> otel_context.Context:
        """The trace context to carry into gRPC calls made for this request."""
        return trace.set_span_in_context(self.span)

    def hand_off(self) -> trace.Span:
        """The caller (a streamed response) now ends the span."""
        self._handed_off = True
        return self.span


def _scope_headers(scope: Any) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}


async def traced_fast_route(app: Any, scope: Any, receive: Any, send: Any) -> None:
    """Run the ASGI `app` for one request under a server span named by its method and
    path, the response status recorded on it."""
    method, path = scope["method"], scope["path"]
    span = tracer.start_span(
        f"{method} {path}",
        context=extract_context(_scope_headers(scope)),
        kind=SpanKind.SERVER,
        attributes={"http.request.method": method, "url.path": path, "http.route": path},
    )

    async def send_status(message: Any) -> None:
        if message["type"] == "http.response.start":
            status = int(message["status"])
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(StatusCode.ERROR)
        await send(message)

    with trace.use_span(span, end_on_exit=True):
        await app(scope, receive, send_status)
