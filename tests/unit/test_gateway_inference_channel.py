"""While tracing is off the gateway's channels to inference have no interceptors: each
call carries the service token, and a caller's trace context where there is one, as
its own metadata (what the bearer and tracing interceptors would have sent)."""

from __future__ import annotations

from opentelemetry import context, trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from services.common.access import Access
from services.gateway.generation import routing
from services.gateway.generation.routing import Target, call_metadata

TOKEN = (("authorization", "Bearer s3"),)


def test_calls_on_a_bare_channel_carry_the_token():
    assert Target("x:1", metadata=TOKEN).call_kwargs(5.0) == {"timeout": 5.0, "metadata": TOKEN}
    assert Target("x:1", metadata=()).call_kwargs(5.0) == {"timeout": 5.0}
    # A channel with interceptors: they send everything.
    assert Target("x:1").call_kwargs(None) == {"timeout": None}


def test_calls_on_a_bare_channel_pass_a_callers_trace_context_on():
    parent = SpanContext(
        trace_id=0x4BF92F3577B34DA6A3CE929D0E0E4736,
        span_id=0x00F067AA0BA902B7,
        is_remote=True,
        trace_flags=TraceFlags(1),
    )
    token = context.attach(trace.set_span_in_context(NonRecordingSpan(parent)))
    try:
        kwargs = Target("x:1", metadata=TOKEN).call_kwargs(5.0)
        assert kwargs["metadata"][0] == TOKEN[0]
        assert ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01") in kwargs["metadata"]
        assert Target("x:1").call_kwargs(5.0) == {"timeout": 5.0}
    finally:
        context.detach(token)


def test_the_token_goes_as_metadata_only_without_interceptors(monkeypatch):
    access = Access(token="s3")
    monkeypatch.setattr(routing.telemetry, "enabled", False)
    assert call_metadata(access) == TOKEN
    assert call_metadata(Access()) == ()
    monkeypatch.setattr(routing.telemetry, "enabled", True)
    assert call_metadata(access) is None
