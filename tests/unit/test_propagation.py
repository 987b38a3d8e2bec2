"""services.common.telemetry's trace context propagation: extract_context (what the
propagators read from incoming headers) and inject_fields (what they write for the
next hop). The direct read of a lone `traceparent`, and the direct write of one, give
what opentelemetry.propagate.extract / inject give, for well-formed and malformed
values alike; anything else (baggage, tracestate, other propagators) is the
propagators'."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry import baggage, propagate, trace
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from services.common import telemetry

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
HEADERS = [
    {"traceparent": f"00-{TRACE}-{SPAN}-01"},
    {"traceparent": f"00-{TRACE}-{SPAN}-00"},
    {"traceparent": f"00-{TRACE}-{SPAN}-ff"},
    {"traceparent": f"00-{TRACE.upper()}-{SPAN}-01"},  # upper case: not the W3C form
    {"traceparent": f"00-{'0' * 32}-{SPAN}-01"},  # zero trace id
    {"traceparent": f"00-{TRACE}-{'0' * 16}-01"},  # zero span id
    {"traceparent": f"ff-{TRACE}-{SPAN}-01"},  # the forbidden version
    {"traceparent": f"01-{TRACE}-{SPAN}-01-extra"},  # a later version's extra field
    {"traceparent": f"00-{TRACE}-{SPAN}-01-extra"},  # ... not allowed in version 00
    {"traceparent": f"  00-{TRACE}-{SPAN}-01 "},  # blanks around it
    {"traceparent": f"00-{TRACE[:-1]}_-{SPAN}-01"},  # what int(x, 16) would take
    {"traceparent": f"00-{TRACE}-{SPAN}-1"},
    {"traceparent": ""},
    {"traceparent": f"00-{TRACE}-{SPAN}-01", "tracestate": "k=v,other=1"},
    {"traceparent": f"00-{TRACE}-{SPAN}-01", "baggage": "user=alice"},
    {"baggage": "user=alice"},
    {},
]


def summary(ctx: Any) -> tuple[Any, ...]:
    span = trace.get_current_span(ctx)
    sc = span.get_span_context()
    return (type(span), tuple(sc), dict(baggage.get_all(ctx)), len(ctx))


@pytest.mark.parametrize("headers", HEADERS, ids=range(len(HEADERS)))
def test_extract_context_reads_what_the_propagators_read(headers: dict[str, str]) -> None:
    assert telemetry.propagation().default
    assert summary(telemetry.extract_context(headers)) == summary(propagate.extract(dict(headers)))


@pytest.mark.parametrize("headers", HEADERS, ids=range(len(HEADERS)))
def test_a_grpc_calls_short_read_takes_what_the_propagators_take(headers: dict[str, str]) -> None:
    """server_rpc_span's short way (C carried_traceparent, and its Python stand-in)
    reads a call's metadata -- other entries around the propagators' -- to the parent
    propagate.extract gives, or leaves it to the propagators (False)."""
    from services.common import server_rpc_span
    from services.common.server_span import Recorder

    recorder = Recorder.__new__(Recorder)
    recorder._flags_cache = {}
    metadata = (("user-agent", "grpc-python/1"), *headers.items(), ("x-other", "1"))
    expected = trace.get_current_span(propagate.extract(dict(headers))).get_span_context()
    reads = [server_rpc_span._short_parent(metadata, recorder)]
    short_way = server_rpc_span._carried_traceparent
    assert short_way is not None  # the C extension is built for the tests
    server_rpc_span._carried_traceparent = None
    try:
        reads.append(server_rpc_span._short_parent(metadata, recorder))
    finally:
        server_rpc_span._carried_traceparent = short_way
    for parent in reads:
        if parent is None:  # nothing carried: a root, as extract gives
            assert not headers and not expected.is_valid
        elif parent is not False:
            assert tuple(parent) == tuple(expected) and isinstance(parent, SpanContext)
            assert isinstance(parent.trace_flags, TraceFlags)
    # The C read and the Python one agree; the short way is taken by nothing carried
    # and by a lone version-00 traceparent in its exact form with valid ids.
    assert reads[0] == reads[1]
    exact = list(headers) == ["traceparent"] and telemetry._TRACEPARENT.fullmatch(headers["traceparent"])
    assert (reads[0] is not False) == (not headers or bool(exact and expected.is_valid))


def test_the_direct_read_parses_the_ids_and_flags() -> None:
    sc = trace.get_current_span(telemetry.extract_context({"traceparent": f"00-{TRACE}-{SPAN}-03"})).get_span_context()
    assert (sc.trace_id, sc.span_id, sc.trace_flags, sc.is_remote) == (int(TRACE, 16), int(SPAN, 16), 3, True)
    assert sc.is_valid and not sc.trace_state


def test_other_propagators_are_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """A textmap other than the default one reads the headers its own way."""

    class Shifted(TraceContextTextMapPropagator):  # reads the span id one higher
        def extract(self, carrier: Any, context: Any = None, getter: Any = None) -> Any:
            ctx = super().extract(carrier, context)
            sc = trace.get_current_span(ctx).get_span_context()
            shifted = trace.SpanContext(sc.trace_id, sc.span_id + 1, True, sc.trace_flags)
            return trace.set_span_in_context(trace.NonRecordingSpan(shifted), ctx)

    monkeypatch.setattr(propagate, "_HTTP_TEXT_FORMAT", CompositePropagator([Shifted()]))
    assert not telemetry.propagation().default
    ctx = telemetry.extract_context({"traceparent": f"00-{TRACE}-{SPAN}-01"})
    assert trace.get_current_span(ctx).get_span_context().span_id == int(SPAN, 16) + 1


CONTEXTS = {
    "sampled": trace.set_span_in_context(NonRecordingSpan(SpanContext(0xABC, 0x12, False, TraceFlags(1)))),
    "unsampled": trace.set_span_in_context(NonRecordingSpan(SpanContext(1 << 127, 1 << 63, True, TraceFlags(0)))),
    "flags 0xff": trace.set_span_in_context(NonRecordingSpan(SpanContext(5, 6, False, TraceFlags(0xFF)))),
    "trace state": trace.set_span_in_context(
        NonRecordingSpan(SpanContext(5, 6, False, TraceFlags(1), TraceState([("k", "v")])))
    ),
    "baggage": baggage.set_baggage(
        "user", "alice", trace.set_span_in_context(NonRecordingSpan(SpanContext(5, 6, False, TraceFlags(1))))
    ),
    "invalid span": trace.set_span_in_context(NonRecordingSpan(SpanContext(0, 6, False, TraceFlags(1)))),
    "no span": baggage.set_baggage("user", "alice"),
}


@pytest.mark.parametrize("name", list(CONTEXTS))
def test_inject_fields_writes_what_the_propagators_write(name: str) -> None:
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=CONTEXTS[name])
    assert telemetry.inject_fields(CONTEXTS[name]) == tuple(carrier.items())


def test_injected_fields_extract_to_the_same_span_context() -> None:
    sent = trace.get_current_span(CONTEXTS["sampled"]).get_span_context()
    got = trace.get_current_span(telemetry.extract_context(dict(telemetry.inject_fields(CONTEXTS["sampled"]))))
    assert tuple(got.get_span_context()) == (sent.trace_id, sent.span_id, True, 1, sent.trace_state, True)
