"""services.inference.torch_engine.spans: a request's engine spans written straight
from their fields (SpanBuffer.add_spans) are the spans the object path writes (the
same OTLP bytes but for the span ids, and the same tree); the object path still
takes what the field writer does not (a failed request, a trace state, a sampler
to ask), and an unsampled or unexported request makes nothing."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState
from span_collect import Batches, attributes, exported, trace_with

from services.common.span_sink import SpanSink
from services.inference.generation_types import FinishReason, GenerationRequest, SamplingOptions, VersionSpan
from services.inference.torch_engine import spans as engine_spans
from services.inference.torch_engine.batch import RequestState, SampleState

ENGINE = engine_spans.TRACER_NAME
T0 = 1_765_000_000_000_000_000


def request_of(parent: SpanContext | None, n: int = 2, commit_mid_sample: bool = True) -> RequestState:
    """A traced request whose samples have ended: the second sample's output spans a
    weight commit (two decode spans) when `commit_mid_sample`."""
    spec = GenerationRequest([5, 6, 7], SamplingOptions(n=n), request_id="req-1")
    request = RequestState(spec, 4, frozenset(), torch.Generator(), None, None)  # type: ignore[arg-type]
    ctx = otel_context.Context() if parent is None else trace.set_span_in_context(NonRecordingSpan(parent))
    request.trace_ctx = ctx
    request.shard = "torch-0"
    request.submitted_ns, request.admitted_ns, request.prefilled_ns = T0, T0 + 1_000, T0 + 5_000
    request.admitted_with = 3
    for index in range(n):
        sample = SampleState(request, index)
        sample.output_ids = [1, 2, 3, 4]
        sample.spans = [VersionSpan(0, 7)]
        sample.span_times = [T0 + 6_000 + index]
        if commit_mid_sample and index == 1:
            sample.spans.append(VersionSpan(2, 8))
            sample.span_times.append(T0 + 8_000)
        sample.finish_reason = FinishReason.LENGTH if index == 0 else FinishReason.STOP
        sample.finished_ns = T0 + 9_000 + index
        request.samples_done.append(sample)
    return request


def sink_tracing(monkeypatch: pytest.MonkeyPatch, sampler: Any = None) -> tuple[TracerProvider, SpanSink]:
    sink = SpanSink(Batches(), schedule_delay_millis=60_000)
    p = TracerProvider(resource=Resource.create({"service.name": "t"}), sampler=sampler)
    p.add_span_processor(sink)
    trace_with(monkeypatch, p, ENGINE)
    monkeypatch.setattr(engine_spans, "_writer_of", None)
    return p, sink


def taken(sink: SpanSink) -> list[Any]:
    """Everything queued in `sink`, as the receiver reads it."""
    batch: list[Any] = list(sink._spans)
    sink._spans.clear()
    if sink._buffer is not None:
        while (run := sink._buffer.take(512)) is not None:
            batch.append(run)
    return exported(batch)


def written_both_ways(monkeypatch: pytest.MonkeyPatch, parent: SpanContext | None) -> tuple[list[Any], list[Any]]:
    """The spans of one request written by add_spans, then by span objects."""
    p, sink = sink_tracing(monkeypatch)
    if sink._buffer is None:
        pytest.skip("the C extension is not built")
    engine_spans.write_request_spans(request_of(parent), "torch-0")
    fields = taken(sink)
    monkeypatch.setattr(engine_spans, "_writer", lambda: None)  # the object path
    engine_spans.write_request_spans(request_of(parent), "torch-0")
    objects = taken(sink)
    p.shutdown()
    return fields, objects


def without_ids(span: Any, trace_id: bool = False) -> bytes:
    """The span's bytes with its span ids (and `trace_id`) cleared."""
    span = type(span).FromString(span.SerializeToString())
    span.span_id = span.parent_span_id = b""
    if trace_id:
        span.trace_id = b""
    return span.SerializeToString()


def tree(spans: list[Any]) -> list[tuple[str, str]]:
    """(span, its parent's name or its parent's id as hex when outside the tree)."""
    names = {s.span_id: s.name for s in spans}
    return [(s.name, names.get(s.parent_span_id, s.parent_span_id.hex())) for s in spans]


@pytest.mark.parametrize("remote", [False, True])
def test_the_field_writer_writes_the_span_objects_bytes(monkeypatch: pytest.MonkeyPatch, remote: bool) -> None:
    parent = SpanContext(0xABC, 0xDEF, is_remote=remote, trace_flags=TraceFlags(1))
    fields, objects = written_both_ways(monkeypatch, parent)
    names = ["engine.queue", "engine.prefill", "engine.decode", "engine.decode", "engine.decode", "engine.generate"]
    assert [s.name for s in fields] == names
    assert [without_ids(s) for s in fields] == [without_ids(s) for s in objects]
    assert tree(fields) == tree(objects)
    assert tree(fields)[-1] == ("engine.generate", f"{0xDEF:016x}")
    assert all(name == "engine.generate" for _, name in tree(fields)[:-1])
    assert {s.trace_id for s in fields} == {(0xABC).to_bytes(16, "big")}
    assert len({s.span_id for s in fields}) == len(fields) and all(any(s.span_id) for s in fields)
    generate = attributes(fields[-1])
    assert generate["clotho.output_tokens"] == 8 and generate["clotho.finish_reason"] == "mixed"
    assert [e.name for e in fields[-1].events] == ["first_token"]
    assert fields[-1].events[0].time_unix_nano == T0 + 6_000
    decodes = [attributes(s) for s in fields if s.name == "engine.decode"]
    assert [(d["clotho.sample"], d["clotho.policy_version"], d["clotho.tokens"]) for d in decodes] == [
        (0, 7, 4),
        (1, 7, 2),
        (1, 8, 2),
    ]


