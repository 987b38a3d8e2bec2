"""services.common.span_sink: the OTLP/gRPC exporter's span processor. Ended spans
queue on a list bounded like the SDK's batch processor (drops counted), leave in
runs of up to the batch size, and none is lost on flush or shutdown."""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind
from otlp_receiver import otlp_receiver
from span_collect import Batches

from services.common.server_span import Recorder
from services.common.span_sink import SpanSink
from services.common.telemetry import _otlp_exporter


def sink_provider(sink: SpanSink) -> tuple[TracerProvider, Recorder]:
    p = TracerProvider(resource=Resource.create({"service.name": "t"}))
    p.add_span_processor(sink)
    recorder = Recorder.for_provider(p, "clotho.gateway")
    assert recorder is not None
    return p, recorder


def end_spans(recorder: Recorder, n: int) -> None:
    for i in range(n):
        span = recorder.start("POST /scored_data", None, SpanKind.SERVER, {"url.path": "/scored_data", "i": i})
        span.end()


def test_the_recorder_hands_server_spans_straight_to_a_lone_sink() -> None:
    sink = SpanSink(Batches(), schedule_delay_millis=60_000)
    p, recorder = sink_provider(sink)
    assert recorder.on_end == sink.add
    end_spans(recorder, 3)
    assert len(sink._spans) == 3
    p.shutdown()


def test_the_queue_is_bounded_and_drops_are_counted() -> None:
    out = Batches(block=True)
    sink = SpanSink(out, schedule_delay_millis=60_000, max_queue_size=4, max_export_batch_size=4)
    p, recorder = sink_provider(sink)
    end_spans(recorder, 4)  # a full batch wakes the exporter, which takes it (and blocks)
    assert out.entered.wait(10)
    end_spans(recorder, 6)  # 4 fit in the queue again, 2 do not
    assert sink.dropped == 2
    out.release.set()
    assert sink.force_flush()
    assert [len(b) for b in out.batches] == [4, 4]
    assert [s._attributes["i"] for b in out.batches for s in b] == [0, 1, 2, 3, 0, 1, 2, 3]
    p.shutdown()


def test_sdk_spans_queue_on_the_same_sink_when_sampled() -> None:
    out = Batches()
    sink = SpanSink(out, schedule_delay_millis=60_000)
    p, recorder = sink_provider(sink)
    tracer = p.get_tracer("x")
    with tracer.start_as_current_span("child"):
        pass
    end_spans(recorder, 1)
    assert sink.force_flush()
    assert sorted(s.name for s in out.batches[0]) == ["POST /scored_data", "child"]
    p.shutdown()


def test_shutdown_exports_what_is_pending_then_stops_the_exporter() -> None:
    out = Batches()
    sink = SpanSink(out, schedule_delay_millis=60_000)
    p, recorder = sink_provider(sink)
    end_spans(recorder, 5)
    assert out.batches == []  # far from a batch, the schedule far away
    p.shutdown()
    assert [len(b) for b in out.batches] == [5] and out.shut
    assert not sink._thread.is_alive()
    end_spans(recorder, 1)  # after shutdown: dropped
    assert sink.dropped == 1 and [len(b) for b in out.batches] == [5]
    assert not sink.force_flush()


def test_a_full_batch_leaves_without_waiting_for_the_schedule() -> None:
    out = Batches()
    sink = SpanSink(out, schedule_delay_millis=60_000, max_export_batch_size=8)
    p, recorder = sink_provider(sink)
    end_spans(recorder, 8)
    assert out.entered.wait(10)
    assert [len(b) for b in out.batches] == [8]
    p.shutdown()


def test_a_run_of_spans_reaches_the_receiver_in_one_request(monkeypatch: Any) -> None:
    with otlp_receiver() as (receiver, endpoint):
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
        exporter = _otlp_exporter({})
        sink = SpanSink(exporter, schedule_delay_millis=60_000, max_export_batch_size=512, max_queue_size=2048)
        p, recorder = sink_provider(sink)
        end_spans(recorder, 300)
        assert sink.force_flush()
        assert receiver.request_sizes == [300]
        spans = receiver.find(lambda s: s.name == "POST /scored_data")
        assert sorted(s.attributes["i"] for s in spans) == list(range(300))
        assert {s.service for s in spans} == {"t"}
        p.shutdown()
