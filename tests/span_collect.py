"""An SDK span exporter that keeps what it is given (ServerSpans included), and a
provider that batches into one: the span tests' in-memory collector."""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult


class Collect(SpanExporter):
    accepts_server_spans = True

    def __init__(self) -> None:
        self.spans: list[Any] = []

    def export(self, spans: Any) -> SpanExportResult:
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS


def provider(sampler: Any = None) -> tuple[TracerProvider, Collect]:
    p = TracerProvider(resource=Resource.create({"service.name": "t"}), sampler=sampler)
    out = Collect()
    p.add_span_processor(BatchSpanProcessor(out))
    return p, out
