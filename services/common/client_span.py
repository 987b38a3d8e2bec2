"""Client spans of the mesh's outgoing gRPC calls (grpc.aio channels), light.

opentelemetry-instrumentation-grpc's aio client interceptors made an SDK span per call
(`Tracer.start_as_current_span`: ~25-30 us of CPU, see server_span.py) and wrapped a
streamed response in an async generator of their own, every message passing through
it. These interceptors keep what those spans said (a CLIENT span named by the full
method, `rpc.system`, `rpc.service`, `rpc.method`, `rpc.grpc.status_code`, an ERROR
status with the details on failure, the span's context into the call's metadata as
the configured propagators write it) at a fraction of the cost:
- the span is a services.common.server_span.ServerSpan (kind CLIENT) when the export
  takes them, else an SDK span as before (console and OTLP/HTTP exports);
- it ends from the call's done callback: the call itself is handed back, not wrapped;
- health probes (grpc.health.v1.Health) make no span, as on the servers' side;
- tracing off (no SDK), a call only carries the current context on when there is a
  valid one (an incoming `traceparent` still passes through to the next hop), and
  makes no span.
"""

from __future__ import annotations

import asyncio
from typing import Any

from grpc import aio
from opentelemetry import context as otel_context
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation import _SPAN_KEY
from opentelemetry.trace.status import Status, StatusCode

from services.common import telemetry

TRACER_NAME = "clotho.grpc.client"
_STATUS_CODE = "rpc.grpc.status_code"
_CANCELLED = 1  # grpc.StatusCode.CANCELLED's number

# (method) -> (span name, its attributes but the status, whether it is traced): a
# channel's methods repeat. The server side (server_rpc_span) reads the same table.
_methods: dict[Any, tuple[str, dict[str, Any], bool]] = {}
# Health probes are noise in traces (on both sides of a call), and the gateway's pool
# probes every shard on a timer.
_UNTRACED_SERVICES = frozenset({"grpc.health.v1.Health"})


def rpc_method(method: Any) -> tuple[str, dict[str, Any], bool]:
    """A gRPC method's full name (str or bytes) -> (its span name, `rpc.*` attributes,
    whether its calls are traced)."""
    hit = _methods.get(method)
    if hit is None:
        name = method.decode() if isinstance(method, bytes) else str(method)
        service, _, meth = name.lstrip("/").partition("/")
        attributes = {"rpc.system": "grpc", "rpc.method": meth, "rpc.service": service}
        hit = (name, attributes, service not in _UNTRACED_SERVICES)
        if len(_methods) < 1024:
            _methods[method] = hit
    return hit


def _with_context(details: aio.ClientCallDetails, context: Any) -> aio.ClientCallDetails:
    """`details` with `context`'s propagation fields in its metadata (lower-case keys,
    as gRPC requires)."""
    fields = telemetry.inject_fields(context)
    if not fields:
        return details
    metadata = aio.Metadata(*tuple(details.metadata or ()))
    for key, value in fields:
        metadata[key] = value
    return aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials, details.wait_for_ready)


def _open(method: Any) -> tuple[Any, Any]:
    """(the call's span or None, the Context whose trace fields the call carries, or
    None for none)."""
    current = otel_context.get_current()
    parent_span: Any = current.get(_SPAN_KEY)
    if not telemetry.enabled:
        # No SDK: nothing records; carry a valid incoming context on, else nothing.
        if parent_span is None or not parent_span.get_span_context().is_valid:
            return None, None
        return None, current
    name, attributes, traced = rpc_method(method)
    if not traced:
        return None, None
    span = telemetry.start_span(TRACER_NAME, name, current, SpanKind.CLIENT, {**attributes, _STATUS_CODE: 0})
    return span, otel_context.Context({**current, _SPAN_KEY: span})


def _start(details: aio.ClientCallDetails) -> tuple[Any, aio.ClientCallDetails]:
    """(the call's span or None, the details to call with)."""
    span, context = _open(details.method)
    return span, details if context is None else _with_context(details, context)


def start_call(method: str) -> tuple[Any, tuple[tuple[str, str], ...]]:
    """For a call on a channel without these interceptors (the gateway's inference
    channels: a grpc.aio interceptor wraps every call and message in Python): (its
    CLIENT span or None, the metadata entries that carry the trace context on). Give
    the call to `end_call` (or its failure to `fail_call`)."""
    span, context = _open(method)
    if context is None:
        return span, ()
    return span, telemetry.inject_fields(context)


def end_call(span: Any, call: Any) -> None:
    """End start_call's span when `call` is done, with its status."""
    _end(span, call)


def fail_call(span: Any, exc: BaseException) -> None:
    """End start_call's span for a call that could not be made."""
    _fail(span, exc)


def _end(span: Any, call: Any) -> None:
    """End `span` when `call` is done, with its status."""
    if not span.is_recording():
        span.end()
        return

    def done(finished: Any) -> None:
        status = getattr(getattr(finished, "_cython_call", None), "_status", None)
        if status is None:
            if finished.cancelled():
                _finish(span, _CANCELLED, "Locally cancelled by application!")
                return
            # A call type that keeps its status elsewhere: ask it.
            task = asyncio.ensure_future(_finish_later(span, finished))
            _finishing.add(task)
            task.add_done_callback(_finishing.discard)
            return
        _finish(span, status.code(), status.details())

    try:
        call.add_done_callback(done)
    except NotImplementedError:  # a wrapped call without callbacks: end now
        span.end()


_finishing: set[asyncio.Future[None]] = set()  # _finish_later tasks, held until done


async def _finish_later(span: Any, call: Any) -> None:
    try:
        code = await call.code()
        details = await call.details()
    except Exception:  # noqa: BLE001 - the span still ends
        span.end()
        return
    _finish(span, code.value[0], details)


def _finish(span: Any, code: int, details: str | None) -> None:
    if code:
        span.set_attribute(_STATUS_CODE, code)
        span.set_status(Status(StatusCode.ERROR, details))
    span.end()


async def _call_unary(continuation: Any, details: aio.ClientCallDetails, request: Any) -> Any:
    span, details = _start(details)
    if span is None:
        return await continuation(details, request)
    try:
        call = await continuation(details, request)
    except BaseException as exc:
        _fail(span, exc)
        raise
    _end(span, call)
    return call


def _fail(span: Any, exc: BaseException) -> None:
    code = exc.code().value[0] if isinstance(exc, aio.AioRpcError) else None
    if code is not None:
        span.set_attribute(_STATUS_CODE, code)
    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
    span.record_exception(exc)
    span.end()


class UnaryUnary(aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await _call_unary(continuation, client_call_details, request)


class UnaryStream(aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await _call_unary(continuation, client_call_details, request)


class StreamUnary(aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await _call_unary(continuation, client_call_details, request_iterator)


class StreamStream(aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await _call_unary(continuation, client_call_details, request_iterator)


def interceptors() -> list[Any]:
    """One interceptor per call shape (grpc.aio files each under one shape)."""
    return [UnaryUnary(), UnaryStream(), StreamUnary(), StreamStream()]
