"""Per-request server spans without the SDK's span machinery.

The SDK's `Tracer.start_span` + `Span.end` costs ~25-30 us of CPU per span here
(sampler and SpanContext objects, a lock, BoundedAttributes, a ReadableSpan copy
at end, the processors' fan-out): on the gateway's ingest route, whose whole
request is ~80 us, that was most of what turning tracing on cost. A `ServerSpan`
holds only what the span's export needs (ids, times, name, a plain attribute dict,
status), in the fields services.common.otlp_encode reads from an SDK ReadableSpan,
so the same span processor and wire encoder export both kinds side by side.

It is a real `opentelemetry.trace.Span` (API): made current, it parents the SDK's
spans (gRPC client calls, child spans), `get_current_span()` finds it, and its
context propagates as `traceparent` as before. Sampling is the provider's sampler
(OTEL_TRACES_SAMPLER): the default ParentBased(always_on) and always_on/always_off
are decided inline, any other sampler is asked as the SDK asks it.

`Recorder.for_provider` says whether this applies: every span processor must be a
batch processor whose exporter takes these spans (services.common.telemetry's
OTLP/gRPC wire exporter), or there is none (OTEL_TRACES_EXPORTER=none). Console and
OTLP/HTTP exporters read SDK spans: then the recorder is None and callers use the
SDK as before.
"""

from __future__ import annotations

import importlib
import random
import traceback
from collections.abc import Mapping, Sequence
from time import time_ns
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.span import DEFAULT_TRACE_STATE
from opentelemetry.trace.status import Status, StatusCode

_UNSET = Status(StatusCode.UNSET)
_new_context = tuple.__new__
_getrandbits = random.getrandbits
try:  # ServerSpan.__init__'s work in C (_otlp_fast.c's new_span), built by `pip install`
    _fast: Any = importlib.import_module("services.common._otlp_fast")
    _new_span: Any = _fast.new_span
    # The gateway's usual request span made in C (request_span.http_spans): a Span
    # whose less usual methods are ServerSpan's below, run on it.
    RootSpan: Any = _fast.RootSpan
    trace.Span.register(RootSpan)
except (ImportError, AttributeError):
    _new_span = None
    RootSpan = None


