"""services.common.span_sink: the OTLP/gRPC exporter's span processor. Ended spans
queue on a list bounded like the SDK's batch processor (drops counted), leave in
runs of up to the batch size, and none is lost on flush or shutdown."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry.trace import SpanKind
from otlp_receiver import otlp_receiver
from span_collect import (
    Batches,
    attributes,
    count,
    end_spans,
    exported,
    exporting_sink,
    sink_provider,
    sink_recorders,
)

from services.common.span_sink import SpanSink


def test_the_recorder_hands_server_spans_straight_to_a_lone_sink() -> None:
    """A Recorder's spans end straight into the sink (no fan-out); with the C
    extension they wait as their bytes, not as objects."""
    sink = SpanSink(Batches(), schedule_delay_millis=60_000)
    p, recorder = sink_provider(sink)
    assert recorder.on_end == sink.add_server
    end_spans(recorder, 3)
    assert sink.queued() == 3
    if sink._buffer is not None:
        assert sink._spans == [] and len(sink._buffer) == 3
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
    assert [count(b) for b in out.batches] == [4, 4]
    assert [attributes(s)["i"] for b in out.batches for s in exported(b)] == [0, 1, 2, 3, 0, 1, 2, 3]
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
    assert sorted(s.name for s in exported(out.batches[0])) == ["POST /scored_data", "child"]
    p.shutdown()


def test_shutdown_exports_what_is_pending_then_stops_the_exporter() -> None:
    out = Batches()
    sink = SpanSink(out, schedule_delay_millis=60_000)
    p, recorder = sink_provider(sink)
    end_spans(recorder, 5)
    assert out.batches == []  # far from a batch, the schedule far away
    p.shutdown()
    assert [count(b) for b in out.batches] == [5] and out.shut
    assert sink._thread is not None and not sink._thread.is_alive()
    end_spans(recorder, 1)  # after shutdown: dropped
    assert sink.dropped == 1 and [count(b) for b in out.batches] == [5]
    assert not sink.force_flush()


def test_a_full_batch_leaves_without_waiting_for_the_schedule() -> None:
    out = Batches()
    sink = SpanSink(out, schedule_delay_millis=60_000, max_export_batch_size=8)
    p, recorder = sink_provider(sink)
    end_spans(recorder, 8)
    assert out.entered.wait(10)
    assert [count(b) for b in out.batches] == [8]
    p.shutdown()


def test_a_run_of_spans_reaches_the_receiver_in_one_request(monkeypatch: Any) -> None:
    with otlp_receiver() as (receiver, endpoint):
        sink = exporting_sink(
            monkeypatch, endpoint, schedule_delay_millis=60_000, max_export_batch_size=512, max_queue_size=2048
        )
        p, recorder = sink_provider(sink)
        end_spans(recorder, 300)
        assert sink.force_flush()
        assert receiver.request_sizes == [300]
        spans = receiver.find(lambda s: s.name == "POST /scored_data")
        assert sorted(s.attributes["i"] for s in spans) == list(range(300))
        assert {s.service for s in spans} == {"t"}
        p.shutdown()


def test_server_spans_wait_as_the_bytes_the_encoder_writes_for_them() -> None:
    """Every ServerSpan (not only the gateway's request spans) is written as its OTLP
    bytes when it ends, in runs by recorder; byte for byte what the encoder
    (otlp_encode.encode_server_span, checked against the SDK's in test_server_span)
    writes for the same span, whatever it holds: attribute values of every kind,
    events with attributes, an error status, a remote parent. What the C writer
    leaves (links, a trace state, a value of no OTLP type) is written by the
    encoder as the span ends: nothing waits as an object."""
    from opentelemetry.trace import Link, SpanContext, Status, StatusCode, TraceFlags, TraceState

    from services.common import otlp_encode

    sink = SpanSink(Batches(), schedule_delay_millis=60_000)
    if sink._buffer is None:
        pytest.skip("the C extension is not built")
    p, [engine, server] = sink_recorders(sink, "clotho.inference.engine", "clotho.inference")
    remote = SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=TraceFlags(1))
    rpc = server.start("/clotho.Inference/Generate", remote, SpanKind.SERVER, {"rpc.system": "grpc"})
    values = {
        "s": "text",
        "u": "ünïcödé",
        "empty": "",
        "neg": -3,
        "big": (1 << 64) + 5,  # past 64 bits: its low 64, as the encoder masks it
        "t": True,
        "f": 0.25,
        "b": b"\x00\xff",
        "strs": ("a", "b"),
        "ints": (1, -2, 3),
        "mixed": ("x", 1, 2.5, False),
        "nested": (("a",), (1, 2)),
        "kv": {"k": "v", "n": 1},
        "": "empty key",
    }
    generate = engine.start("engine.generate", rpc.get_span_context(), SpanKind.INTERNAL, dict(values))
    generate.add_event("first_token", timestamp=1_700_000_000_000_000_123)
    generate.add_event("note", {"tokens": 3, "why": "x", "list": ("a",)})
    generate.record_exception(ValueError("bad"))
    generate.set_status(Status(StatusCode.ERROR, "went wrong"))
    decode = engine.start("engine.decode", generate.get_span_context(), SpanKind.INTERNAL, {"clotho.tokens": 7})
    decode.set_status(StatusCode.OK)
    linked: Any = engine.start("linked", None, SpanKind.INTERNAL, {})
    linked._links = (Link(remote, {"why": "batch"}),)
    stated = engine.start(
        "stated", SpanContext(1, 2, True, TraceFlags(1), TraceState([("k", "v")])), SpanKind.INTERNAL, {}
    )
    odd = engine.start("odd", None, SpanKind.INTERNAL, {"obj": object(), "ok": 1})
    spans: list[Any] = [decode, generate, linked, stated, odd, rpc]
    for span in spans:
        span.end()

    assert sink._spans == [] and len(sink._buffer) == 6
    runs = []
    while (run := sink._buffer.take(512)) is not None:
        runs.append(run)
    # One run per stretch of one recorder's spans, in the order they ended.
    assert [(r._recorder, r.spans) for r in runs] == [(engine, 5), (server, 1)]
    assert runs[0].data == b"".join(otlp_encode.encode_server_span(s) for s in spans[:5])
    assert runs[1].data == otlp_encode.encode_server_span(rpc)
    assert otlp_encode.encode_request(runs) == otlp_encode.encode_request(spans)
    read = exported(runs)
    assert [s.name for s in read] == [s._name for s in spans]
    got = attributes(read[1])
    assert got["u"] == "ünïcödé" and got["big"] == 5 and got["neg"] == -3 and got["b"] == b"\x00\xff"
    assert [e.name for e in read[1].events] == ["first_token", "note", "exception"]
    assert read[1].status.code == 2 and read[1].status.message == "went wrong"
    assert read[2].links[0].span_id == (0xDEF).to_bytes(8, "big") and read[3].trace_state == "k=v"
    assert attributes(read[4]) == {"ok": 1}  # the value of no OTLP type is left out, as the SDK's encoder does
    p.shutdown()


def test_a_span_that_cannot_be_written_does_not_fail_the_code_ending_it(caplog: Any) -> None:
    """A ServerSpan neither the C writer nor the encoder can write (a field of an odd
    type) ends without raising in the service's code: it waits as itself, and the
    exporter logs the failure, as for any span it cannot encode."""
    from services.common.otlp_encode import encode_request

    class Encoding(Batches):  # encodes each batch, as the OTLP exporter does
        def export(self, spans: Any) -> Any:
            encode_request(list(spans))
            return super().export(spans)

    sink = SpanSink(Encoding(), schedule_delay_millis=60_000)
    if sink._buffer is None:
        pytest.skip("the C extension is not built")
    p, recorder = sink_provider(sink)
    span: Any = recorder.start("odd", None, SpanKind.INTERNAL, {})
    span._kind = "not a SpanKind"
    span.end()
    end_spans(recorder, 1)
    assert sink._spans == [span] and len(sink._buffer) == 1
    with caplog.at_level("ERROR"):
        assert sink.force_flush()
    assert "Exception while exporting spans" in caplog.text
    p.shutdown()


def test_a_span_ending_while_another_is_written_keeps_both_whole() -> None:
    """Writing a span can run Python code (an event's properties), where another
    thread may take the GIL and end a span into the same sink: each span is written
    whole, the one that ended meanwhile first."""
    from opentelemetry.sdk.trace import Event

    from services.common import otlp_encode

    sink = SpanSink(Batches(), schedule_delay_millis=60_000)
    if sink._buffer is None:
        pytest.skip("the C extension is not built")
    p, recorder = sink_provider(sink)
    outer: Any = recorder.start("outer", None, SpanKind.SERVER, {"k": "v"})
    inner = recorder.start("inner", None, SpanKind.INTERNAL, {"n": 1})
    ended: list[Any] = []

    class EndsAnother(Event):
        @property
        def name(self) -> str:
            if not ended:  # what another thread could do here
                ended.append(inner)
                inner.end()
            return "e"

    outer._events = [EndsAnother("e", {"a": 1}, 123)]
    outer.end()
    assert ended == [inner] and len(sink._buffer) == 2 and sink._spans == []
    run = sink._buffer.take(512)
    assert run.spans == 2
    assert run.data == otlp_encode.encode_server_span(inner) + otlp_encode.encode_server_span(outer)
    p.shutdown()


def test_spans_of_recorders_that_alternate_leave_as_a_run_per_recorder() -> None:
    """A request's spans end recorder after recorder (its client span, then its server
    span): the buffer keeps a lane per recorder, so a batch takes each recorder's
    spans as one run (not an object per span for the exporter to walk in Python),
    the lane whose oldest span came first first, and the request is what the
    encoder writes for the spans themselves."""
    from services.common import otlp_encode

    out = Batches()
    sink = SpanSink(out, schedule_delay_millis=60_000)
    if sink._buffer is None:
        pytest.skip("the C extension is not built")
    p, [client, server] = sink_recorders(sink, "clotho.grpc.client", "clotho.gateway")
    ended = []
    for i in range(5):
        for recorder, name in ((client, "Generate"), (server, "POST /generate")):
            span = recorder.start(name, None, SpanKind.INTERNAL, {"i": i})
            span.end()
            ended.append(span)
    assert len(sink._buffer) == 10
    first = sink._buffer.take(3)
    assert (first._recorder, first.spans) == (client, 3)  # the client's lane holds the oldest span
    assert sink.force_flush()
    [batch] = out.batches
    assert [(r._recorder, r.spans) for r in batch] == [(server, 5), (client, 2)]
    assert otlp_encode.encode_request([first, *batch]) == otlp_encode.encode_request(ended)
    p.shutdown()


@pytest.mark.parametrize(
    ("batch_var", "queue_var", "batch", "queue"),
    [
        (None, None, 2048, 8192),  # Clotho's defaults: a quarter of the SDK's export cycles
        ("100", None, 100, 8192),
        ("16384", None, 16384, 16384),  # the queue holds a batch that is set
        (None, "1000", 1000, 1000),  # a batch within a queue that is set
        (None, "20000", 2048, 20000),
        ("64", "128", 64, 128),
        ("", "", 2048, 8192),  # set but empty: unset
    ],
)
def test_batch_and_queue_default_to_clothos_where_the_environment_is_silent(
    monkeypatch: pytest.MonkeyPatch, batch_var: str | None, queue_var: str | None, batch: int, queue: int
) -> None:
    for var, value in (("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", batch_var), ("OTEL_BSP_MAX_QUEUE_SIZE", queue_var)):
        if value is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, value)
    out = Batches()
    sink = SpanSink(out, schedule_delay_millis=60_000)
    p, recorder = sink_provider(sink)
    assert (sink.max_export_batch_size, sink.max_queue_size) == (batch, queue)
    # What the numbers do: the exporter wakes at a full batch and sends it as one request.
    end_spans(recorder, min(batch, 200))
    if batch <= 200:
        assert out.entered.wait(10)
        assert [count(b) for b in out.batches] == [batch]
    else:
        assert out.batches == []
    p.shutdown()
