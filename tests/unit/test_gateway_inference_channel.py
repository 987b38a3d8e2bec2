"""The gateway's channels to inference have no interceptors: each call carries the
service token, and the trace context (a caller's where there is one with tracing off;
its own client span's with tracing on), as its own metadata -- what the bearer and
tracing interceptors would have sent."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from grpc import aio
from opentelemetry import context, trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, StatusCode, TraceFlags
from span_collect import provider, trace_with

from clotho.v1 import inference_service_pb2 as pb
from clotho.v1 import inference_service_pb2_grpc as pb_grpc
from services.common import client_span, telemetry
from services.common.access import Access
from services.gateway.generation import routing
from services.gateway.generation.pool import GENERATE
from services.gateway.generation.routing import Target, call_metadata
from waiting import wait_until

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


def test_the_token_goes_as_metadata_with_tracing_off_or_on(monkeypatch):
    """The channels have no interceptors either way (tracing on, each call makes its
    own client span: Target.call)."""
    access = Access(token="s3")
    monkeypatch.setattr(routing.telemetry, "enabled", False)
    assert call_metadata(access) == TOKEN
    assert call_metadata(Access()) == ()
    monkeypatch.setattr(routing.telemetry, "enabled", True)
    assert call_metadata(access) == TOKEN


class _Inference(pb_grpc.InferenceServiceServicer):
    """Generate streams one completion, or aborts for the prompt [0]; each call's
    metadata is kept."""

    def __init__(self):
        self.metadata = []

    async def Generate(self, request, context):
        self.metadata.append(dict(context.invocation_metadata()))
        if list(request.input_ids) == [0]:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no such prompt")
        yield pb.GenerateResponse(completion=pb.Completion(output_ids=[1], finish_reason=pb.FINISH_REASON_STOP))


async def test_with_tracing_on_a_call_makes_its_client_span_on_a_bare_channel(monkeypatch):
    """Tracing on, the channel still has no interceptors: Target.call makes the CLIENT
    span under the current span, sends its traceparent with the token, and ends it
    with the call's status."""
    p, out = provider()
    trace_with(monkeypatch, p, client_span.TRACER_NAME, "server")
    servicer = _Inference()
    server = aio.server()
    pb_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = routing.open_channel(f"127.0.0.1:{port}", Access(token="s3"))
    try:
        assert not getattr(channel, "_unary_stream_interceptors", None)
        target = Target("x", channel=channel, stub=pb_grpc.InferenceServiceStub(channel), metadata=TOKEN)
        server_recorder: Any = telemetry.server_span_recorder("server")
        caller: Any = server_recorder.start("POST /generate", None, SpanKind.SERVER, {})
        token = context.attach(trace.set_span_in_context(caller))
        try:
            call = target.call(GENERATE, target.stub.Generate, pb.GenerateRequest(input_ids=[1]), 5.0)
            assert len([m async for m in call]) == 1
            failed = target.call(GENERATE, target.stub.Generate, pb.GenerateRequest(input_ids=[0]), 5.0)
            with pytest.raises(aio.AioRpcError):
                [m async for m in failed]
        finally:
            context.detach(token)
        await wait_until(lambda: p.force_flush() and len([s for s in out.spans if s.name == GENERATE]) == 2)
    finally:
        await channel.close()
        await server.stop(0)
    ok, refused = [s for s in out.spans if s.name == GENERATE]
    for span, received in zip((ok, refused), servicer.metadata, strict=True):
        assert span._kind is SpanKind.CLIENT
        assert span._parent.span_id == caller.get_span_context().span_id
        ctx = span.get_span_context()
        assert received["traceparent"] == f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"
        assert received["authorization"] == "Bearer s3"
    assert ok._attributes["rpc.grpc.status_code"] == 0 and ok._status.status_code is StatusCode.UNSET
    assert refused._attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert refused._status.status_code is StatusCode.ERROR
