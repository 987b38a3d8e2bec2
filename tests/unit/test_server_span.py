"""services.common.server_span: the gateway's per-request span without the SDK's span
machinery. It must sample as the provider's sampler does, parent SDK spans, and encode
to the same OTLP bytes as the SDK span it stands for."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider, sampling
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, StatusCode, TraceFlags
from span_collect import Collect, provider

from services.common import otlp_encode
from services.common.otlp_encode import encode_request
from services.common.server_span import Recorder, ServerSpan


def remote(sampled: bool) -> SpanContext:
    return SpanContext(0xABC, 0xDEF, True, TraceFlags(1 if sampled else 0))


def test_recorder_only_for_exporters_that_take_server_spans() -> None:
    p, _ = provider()
    assert Recorder.for_provider(p, "x") is not None
    assert Recorder.for_provider(TracerProvider(), "x") is not None  # exporter "none"

    class Other(Collect):
        accepts_server_spans = False

    q = TracerProvider()
    q.add_span_processor(BatchSpanProcessor(Other()))
    assert Recorder.for_provider(q, "x") is None
    assert Recorder.for_provider(trace.NoOpTracerProvider(), "x") is None


def test_default_sampler_follows_the_parent() -> None:
    p, _ = provider()
    rec = Recorder.for_provider(p, "x")
    assert rec is not None
    root = rec.start("r", None, SpanKind.SERVER, {})
    assert isinstance(root, ServerSpan) and root.get_span_context().trace_flags.sampled
    child = rec.start("c", remote(True), SpanKind.SERVER, {})
    ctx = child.get_span_context()
    assert isinstance(child, ServerSpan) and ctx.trace_id == 0xABC and ctx.trace_flags.sampled
    unsampled = rec.start("u", remote(False), SpanKind.SERVER, {})
    assert isinstance(unsampled, NonRecordingSpan)
    assert unsampled.get_span_context().trace_id == 0xABC and not unsampled.get_span_context().trace_flags.sampled


def test_other_samplers_are_asked() -> None:
    for sampler, recorded in ((sampling.ALWAYS_OFF, False), (sampling.TraceIdRatioBased(1.0), True)):
        p, _ = provider(sampler)
        rec = Recorder.for_provider(p, "x")
        assert rec is not None
        span = rec.start("r", None, SpanKind.SERVER, {})
        assert isinstance(span, ServerSpan) is recorded
        assert span.get_span_context().trace_flags.sampled is recorded


def test_parents_sdk_spans_and_encodes_like_the_sdk_span() -> None:
    p, out = provider()
    rec = Recorder.for_provider(p, "clotho.gateway")
    assert rec is not None
    span: Any = rec.start("POST /x", remote(True), SpanKind.SERVER, {"http.request.method": "POST", "url.path": "/x"})
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        with p.get_tracer("inner").start_as_current_span("inner") as inner:
            parent = getattr(inner, "parent", None)
            assert parent is not None and parent.span_id == span.get_span_context().span_id
    finally:
        otel_context.detach(token)
    span.update_name("POST /{route}")
    span.set_attributes({"http.route": "/{route}", "http.response.status_code": 500})
    span.set_status(StatusCode.ERROR)
    span.add_event("e", {"k": 1})
    span.end()
    p.force_flush()
    server = [s for s in out.spans if isinstance(s, ServerSpan)]
    assert len(server) == 1 and len(out.spans) == 2

    # The SDK span with the same fields encodes to the same bytes.
    sdk: Any = p.get_tracer("clotho.gateway").start_span(
        "POST /x",
        context=trace.set_span_in_context(NonRecordingSpan(remote(True))),
        kind=SpanKind.SERVER,
        attributes={"http.request.method": "POST", "url.path": "/x"},
        start_time=span._start_time,
    )
    sdk._context = span.get_span_context()
    sdk.update_name("POST /{route}")
    sdk.set_attributes({"http.route": "/{route}", "http.response.status_code": 500})
    sdk.set_status(StatusCode.ERROR)
    sdk.add_event("e", {"k": 1}, timestamp=span._events[0].timestamp)
    sdk.end(end_time=span._end_time)
    p.force_flush()
    assert encode_request([server[0]]) == encode_request([out.spans[-1]])


@pytest.fixture(params=["c", "python"])
def encoder(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """otlp_encode's ServerSpan runs from the C extension (_otlp_fast), then from
    Python: both must write the SDK's bytes."""
    if request.param == "c":
        if otlp_encode._encode_server_spans is None:
            pytest.skip("the C extension services.common._otlp_fast is not built")
    else:
        monkeypatch.setattr(otlp_encode, "_encode_server_spans", None)
    monkeypatch.setattr(otlp_encode, "_server_cache", {})
    return str(request.param)


