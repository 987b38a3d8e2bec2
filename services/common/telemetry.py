"""OpenTelemetry wiring: one tracer provider per process, configured by OTEL_* vars only.

Tracing is off unless the environment asks for it; off, no SDK is installed, every
span is the API's non-recording span and costs a function call (incoming
`traceparent` still passes through to the next hop). It is on when:
- `OTEL_TRACES_EXPORTER` is `otlp` or `console` (exported), or `none` (spans are
  recorded and sampled but exported nowhere: what tracing costs without an exporter);
- or an OTLP endpoint is set (`OTEL_EXPORTER_OTLP_ENDPOINT` /
  `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), which means `otlp`.
`OTEL_SDK_DISABLED=true` turns it off whatever else is set. The rest is the SDK's own
reading of the standard variables: `OTEL_TRACES_SAMPLER`(`_ARG`), `OTEL_SERVICE_NAME`
and `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL` (`grpc`, the
default, or `http/protobuf`), the endpoint, headers and timeout variables, `OTEL_BSP_*`.

Spans leave through a batch processor (with OTLP/gRPC, services.common.span_sink's
SpanSink: the same OTEL_BSP_* settings, an ended span a list append); every process
flushes it when it stops (`shutdown_tracing`, called by run_service after SIGTERM, and
at exit), and processes that do not run run_service call `flush_on_sigterm`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
from collections.abc import Iterator, Mapping
from types import FrameType
from typing import Any, NamedTuple

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.baggage import _BAGGAGE_KEY
from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.propagation import _SPAN_KEY

from services.common.current_span import current_context

log = logging.getLogger(__name__)
_configured = False
# True once an SDK tracer provider is installed: code on hot paths checks this before
# building anything a span would need.
enabled = False
# The SpanSink of the OTLP/gRPC export, when that is the export.
_sink: Any = None

_HEX = "0123456789abcdef"


def export_mode(env: Mapping[str, str]) -> str | None:
    """`otlp`, `console`, `none` (recorded, not exported) or None (tracing off)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter.split(",")[0].strip()
    if env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return "otlp"
    return None


