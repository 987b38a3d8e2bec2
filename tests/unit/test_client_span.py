"""services.common.client_span: the mesh's gRPC client spans over a real in-process
grpc.aio server. Tracing on, each call is one CLIENT span (a ServerSpan when the export
takes them) under the current span, and the server receives the client span's own
traceparent, so the chain server span -> client span -> the callee's spans holds; its
status code and error land on the span. Tracing off, an incoming context passes
through unchanged and a call without one carries none."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, StatusCode, TraceFlags
from span_collect import provider, trace_with

from clotho.v1 import inference_service_pb2 as pb
from clotho.v1 import inference_service_pb2_grpc as pb_grpc
from services.common import client_span, telemetry
from services.common.server import channel
from services.common.server_span import Recorder, ServerSpan
from waiting import wait_until


class Target(pb_grpc.InferenceServiceServicer):
    """Generate streams one completion, or aborts when the prompt is [0]; every call's
    `traceparent` is kept."""

    def __init__(self) -> None:
        self.traceparents: list[str | None] = []
        self.channel: Any = None

    async def Generate(self, request: Any, context: Any) -> Any:
        self.traceparents.append(dict(context.invocation_metadata()).get("traceparent"))
        if list(request.input_ids) == [0]:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no such prompt")
        yield pb.GenerateResponse(completion=pb.Completion(output_ids=[1], finish_reason=pb.FINISH_REASON_STOP))


@pytest.fixture
async def target() -> Any:
    servicer = Target()
    server = aio.server()
    pb_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    ch = channel(f"127.0.0.1:{port}")
    servicer.channel = ch  # for calls of other services on the same channel
    yield servicer, pb_grpc.InferenceServiceStub(ch)
    await ch.close()
    await server.stop(0)


@pytest.fixture
def tracing_on(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A provider whose export takes ServerSpans, as telemetry would install it."""
    p, out = provider()
    trace_with(monkeypatch, p, client_span.TRACER_NAME)
    yield p, out
    p.shutdown()


def _exported(p: Any, out: Any, name: str | None = None) -> list[Any]:
    """The spans exported so far (after a flush), those named `name` if given."""
    p.force_flush()
    return [s for s in out.spans if name is None or s.name == name]


def _traceparent_ids(value: str | None) -> tuple[int, int]:
    assert value is not None
    _, trace_id, span_id, _ = value.split("-")
    return int(trace_id, 16), int(span_id, 16)


async def _generate(stub: Any, prompt: list[int]) -> list[Any]:
    return [m async for m in stub.Generate(pb.GenerateRequest(input_ids=prompt))]


async def test_a_call_is_a_client_span_under_the_current_span(target: Any, tracing_on: Any) -> None:
    servicer, stub = target
    p, out = tracing_on
    recorder = Recorder.for_provider(p, "server")
    assert recorder is not None
    server_span: Any = recorder.start("POST /generate", None, SpanKind.SERVER, {})
    token = otel_context.attach(trace.set_span_in_context(server_span))
    try:
        assert len(await _generate(stub, [1, 2])) == 1
        with pytest.raises(aio.AioRpcError):
            await _generate(stub, [0])
    finally:
        otel_context.detach(token)
    server_span.end()
    # Client spans end from the calls' done callbacks, which run on the loop.
    await wait_until(lambda: len(_exported(p, out, "/clotho.v1.InferenceService/Generate")) == 2)
    calls = _exported(p, out, "/clotho.v1.InferenceService/Generate")
    assert all(isinstance(s, ServerSpan) for s in calls)
    ok, failed = calls
    server_ctx = server_span.get_span_context()
    for span, received in zip(calls, servicer.traceparents, strict=True):
        ctx = span.get_span_context()
        # The chain: the caller's server span -> this client span -> the callee.
        assert span._kind is SpanKind.CLIENT and span._parent.span_id == server_ctx.span_id
        assert ctx.trace_id == server_ctx.trace_id
        assert _traceparent_ids(received) == (ctx.trace_id, ctx.span_id)
        assert span._attributes["rpc.service"] == "clotho.v1.InferenceService"
        assert span._attributes["rpc.method"] == "Generate" and span._attributes["rpc.system"] == "grpc"
    assert ok._attributes["rpc.grpc.status_code"] == 0 and ok._status.status_code is StatusCode.UNSET
    assert failed._attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert failed._status.status_code is StatusCode.ERROR and "no such prompt" in (failed._status.description or "")


async def test_a_call_without_a_current_span_is_a_root(target: Any, tracing_on: Any) -> None:
    servicer, stub = target
    p, out = tracing_on
    await _generate(stub, [1])
    await wait_until(lambda: _exported(p, out))
    (span,) = out.spans
    assert span._parent is None
    assert _traceparent_ids(servicer.traceparents[0]) == (
        span.get_span_context().trace_id,
        span.get_span_context().span_id,
    )


async def test_tracing_off_passes_an_incoming_context_through(target: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    servicer, stub = target
    monkeypatch.setattr(telemetry, "enabled", False)
    await _generate(stub, [1])
    incoming = SpanContext(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, True, TraceFlags(1))
    token = otel_context.attach(trace.set_span_in_context(NonRecordingSpan(incoming)))
    try:
        await _generate(stub, [1])
    finally:
        otel_context.detach(token)
    assert servicer.traceparents == [None, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"]


async def test_health_probes_make_no_span(target: Any, tracing_on: Any) -> None:
    """The gateway's pool probes every shard on a timer: noise in traces, as the
    servers' interceptor already says (it skips them)."""
    servicer, stub = target
    p, out = tracing_on
    probe = health_pb2_grpc.HealthStub(servicer.channel)
    reply = await probe.Check(health_pb2.HealthCheckRequest(service=""))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    await _generate(stub, [1])
    await wait_until(lambda: _exported(p, out))
    assert [s.name for s in _exported(p, out)] == ["/clotho.v1.InferenceService/Generate"]