def test_server_spans_encode_to_the_sdk_encoders_bytes(encoder: str) -> None:
    """encode_request's ServerSpan way (a per-route template around ids and times)
    writes what the SDK's own OTLP encoder writes for SDK spans with the same fields:
    roots, local and remote parents, kinds, every scalar attribute type (True and 1
    under one key, which a template keyed by value alone would confuse), error
    statuses, a span with an event, the same route twice, SDK spans in between."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    p, _ = provider()
    rec = Recorder.for_provider(p, "clotho.gateway")
    assert rec is not None
    local = SpanContext(0x1234, 0x5678, False, TraceFlags(1))
    cases: list[tuple[str, SpanContext | None, SpanKind, dict[str, Any], Any]] = [
        ("POST /scored_data", None, SpanKind.SERVER, {"m": "POST", "code": 200}, None),
        ("POST /scored_data", None, SpanKind.SERVER, {"m": "POST", "code": 200}, None),
        ("POST /scored_data", remote(True), SpanKind.SERVER, {"m": "POST", "code": 200}, None),
        ("/clotho.v1.X/Generate", local, SpanKind.CLIENT, {"flag": True, "n": 1, "f": 0.5}, None),
        ("/clotho.v1.X/Generate", local, SpanKind.CLIENT, {"flag": 1, "n": True, "f": 0.5}, None),
        ("GET /x", None, SpanKind.SERVER, {"code": 500, "e": "boom"}, (StatusCode.ERROR, "bad")),
        ("GET /x", None, SpanKind.SERVER, {"code": 500}, (StatusCode.ERROR, None)),
        ("GET /y", None, SpanKind.INTERNAL, {}, (StatusCode.OK, None)),
        ("GET /event", None, SpanKind.SERVER, {"a": "b"}, "event"),
    ]
    ours: list[Any] = []
    twins: list[Any] = []
    sdk_tracer = p.get_tracer("clotho.gateway")
    other = p.get_tracer("other")
    for i, (name, parent, kind, attributes, extra) in enumerate(cases):
        span: Any = rec.start(name, parent, kind, dict(attributes))
        if isinstance(extra, tuple):
            span.set_status(extra[0], extra[1])
        elif extra == "event":
            span.add_event("e", {"k": 1})
        span.end()
        ours.append(span)
        parent_ctx = None if parent is None else trace.set_span_in_context(NonRecordingSpan(parent))
        twin: Any = sdk_tracer.start_span(
            name, context=parent_ctx, kind=kind, attributes=attributes, start_time=span._start_time
        )
        twin._context = span.get_span_context()
        if isinstance(extra, tuple):
            twin.set_status(extra[0], extra[1])
        elif extra == "event":
            twin.add_event("e", {"k": 1}, timestamp=span._events[0].timestamp)
        twin.end(end_time=span._end_time)
        twins.append(twin)
        if i % 3 == 1:  # an SDK span of another scope in between
            with other.start_as_current_span(f"sdk {i}") as sdk:
                pass
            ours.append(sdk)
            twins.append(sdk)
        if i % 3 == 2:  # an SDK span of the same scope in between: it splits the run
            with sdk_tracer.start_as_current_span(f"same scope {i}") as sdk:
                pass
            ours.append(sdk)
            twins.append(sdk)
    p.force_flush()
    assert encode_request(ours) == encode_spans(twins).SerializeToString()


def test_the_c_encoder_writes_what_python_writes() -> None:
    """_otlp_fast against otlp_encode's Python for ServerSpans the template covers and
    those it hands back (events, a trace state, an unhashable attribute, one not
    ended), cache cold and warm."""
    if otlp_encode._encode_server_spans is None:
        pytest.skip("the C extension services.common._otlp_fast is not built")
    from opentelemetry.trace.span import TraceState

    p, _ = provider()
    rec = Recorder.for_provider(p, "x")
    assert rec is not None
    spans: list[Any] = []
    for i in range(40):
        parent = None if i % 3 == 0 else SpanContext(1 << 127 | i, (1 << 63) | i, i % 2 == 0, TraceFlags(1))
        span: Any = rec.start(f"route {i % 4}", parent, SpanKind(i % 5), {"i": i % 2, "s": "x" * (i % 3)})
        if i % 7 == 0:
            span.add_event("e", {"k": i})
        if i % 11 == 0:
            span._attributes["unhashable"] = [1, 2]
        if i % 13 == 0:
            span._context = SpanContext(
                span._context.trace_id, span._context.span_id, False, TraceFlags(1), TraceState([("k", "v")])
            )
        if i % 5 == 0:
            span.set_status(StatusCode.ERROR, "no" if i % 2 else None)
        if i != 39:
            span.end()
        spans.append(span)
    for _ in range(2):  # cold, then warm cache
        c = otlp_encode._encode_server_spans(
            spans, otlp_encode._server_cache, otlp_encode._server_parts, otlp_encode._span_field
        )
        assert c == b"".join(map(otlp_encode.encode_server_span, spans))


def test_a_batch_of_one_recorders_server_spans_encodes_as_the_general_way(monkeypatch: pytest.MonkeyPatch) -> None:
    """encode_request's short way (every span a ServerSpan of one recorder: one C
    run) writes what the span-by-span grouping writes; a mixed batch takes the latter."""
    if otlp_encode._encode_server_spans is None:
        pytest.skip("the C extension services.common._otlp_fast is not built")
    p, out = provider()
    rec = Recorder.for_provider(p, "clotho.gateway")
    other = Recorder.for_provider(p, "other")
    assert rec is not None and other is not None
    spans: list[Any] = []
    for i in range(20):
        span: Any = rec.start("POST /scored_data", None, SpanKind.SERVER, {"url.path": "/scored_data", "i": i % 3})
        if i % 4 == 0:
            span.set_status(StatusCode.ERROR, "bad" if i % 8 else None)
        span.end()
        spans.append(span)
    assert otlp_encode._common_recorder(spans) is rec
    fast = encode_request(spans)
    monkeypatch.setattr(otlp_encode, "_common_recorder", lambda _spans: None)
    assert fast == encode_request(spans)
    monkeypatch.undo()
    mixed = [*spans, other.start("x", None, SpanKind.INTERNAL, {})]
    mixed[-1].end()
    assert otlp_encode._common_recorder(mixed) is None
    with p.get_tracer("sdk").start_as_current_span("sdk"):
        pass
    p.force_flush()
    assert otlp_encode._common_recorder([*spans, *out.spans]) is None
    assert otlp_encode._common_recorder([]) is None


def test_spans_made_in_c_hold_what_init_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    """server_span's _new_span (C) and ServerSpan.__init__ make the same span."""
    from services.common import server_span

    if server_span._new_span is None:
        pytest.skip("the C extension services.common._otlp_fast is not built")
    from services.common.server_span import HttpServerSpan

    p, _ = provider()
    rec = Recorder.for_provider(p, "x")
    assert rec is not None
    made: list[Any] = []
    for new in (server_span._new_span, None):
        monkeypatch.setattr(server_span, "_new_span", new)
        made.append(rec.start("n", remote(True), SpanKind.SERVER, {"a": 1}, None, HttpServerSpan))
        made.append(rec.start_root("r", SpanKind.CLIENT, {"b": 2}, ServerSpan))
    fields = [f for f in ServerSpan.__slots__ if f not in ("_start_time",)]
    for c, py in ((made[0], made[2]), (made[1], made[3])):
        assert type(c) is type(py)
        for f in fields:
            if f != "_context":
                assert getattr(c, f) == getattr(py, f), f
        assert c._start_time > 0 and abs(c._start_time - py._start_time) < 10**9
        assert c.is_recording() and c._context.is_valid and c._context.trace_flags.sampled
    made[0].end()
    assert not made[0].is_recording()
