"""An SDK span exporter that keeps what it is given (ServerSpans included), and a
provider that batches into one: the span tests' in-memory collector; an exporter
that keeps each batch apart and can hold the exporting thread (Batches)."""

from __future__ import annotations

import threading
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind

from services.common.server_span import Recorder
from services.common.span_sink import SpanSink


class Collect(SpanExporter):
    accepts_server_spans = True

    def __init__(self) -> None:
        self.spans: list[Any] = []

    def export(self, spans: Any) -> SpanExportResult:
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS


class Batches(SpanExporter):
    """Keeps each exported batch; with `block`, each export waits for `release`
    (`entered` is set once one began)."""

    accepts_server_spans = True

    def __init__(self, block: bool = False) -> None:
        self.batches: list[list[Any]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        if not block:
            self.release.set()
        self.shut = False

    def export(self, spans: Any) -> SpanExportResult:
        self.batches.append(list(spans))
        self.entered.set()
        self.release.wait(10)
        return SpanExportResult.SUCCESS

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self.shut = True


def count(batch: list[Any]) -> int:
    """How many spans an exported batch holds (an EncodedSpan run counts its spans)."""
    return sum(getattr(span, "spans", 1) for span in batch)


def exported(batch: list[Any]) -> list[Any]:
    """An exported batch's spans as the receiver reads them (opentelemetry-proto Span
    messages, in order), whatever form they waited in (ServerSpans, SDK spans,
    written runs)."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    from services.common.otlp_encode import encode_request

    request = ExportTraceServiceRequest.FromString(encode_request(batch))
    return [s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]


def attributes(span: Any) -> dict[str, Any]:
    """A proto Span's attributes as {key: Python value} (scalars)."""
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in span.attributes}


def provider(sampler: Any = None, span_limits: Any = None) -> tuple[TracerProvider, Collect]:
    p = TracerProvider(resource=Resource.create({"service.name": "t"}), sampler=sampler, span_limits=span_limits)
    out = Collect()
    p.add_span_processor(BatchSpanProcessor(out))
    return p, out


def trace_with(monkeypatch: Any, p: TracerProvider, *tracer_names: str) -> None:
    """Tracing on for this test, as services.common.telemetry would install it: the
    recorders of `tracer_names` on provider `p` (whose export takes ServerSpans)."""
    from services.common import telemetry
    from services.common.server_span import Recorder

    monkeypatch.setattr(telemetry, "enabled", True)
    monkeypatch.setattr(telemetry, "_recorders", {name: Recorder.for_provider(p, name) for name in tracer_names})


def sink_provider(sink: SpanSink) -> tuple[TracerProvider, Recorder]:
    """A provider exporting through `sink` alone and the gateway's Recorder on it."""
    p, [recorder] = sink_recorders(sink, "clotho.gateway")
    return p, recorder


def sink_recorders(sink: SpanSink, *tracer_names: str) -> tuple[TracerProvider, list[Recorder]]:
    """A provider exporting through `sink` alone, and a Recorder per tracer name."""
    p = TracerProvider(resource=Resource.create({"service.name": "t"}))
    p.add_span_processor(sink)
    recorders = [Recorder.for_provider(p, name) for name in tracer_names]
    assert None not in recorders
    return p, recorders  # type: ignore[return-value]


def end_spans(recorder: Recorder, n: int) -> None:
    """End `n` gateway request spans (attribute `i`: 0 .. n-1) on this thread."""
    for i in range(n):
        span = recorder.start("POST /scored_data", None, SpanKind.SERVER, {"url.path": "/scored_data", "i": i})
        span.end()


def exporting_sink(monkeypatch: Any, endpoint: str, **kwargs: Any) -> SpanSink:
    """A SpanSink over telemetry's OTLP/gRPC exporter, sending in plaintext to
    `endpoint` (as OTEL_* variables name it); `kwargs` are SpanSink's."""
    from services.common.telemetry import _otlp_exporter

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    return SpanSink(_otlp_exporter({}), **kwargs)
