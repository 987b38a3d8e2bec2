"""services.common.server_rpc_span: the mesh's gRPC server spans, over a real grpc.aio
server whose method handlers are wrapped as every service's are (method_handlers: the
error mapping and the span). Tracing on, each call is one SERVER span continuing the caller's
traceparent, current while the handler runs, with its status code (an ERROR status
only for the server's own errors); streamed responses from an async generator and from
a coroutine writing through the context both work; health probes make no span.
Tracing off, a caller's context passes through to the handler and nothing records."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode
from span_collect import provider, trace_with

from clotho.v1 import inference_service_pb2 as pb
from clotho.v1 import inference_service_pb2_grpc as pb_grpc
from services.common import server_rpc_span, telemetry
from services.common.method_handlers import Registrar
from services.common.server_span import ServerSpan

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
PARENT_ID = 0x00F067AA0BA902B7
TRACEPARENT = (("traceparent", f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-01"),)
GENERATE = "/clotho.v1.InferenceService/Generate"


class Servicer(pb_grpc.InferenceServiceServicer):
    """Generate streams one completion ([0]: aborts INVALID_ARGUMENT, [1]: raises, which
    the error mapping answers INTERNAL); GetModelInfo is unary. Each keeps the span
    current while it runs."""

    def __init__(self) -> None:
        self.current: list[Any] = []

    async def Generate(self, request: Any, context: Any) -> Any:
        self.current.append(trace.get_current_span())
        if list(request.input_ids) == [0]:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no such prompt")
        if list(request.input_ids) == [1]:
            raise RuntimeError("a bug")
        yield pb.GenerateResponse(completion=pb.Completion(output_ids=[1], finish_reason=pb.FINISH_REASON_STOP))

    async def GetModelInfo(self, request: Any, context: Any) -> Any:
        self.current.append(trace.get_current_span())
        return pb.GetModelInfoResponse(model_path="m")


class WritingServicer(Servicer):
    """Generate as a coroutine that writes through the context (as health's Watch)."""

    async def Generate(self, request: Any, context: Any) -> None:
        self.current.append(trace.get_current_span())
        await context.write(pb.GenerateResponse(completion=pb.Completion(output_ids=[2])))


async def serve(servicer: Servicer) -> tuple[Any, Any, Any]:
    server = aio.server()
    registrar: Any = Registrar(server)
    pb_grpc.add_InferenceServiceServicer_to_server(servicer, registrar)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), registrar)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, aio.insecure_channel(f"127.0.0.1:{port}"), servicer


@pytest.fixture(params=[Servicer, WritingServicer])
async def target(request: pytest.FixtureRequest) -> Any:
    server, channel, servicer = await serve(request.param())
    yield servicer, channel
    await channel.close()
    await server.stop(0)


@pytest.fixture
def tracing_on(monkeypatch: pytest.MonkeyPatch) -> Any:
    p, out = provider()
    trace_with(monkeypatch, p, server_rpc_span.TRACER_NAME)
    yield p, out
    p.shutdown()


def exported(p: Any, out: Any) -> list[Any]:
    p.force_flush()
    return list(out.spans)


async def generate(channel: Any, prompt: list[int], metadata: Any = None) -> list[Any]:
    stub = pb_grpc.InferenceServiceStub(channel)
    return [m async for m in stub.Generate(pb.GenerateRequest(input_ids=prompt), metadata=metadata)]


async def test_a_call_is_a_server_span_continuing_the_callers_trace(target: Any, tracing_on: Any) -> None:
    servicer, channel = target
    p, out = tracing_on
    assert len(await generate(channel, [5], TRACEPARENT)) == 1
    info = await pb_grpc.InferenceServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest())
    assert info.model_path == "m"
    spans = exported(p, out)
    assert [s.name for s in spans] == [GENERATE, "/clotho.v1.InferenceService/GetModelInfo"]
    call, unary = spans
    assert all(isinstance(s, ServerSpan) and s._kind is SpanKind.SERVER for s in spans)
    assert call.get_span_context().trace_id == TRACE_ID
    assert call._parent.span_id == PARENT_ID and call._parent.is_remote
    assert unary._parent is None  # no traceparent: a root
    assert call._attributes == {
        "rpc.system": "grpc",
        "rpc.service": "clotho.v1.InferenceService",
        "rpc.method": "Generate",
        "rpc.grpc.status_code": 0,
    }
    assert call._status.status_code is StatusCode.UNSET
    # The span was current while the handler ran, and is no longer.
    assert servicer.current == spans
    assert trace.get_current_span() is trace.INVALID_SPAN


async def test_status_codes_land_on_the_span(tracing_on: Any) -> None:
    p, out = tracing_on
    server, channel, _ = await serve(Servicer())
    try:
        for prompt in ([0], [1]):
            with pytest.raises(aio.AioRpcError):
                await generate(channel, prompt)
    finally:
        await channel.close()
        await server.stop(0)
    refused, bug = exported(p, out)
    # A caller's error is not the server's: the code, no ERROR status.
    assert refused._attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert refused._status.status_code is StatusCode.UNSET
    assert bug._attributes["rpc.grpc.status_code"] == grpc.StatusCode.INTERNAL.value[0]
    assert bug._status.status_code is StatusCode.ERROR


async def test_health_probes_make_no_span(target: Any, tracing_on: Any) -> None:
    _, channel = target
    p, out = tracing_on
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert exported(p, out) == []


async def test_tracing_off_passes_a_callers_context_through(target: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    servicer, channel = target
    monkeypatch.setattr(telemetry, "enabled", False)
    await generate(channel, [5], TRACEPARENT)
    await generate(channel, [5])
    carried, none = servicer.current
    assert not carried.is_recording()
    assert carried.get_span_context().trace_id == TRACE_ID and carried.get_span_context().span_id == PARENT_ID
    assert none is trace.INVALID_SPAN


async def test_a_trace_state_or_current_context_takes_the_general_way(target: Any, tracing_on: Any) -> None:
    """The short way (a lone traceparent, nothing current) does not apply to a caller
    that sends a tracestate too: the propagators read it, and the span keeps it."""
    servicer, channel = target
    p, out = tracing_on
    await generate(channel, [5], (*TRACEPARENT, ("tracestate", "vendor=value")))
    await generate(channel, [5], (("traceparent", f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-00"),))
    (span,) = exported(p, out)  # the unsampled caller's call records nothing
    assert span.get_span_context().trace_id == TRACE_ID and span._parent.span_id == PARENT_ID
    assert span.get_span_context().trace_state.get("vendor") == "value"
    assert servicer.current[0] is span and not servicer.current[1].is_recording()
    assert servicer.current[1].get_span_context().trace_id == TRACE_ID


async def test_a_sampler_that_must_be_asked_sees_the_callers_context(monkeypatch: pytest.MonkeyPatch) -> None:
    """ParentBased(ratio 0): a root is never sampled, a sampled caller's child always.
    The sampler reads the parent from the context it is handed, so the call must reach
    it with the caller's context (not as a root)."""
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    p, out = provider(sampler=ParentBased(TraceIdRatioBased(0.0)))
    trace_with(monkeypatch, p, server_rpc_span.TRACER_NAME)
    server, channel, _ = await serve(Servicer())
    try:
        await generate(channel, [5], TRACEPARENT)
        await generate(channel, [5])
    finally:
        await channel.close()
        await server.stop(0)
    (span,) = exported(p, out)
    p.shutdown()
    assert span.get_span_context().trace_id == TRACE_ID and span._parent.span_id == PARENT_ID