def test_a_request_without_a_parent_span_is_a_root_of_a_trace_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    fields, objects = written_both_ways(monkeypatch, None)
    assert [without_ids(s, trace_id=True) for s in fields] == [without_ids(s, trace_id=True) for s in objects]
    assert tree(fields) == tree(objects) and fields[-1].parent_span_id == b""
    assert len({s.trace_id for s in fields}) == 1 and any(fields[0].trace_id)


def test_unsampled_and_unexported_requests_make_no_spans(monkeypatch: pytest.MonkeyPatch) -> None:
    p, sink = sink_tracing(monkeypatch)
    unsampled = SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=TraceFlags(0))
    engine_spans.write_request_spans(request_of(unsampled), "torch-0")
    assert sink.queued() == 0
    p.shutdown()
    # OTEL_TRACES_EXPORTER=none: a provider with no processor.
    none = TracerProvider(resource=Resource.create({"service.name": "t"}))
    trace_with(monkeypatch, none, ENGINE)
    monkeypatch.setattr(engine_spans, "_writer_of", None)
    made: list[Any] = []
    monkeypatch.setattr(engine_spans, "_write_objects", lambda *a: made.append(a))
    engine_spans.write_request_spans(request_of(SpanContext(1, 2, False, TraceFlags(1))), "torch-0")
    assert made == []


def test_what_the_field_writer_leaves_is_written_as_span_objects(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed request (its exception event and status), a parent's trace state and
    a sampler the recorder must ask all go the object way, and are exported."""
    p, sink = sink_tracing(monkeypatch)
    failed = request_of(SpanContext(0xABC, 0xDEF, False, TraceFlags(1)))
    failed.error = RuntimeError("engine died")
    engine_spans.write_request_spans(failed, "torch-0")
    spans = taken(sink)
    assert spans[-1].name == "engine.generate" and spans[-1].status.code == 2  # the root ends last
    assert [e.name for e in spans[-1].events] == ["first_token", "exception"]
    assert len(spans) == 6
    stated = SpanContext(0xABC, 0xDEF, False, TraceFlags(1), TraceState([("k", "v")]))
    engine_spans.write_request_spans(request_of(stated, n=1, commit_mid_sample=False), "torch-0")
    spans = taken(sink)
    assert len(spans) == 4 and {s.trace_state for s in spans} == {"k=v"}
    p.shutdown()

    p, sink = sink_tracing(monkeypatch, sampler=TraceIdRatioBased(1.0))
    assert engine_spans._writer() is None
    engine_spans.write_request_spans(request_of(None, n=1, commit_mid_sample=False), "torch-0")
    assert [s.name for s in taken(sink)] == ["engine.queue", "engine.prefill", "engine.decode", "engine.generate"]
    p.shutdown()


def test_a_full_queue_drops_and_counts_the_spans_past_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    sink = SpanSink(Batches(), schedule_delay_millis=60_000, max_queue_size=4, max_export_batch_size=4)
    if sink._buffer is None:
        pytest.skip("the C extension is not built")
    p = TracerProvider(resource=Resource.create({"service.name": "t"}))
    p.add_span_processor(sink)
    trace_with(monkeypatch, p, ENGINE)
    monkeypatch.setattr(engine_spans, "_writer_of", None)
    sink._buffer.wake = None  # no wake-up at a full batch: the exporter (60 s schedule) takes nothing meanwhile
    engine_spans.write_request_spans(request_of(SpanContext(1, 2, False, TraceFlags(1))), "torch-0")
    assert len(sink._buffer) == 4 and sink.dropped == 2
    p.shutdown()


def test_add_spans_writes_nothing_of_a_tree_it_cannot_write_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """A value of no OTLP type, a malformed item or a parent index out of the tree:
    False and nothing queued (the caller writes span objects then)."""
    p, sink = sink_tracing(monkeypatch)
    if sink._buffer is None:
        pytest.skip("the C extension is not built")
    recorder = engine_spans._writer()[1]  # type: ignore[index]
    good = ("engine.queue", -1, T0, T0 + 1, {"a": 1}, ())
    bads: list[tuple[Any, ...]] = [
        ("engine.decode", -1, T0, T0 + 1, {"obj": object()}, ()),
        ("engine.decode", 5, T0, T0 + 1, {}, ()),
        ("engine.decode", -1, T0, T0 + 1, {}, (("first_token", "not a time"),)),
        ("engine.decode", -1, T0, T0 + 1, {}),
    ]
    for bad in bads:
        assert sink._buffer.add_spans(recorder, 1, 2, False, 1, [good, bad]) is False
        assert len(sink._buffer) == 0
    assert sink._buffer.add_spans(recorder, 1, 2, False, 1, [good, good]) is True
    assert len(sink._buffer) == 2
    p.shutdown()