def _otlp_exporter(env: Mapping[str, str]) -> Any:
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    if protocol.strip().lower().startswith("http"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        return HttpExporter()
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    from services.common.otlp_encode import _EncodedSpan as EncodedSpan
    from services.common.otlp_encode import encode_request

    class WireEncodedExporter(OTLPSpanExporter):
        """The SDK's OTLP/gRPC exporter (endpoint, TLS, headers, compression, retries
        from OTEL_* as before) with the request written by otlp_encode, a fifth of the
        SDK encoder's CPU, and sent as those bytes (the stub's request serializer is
        the identity: no protobuf message is built). It exports SDK spans and
        services.common.server_span's ServerSpans alike."""

        accepts_server_spans = True

        def _initialize_channel_and_stub(self) -> None:
            super()._initialize_channel_and_stub()  # type: ignore[no-untyped-call]
            self._client = _RawTraceStub(self._channel)  # type: ignore[assignment]

        def _translate_data(self, data: Any) -> Any:
            return encode_request(data)

        def _count_data(self, data: Any) -> int:
            # A SpanSink batch opens with a run of written spans (one EncodedSpan).
            return sum(span.spans if type(span) is EncodedSpan else 1 for span in data)

        def aio_export(self) -> Any:
            """This exporter's export from an event loop (SpanSink.run_on_loop), or None
            where this SDK release's exporter does not keep the settings it needs."""
            from services.common.otlp_aio import AioExport, supports

            return AioExport(self) if supports(self) else None

    return WireEncodedExporter()


class _RawTraceStub:
    """TraceService's Export taking the request as wire bytes."""

    def __init__(self, channel: Any) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

        self.Export = channel.unary_unary(
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
            request_serializer=None,
            response_deserializer=ExportTraceServiceResponse.FromString,
        )


def setup_tracing(service_name: str, env: Mapping[str, str] | None = None) -> trace.Tracer:
    """Install the process's tracer provider once (when the environment asks for
    tracing) and return a tracer for `service_name`.

    `env` defaults to the process environment, read here once at start-up.
    """
    global _configured, enabled, _sink
    env = os.environ if env is None else env
    if not _configured:
        _configured = True
        mode = export_mode(env)
        if mode is not None:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, which
            # win over this default; TracerProvider reads OTEL_TRACES_SAMPLER(_ARG).
            name = env.get("OTEL_SERVICE_NAME") or service_name
            provider = TracerProvider(resource=Resource.create({"service.name": name}))
            if mode == "otlp":
                exporter = _otlp_exporter(env)
                if getattr(exporter, "accepts_server_spans", False):
                    from services.common.span_sink import SpanSink

                    # Ended spans onto a list, no BatchSpanProcessor (span_sink.py).
                    _sink = SpanSink(exporter)
                    provider.add_span_processor(_sink)
                else:
                    provider.add_span_processor(BatchSpanProcessor(exporter))
            elif mode == "console":
                from opentelemetry.sdk.trace.export import ConsoleSpanExporter

                # stderr: stdout carries the services' JSON event lines.
                provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
            elif mode != "none":
                log.warning("OTEL_TRACES_EXPORTER=%s is not supported; spans are not exported", mode)
            trace.set_tracer_provider(provider)
            enabled = True
    return trace.get_tracer(service_name)


def export_on_loop() -> bool:
    """Export this process's spans from the running event loop, not an exporter
    thread (span_sink.SpanSink.run_on_loop), where they go out over OTLP/gRPC; False
    (nothing changes) otherwise. For a service whose requests all run on this loop;
    `stop_loop_export` hands the export back before tracing is shut down."""
    return _sink is not None and _sink.run_on_loop()


async def stop_loop_export() -> None:
    """Hand the export back to a thread once the loop's batch in flight is sent (a
    no-op without export_on_loop)."""
    if _sink is not None:
        await _sink.stop_on_loop()


_recorders: dict[str, Any] = {}


def server_span_recorder(tracer_name: str) -> Any:
    """A services.common.server_span.Recorder for `tracer_name` when the installed
    provider's export takes its spans (OTLP/gRPC or none), else None (use the SDK's
    tracer). Only meaningful once tracing is enabled."""
    if tracer_name not in _recorders:
        from services.common.server_span import Recorder

        _recorders[tracer_name] = Recorder.for_provider(trace.get_tracer_provider(), tracer_name) if enabled else None
    return _recorders[tracer_name]


def start_span(
    tracer_name: str,
    name: str,
    context: Any,
    kind: SpanKind,
    attributes: dict[str, Any],
    start_time: int | None = None,
) -> Any:
    """A span of `tracer_name` under `context`'s span (a root without one): a
    services.common.server_span ServerSpan from the tracer's Recorder when the export
    takes them (list attributes as tuples, as set_attribute stores them), else the
    SDK's span. Only while tracing is enabled."""
    recorder = server_span_recorder(tracer_name)
    if recorder is None:
        tracer = trace.get_tracer(tracer_name)
        return tracer.start_span(name, context=context, kind=kind, attributes=attributes, start_time=start_time)
    parent_span: Any = context.get(_SPAN_KEY)
    parent = None if parent_span is None else parent_span.get_span_context()
    values = {k: tuple(v) if type(v) is list else v for k, v in attributes.items()}
    span = recorder.start(name, parent, kind, values, context)
    if start_time is not None and span.is_recording():
        span._start_time = start_time
    return span


def client_interceptors() -> list[Any]:
    """Tracing interceptors for grpc.aio channels: a CLIENT span per call while tracing
    is on, the trace context (traceparent) into its metadata (services.common.client_span)."""
    from services.common.client_span import interceptors

    return interceptors()


def inject_headers(carrier: dict[str, str] | None = None) -> dict[str, str]:
    """W3C trace context of the current span, as headers or gRPC metadata."""
    carrier = {} if carrier is None else carrier
    propagate.inject(carrier)
    return carrier


# A version-00 traceparent as the mesh's own clients write it (the W3C propagator's
# pattern, less its leading/trailing blanks and longer-version forms).
_TRACEPARENT = re.compile("00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


class Propagation(NamedTuple):
    """What the global textmap (the configured propagators) reads and writes."""

    textmap: Any
    fields: frozenset[str]  # the header / metadata names it reads, lower case
    field_bytes: frozenset[bytes]  # the same as bytes (ASGI header names)
    default: bool  # W3C trace context then W3C baggage (OTEL_PROPAGATORS unset, or `tracecontext,baggage`)


_propagation: Propagation | None = None


def propagation() -> Propagation:
    """The global textmap's Propagation (remade when the textmap is replaced)."""
    global _propagation
    textmap = propagate.get_global_textmap()
    cached = _propagation
    if cached is None or cached.textmap is not textmap:
        from opentelemetry.baggage.propagation import W3CBaggagePropagator
        from opentelemetry.propagators.composite import CompositePropagator
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        inner = getattr(textmap, "_propagators", None)
        default = (
            type(textmap) is CompositePropagator
            and inner is not None
            and [type(p) for p in inner] == [TraceContextTextMapPropagator, W3CBaggagePropagator]
        )
        fields = frozenset(f.lower() for f in textmap.fields)
        cached = _propagation = Propagation(textmap, fields, frozenset(f.encode("latin-1") for f in fields), default)
    return cached


def remote_parent(headers: Mapping[str, str]) -> SpanContext | None:
    """The caller's span context when the incoming headers (names in lower case) are
    a lone well-formed `traceparent` under the default propagators (a gRPC hop inside
    the mesh: no baggage, no tracestate), read straight; None for anything else
    (propagate.extract's to read)."""
    if len(headers) == 1 and propagation().default:
        value = headers.get("traceparent")
        match = _TRACEPARENT.fullmatch(value) if value is not None else None
        if match is not None:
            trace_id, span_id = int(match[1], 16), int(match[2], 16)
            if trace_id and span_id:
                return SpanContext(trace_id, span_id, True, TraceFlags(int(match[3], 16)))
    return None


def extract_context(headers: Mapping[str, str]) -> otel_context.Context:
    """The trace context carried by incoming headers (names in lower case), as
    propagate.extract reads it; a lone `traceparent` of the mesh's own hops is read
    straight (remote_parent: the propagators' general path was ~10 us of a traced
    call)."""
    parent = remote_parent(headers)
    if parent is not None:
        return otel_context.Context({_SPAN_KEY: trace.NonRecordingSpan(parent)})
    return propagate.extract(dict(headers))


def inject_fields(context: otel_context.Context) -> tuple[tuple[str, str], ...]:
    """The (lower-case name, value) entries that carry `context` on to the next hop,
    as propagate.inject writes them. Under the default propagators a span context with
    no trace state, in a context with no baggage (the mesh's own calls), is written
    here straight: its `traceparent` alone."""
    if propagation().default:
        entries = context.get(_BAGGAGE_KEY)
        span: Any = context.get(_SPAN_KEY)
        if span is not None and (entries is None or (type(entries) is dict and not entries)):
            sc = span.get_span_context()
            if not sc.trace_state and sc.is_valid:
                return (("traceparent", f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{sc.trace_flags:02x}"),)
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    return tuple((key.lower(), value) for key, value in carrier.items())


def recording_context() -> otel_context.Context | None:
    """The current context when its span records (to carry into another thread or
    to parent spans made later); None when there is nothing to record under. Read
    the short way (current_span): the inference engine asks on every request."""
    current = current_context()
    span: Any = current.get(_SPAN_KEY)
    if span is None or not span.is_recording():
        return None
    return current


def traceparent(span: trace.Span | None = None) -> str:
    """The W3C `traceparent` of `span` (default: the current one); "" when it has no
    valid context."""
    ctx = (span or trace.get_current_span()).get_span_context()
    if not ctx.is_valid:
        return ""
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def parse_traceparent(value: str) -> SpanContext | None:
    """The span context a W3C `traceparent` names, or None."""
    parts = value.split("-")
    if len(parts) < 4 or len(parts[1]) != 32 or len(parts[2]) != 16:
        return None
    try:
        ctx = SpanContext(int(parts[1], 16), int(parts[2], 16), True, TraceFlags(int(parts[3][:2], 16)))
    except ValueError:
        return None
    return ctx if ctx.is_valid else None


def links_to(contexts: Any) -> list[Link]:
    """Span links to each valid span context in `contexts` (duplicates once)."""
    seen: set[tuple[int, int]] = set()
    links = []
    for ctx in contexts:
        if ctx is None or not ctx.is_valid or (ctx.trace_id, ctx.span_id) in seen:
            continue
        seen.add((ctx.trace_id, ctx.span_id))
        links.append(Link(ctx))
    return links


@contextlib.contextmanager
def attached(ctx: otel_context.Context | None) -> Iterator[None]:
    """Make `ctx` current for the block (a no-op for None): carries a context into a
    worker thread."""
    if ctx is None:
        yield
        return
    token = otel_context.attach(ctx)
    try:
        yield
    finally:
        otel_context.detach(token)


@contextlib.contextmanager
def child_span(name: str, **attributes: Any) -> Iterator[trace.Span]:
    """A span under the current one, only when that one records (`clotho.`-prefixed
    attributes); else nothing is made, so code run both traced and untraced (a
    follower rank) makes no stray root spans."""
    if not trace.get_current_span().is_recording():
        yield trace.INVALID_SPAN
        return
    tracer = trace.get_tracer("clotho")
    with tracer.start_as_current_span(name, attributes={f"clotho.{k}": v for k, v in attributes.items()}) as span:
        yield span


def flush_tracing(timeout_millis: int = 5000) -> None:
    """Export every span ended so far (a no-op when tracing is off)."""
    flush = getattr(trace.get_tracer_provider(), "force_flush", None)
    if flush is not None:
        flush(timeout_millis)


def shutdown_tracing() -> None:
    """Flush and stop the exporter (idempotent; the SDK also does this at exit)."""
    provider = trace.get_tracer_provider()
    shutdown = getattr(provider, "shutdown", None)
    if shutdown is not None:
        shutdown()


def flush_on_sigterm() -> None:
    """For processes without run_service's SIGTERM handling: on SIGTERM, flush the
    spans, then die of SIGTERM as before. A no-op when tracing is off."""
    if not enabled:
        return

    def handler(signum: int, _frame: FrameType | None) -> None:
        with contextlib.suppress(Exception):
            flush_tracing(3000)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, handler)