class ServerSpan(trace.Span):
    """One recorded span, in the field layout otlp_encode.encode_span reads."""

    __slots__ = (
        "_attributes",
        "_context",
        "_end_time",
        "_events",
        "_kind",
        "_links",
        "_name",
        "_parent",
        "_recorder",
        "_start_time",
        "_status",
    )

    def __init__(
        self,
        recorder: Recorder,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: dict[str, Any],
    ) -> None:
        self._recorder = recorder
        self._name = name
        self._context = context
        self._parent = parent
        self._kind = kind
        self._attributes = attributes
        # A list once an event is added (most spans have none: one object less for
        # each span waiting in the export queue).
        self._events: Sequence[Any] = ()
        self._links: Sequence[Any] = ()
        self._status = _UNSET
        self._end_time: int | None = None
        self._start_time = time_ns()

    # What the batch processor and the encoder read.
    @property
    def context(self) -> SpanContext:
        return self._context

    @property
    def name(self) -> str:
        return self._name

    @property
    def resource(self) -> Any:
        return self._recorder.resource

    @property
    def instrumentation_scope(self) -> Any:
        return self._recorder.scope

    # opentelemetry.trace.Span
    def get_span_context(self) -> SpanContext:
        return self._context

    def is_recording(self) -> bool:
        return self._end_time is None

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        if self._end_time is None:
            for key, value in attributes.items():
                if value is not None:
                    self._attributes[key] = tuple(value) if isinstance(value, list) else value

    def set_attribute(self, key: str, value: Any) -> None:
        if self._end_time is None and value is not None:
            self._attributes[key] = tuple(value) if isinstance(value, list) else value

    def add_event(self, name: str, attributes: Any = None, timestamp: int | None = None) -> None:
        if self._end_time is None:
            from opentelemetry.sdk.trace import Event

            events = self._events
            if not isinstance(events, list):
                events = self._events = []
            events.append(Event(name, dict(attributes or {}), time_ns() if timestamp is None else timestamp))

    def update_name(self, name: str) -> None:
        if self._end_time is None:
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self._end_time is not None or self._status.status_code is StatusCode.OK:
            return
        if isinstance(status, Status):
            self._status = status
        elif status is not StatusCode.UNSET:
            self._status = Status(status, description if status is StatusCode.ERROR else None)

    def record_exception(
        self, exception: BaseException, attributes: Any = None, timestamp: int | None = None, escaped: bool = False
    ) -> None:
        event = {
            "exception.type": type(exception).__qualname__,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(
                traceback.format_exception(type(exception), exception, exception.__traceback__)
            ),
            "exception.escaped": str(escaped),
            **dict(attributes or {}),
        }
        self.add_event("exception", event, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self._end_time is not None:
            return
        self._end_time = time_ns() if end_time is None else end_time
        on_end = self._recorder.on_end
        if on_end is not None and self._context[3] & 1:
            on_end(self)

    def __repr__(self) -> str:
        return f'ServerSpan(name="{self._name}", context={self._context})'


class HttpServerSpan(ServerSpan):
    """A ServerSpan that also stands in for an ASGI request's `send`, keeping the
    response's status (services.gateway.http.request_span): one object per request,
    no closure."""

    __slots__ = ("send", "status_code")
    send: Any  # the ASGI send it stands in for
    status_code: int  # the response's status once started, else 0

    async def send_status(self, message: Any) -> None:
        if message["type"] == "http.response.start":
            self.status_code = message["status"]
        await self.send(message)


class Recorder:
    """Starts ServerSpans for one tracer (its resource and instrumentation scope)
    under the provider's sampler and id generator, and hands ended sampled ones to
    the provider's span processor (to a lone services.common.span_sink.SpanSink
    straight: its `add`)."""

    def __init__(self, provider: Any, tracer_name: str) -> None:
        from opentelemetry.sdk.trace import sampling
        from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

        sdk_tracer = provider.get_tracer(tracer_name)
        self.resource = provider.resource
        self.scope = sdk_tracer._instrumentation_scope
        from services.common.span_sink import SpanSink

        processors = provider._active_span_processor._span_processors
        # A lone SpanSink takes ended spans straight (no fan-out, no batch processor).
        self.on_end = provider._active_span_processor.on_end if processors else None
        if len(processors) == 1 and type(processors[0]) is SpanSink:
            self.on_end = processors[0].add_server
        self._ids = provider.id_generator
        self._random_ids = type(self._ids) is RandomIdGenerator
        random_flag = TraceFlags.RANDOM_TRACE_ID if self._ids.is_trace_id_random() else 0
        self._root_flags = {
            True: TraceFlags(TraceFlags.SAMPLED | random_flag),
            False: TraceFlags(random_flag),
        }
        sampler = provider.sampler
        self._sampler = sampler
        # Samplers decided inline: "always" for always_on / always_off, "parent"
        # for ParentBased(always_on) with its default delegates; None asks it.
        self._inline: str | None = None
        if sampler is sampling.ALWAYS_ON or sampler is sampling.ALWAYS_OFF:
            self._inline = "always"
            self._always = sampler is sampling.ALWAYS_ON
        elif (
            type(sampler) is sampling.ParentBased
            and sampler._root is sampling.ALWAYS_ON
            and sampler._remote_parent_sampled is sampling.ALWAYS_ON
            and sampler._remote_parent_not_sampled is sampling.ALWAYS_OFF
            and sampler._local_parent_sampled is sampling.ALWAYS_ON
            and sampler._local_parent_not_sampled is sampling.ALWAYS_OFF
        ):
            self._inline = "parent"
        self._flags_cache: dict[int, TraceFlags] = {}
        # start_root applies: a root's sampling is decided inline and sampled, ids random.
        self.root_inline = self._random_ids and (
            self._inline == "parent" or (self._inline == "always" and self._always)
        )
        self._root_sampled = self._root_flags[True]

    @classmethod
    def for_provider(cls, provider: Any, tracer_name: str) -> Recorder | None:
        """A recorder when every processor of `provider` exports ServerSpans (see
        the module's doc), else None."""
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        if not isinstance(provider, TracerProvider):
            return None
        from services.common.span_sink import SpanSink

        for processor in provider._active_span_processor._span_processors:
            if isinstance(processor, SpanSink):
                continue
            if not isinstance(processor, BatchSpanProcessor):
                return None
            exporter = processor._batch_processor._exporter
            if not getattr(exporter, "accepts_server_spans", False):
                return None
        return cls(provider, tracer_name)

    def _flags(self, value: int) -> TraceFlags:
        flags = self._flags_cache.get(value)
        if flags is None:
            flags = self._flags_cache[value] = TraceFlags(value)
        return flags

    def start_root(
        self, name: str, kind: SpanKind, attributes: dict[str, Any], span_type: type[ServerSpan] = ServerSpan
    ) -> Any:
        """start(name, None, kind, attributes, None, span_type) when `root_inline`:
        a sampled root, nothing asked."""
        span_id = _getrandbits(64) or 1
        context = _new_context(
            SpanContext, (_getrandbits(128) or 1, span_id, False, self._root_sampled, DEFAULT_TRACE_STATE, True)
        )
        if _new_span is not None:
            return _new_span(span_type, self, name, context, None, kind, attributes, _UNSET)
        return span_type(self, name, context, None, kind, attributes)

    def start(
        self,
        name: str,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: dict[str, Any],
        parent_context: Any = None,
        span_type: type[ServerSpan] = ServerSpan,
    ) -> trace.Span:
        """A span (a `span_type`) under `parent` (None or invalid: a root);
        `parent_context` is the Context it came from, for a sampler that is asked."""
        if parent is not None and not parent[5]:
            parent = None
        if self._random_ids:
            span_id = _getrandbits(64) or 1
            trace_id = (_getrandbits(128) or 1) if parent is None else parent[0]
        else:
            span_id = self._ids.generate_span_id()
            trace_id = self._ids.generate_trace_id() if parent is None else parent[0]
        inline = self._inline
        trace_state = parent[4] if parent is not None else None
        if inline == "parent":
            sampled = parent is None or bool(parent[3] & 1)
            record = sampled
        elif inline == "always":
            sampled = record = self._always
        else:
            from opentelemetry.sdk.trace.sampling import Decision

            result = self._sampler.should_sample(parent_context, trace_id, name, kind, attributes, None)
            sampled = result.decision is Decision.RECORD_AND_SAMPLE
            record = result.decision is not Decision.DROP
            trace_state = result.trace_state
            if result.attributes:
                attributes = {**attributes, **result.attributes}
        if parent is None:
            flags = self._root_flags[sampled]
        else:
            flags = self._flags((int(parent[3]) & TraceFlags.RANDOM_TRACE_ID) | (1 if sampled else 0))
        if trace_state is None:
            trace_state = DEFAULT_TRACE_STATE
        # SpanContext's own __new__ re-checks the ids: these are in range by construction.
        context = _new_context(SpanContext, (trace_id, span_id, False, flags, trace_state, True))
        if not record:
            return trace.NonRecordingSpan(context)
        if _new_span is not None:
            span: ServerSpan = _new_span(span_type, self, name, context, parent, kind, attributes, _UNSET)
            return span
        return span_type(self, name, context, parent, kind, attributes)
