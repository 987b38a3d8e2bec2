"""One server span per inference HTTP request, continuing the caller's traceparent.

A streamed response outlives the handler, so it can take the span over (`hand_off`)
and end it when the stream ends; otherwise the span ends when the handler returns.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace

from services.common.telemetry import extract_context

tracer = trace.get_tracer("clotho.gateway")


class RequestSpan:
    def __init__(self, name: str, headers: Mapping[str, str]) -> None:
        self.span = tracer.start_span(name, context=extract_context(headers), kind=trace.SpanKind.SERVER)
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
