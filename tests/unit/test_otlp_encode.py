"""services.common.otlp_encode writes the same ExportTraceServiceRequest as the SDK's
encode_spans: spans of every shape (kinds, parents local and remote, trace state,
attributes of every type, events, links, status, two resources and scopes)."""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    set_span_in_context,
)
from opentelemetry.trace.span import TraceState

from services.common.otlp_encode import encode_request


class Keep(SpanExporter):
    def __init__(self) -> None:
        self.spans: list = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS


def _spans() -> list:
    keep = Keep()
    providers = [
        TracerProvider(resource=Resource.create({"service.name": "a", "n": 3})),
        TracerProvider(resource=Resource({"service.name": "b"}, schema_url="https://example/schema")),
    ]
    for p in providers:
        p.add_span_processor(SimpleSpanProcessor(keep))
    remote = SpanContext(
        0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, True, TraceFlags(1), TraceState([("k", "v")])
    )
    local = SpanContext(0x1, 0x2, False, TraceFlags(1))
    for i, p in enumerate(providers):
        for tracer in (
            p.get_tracer("t1"),
            p.get_tracer("t2", "1.0", schema_url="https://s", attributes={"x": 1}),
            p.get_tracer("t1"),
        ):
            with tracer.start_as_current_span(
                "root",
                kind=SpanKind.SERVER,
                attributes={
                    "s": "POST",
                    "empty": "",
                    "i": 200,
                    "zero": 0,
                    "neg": -5,
                    "big": 2**62,
                    "f": 1.5,
                    "f0": 0.0,
                    "b": True,
                    "bf": False,
                    "ls": ["a", "b"],
                    "li": [1, 2],
                    "lb": [True],
                    "lf": [0.5],
                    "le": (),
                    "long": "x" * 300,
                },
                links=[Link(local, {"why": "batch"}), Link(remote)],
            ) as root:
                root.add_event("first_token", {"t": i})
                root.add_event("bare")
                root.set_status(Status(StatusCode.ERROR, "boom"))
                with tracer.start_as_current_span("child", kind=SpanKind.CLIENT) as child:
                    child.set_status(StatusCode.OK)
            tracer.start_span("under-remote", context=set_span_in_context(NonRecordingSpan(remote))).end()
            tracer.start_span("internal", kind=SpanKind.PRODUCER, start_time=0).end(end_time=5)
    return keep.spans


def test_same_request_as_the_sdk_encoder() -> None:
    spans = _spans()
    ours = ExportTraceServiceRequest.FromString(encode_request(spans))
    theirs = encode_spans(spans)
    assert ours == theirs
    # Twice: the cached resource, scope and attribute bytes give the same answer.
    assert encode_request(spans) == encode_request(spans)
    assert ExportTraceServiceRequest.FromString(encode_request(spans[:3])) == encode_spans(spans[:3])
