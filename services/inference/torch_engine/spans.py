"""The torch engine's spans of one request, written once the request has ended.

The worker thread notes a few timestamps on a traced request (submitted, admitted,
prefilled; per sample the time each policy-version span of its output began, and when
it finished); when the request's last sample is handed back, the event loop writes
them as spans under the context the request was submitted in (the inference server's
Generate span), carried explicitly across the thread:

    engine.generate            prompt/output tokens, n, finish reasons, shard, TTFT
      engine.queue             waiting for room in the running batch
      engine.prefill           the prompt's prefill (with the requests admitted alongside)
      engine.decode            one per sample and policy version: a weight commit in the
                               middle of a sample shows as two, each with its version

Untraced requests (no recording span at submit) note nothing and write nothing.

When the export takes ServerSpans (OTLP/gRPC through a SpanSink, or none) and the
sampler is decided inline (the default parent-based always-on, always_on/off), the
spans are written straight from their fields as OTLP bytes into the sink's buffer
(SpanBuffer.add_spans, services/common/_otlp_fast.c: no span object, context or
event object per span; with OTEL_TRACES_EXPORTER=none nothing is made at all). Else,
and for a failed request (its exception event), they are span objects:
services.common.server_span ServerSpans from the tracer's Recorder, or the SDK's
(console and OTLP/HTTP exports). Both ways write the same bytes
(tests/unit/test_engine_spans.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation import _SPAN_KEY

from services.common import telemetry
from services.common.span_sink import buffer_of

if TYPE_CHECKING:
    from services.inference.torch_engine.batch import RequestState, SampleState

TRACER_NAME = "clotho.inference.engine"


def write_request_spans(request: RequestState, shard: str) -> None:
    """Write `request`'s spans (event loop; once, when its samples have all ended or
    it failed)."""
    ctx = request.trace_ctx
    if ctx is None:
        return
    request.trace_ctx = None
    spans: list[SpanTuple] | None = None
    writer = _writer()
    if writer is not None and request.error is None:
        buffer, recorder = writer
        parent_span = ctx.get(_SPAN_KEY)
        parent = None if parent_span is None else parent_span.get_span_context()
        if parent is not None and not parent.is_valid:
            parent = None
        if parent is None or not parent.trace_state:  # a trace state: the span objects write it
            if buffer is None or not _sampled(recorder, parent):
                return  # sampled and exported nowhere (OTEL_TRACES_EXPORTER=none), or not sampled
            spans = _request_spans(request, shard)
            trace_id, parent_id, remote = (0, 0, False) if parent is None else parent[:3]
            if buffer.add_spans(recorder, trace_id, parent_id, remote, _INTERNAL, spans):
                return
    _write_objects(ctx, spans or _request_spans(request, shard), request.error)


# One request's spans as add_spans takes them: (name, parent's index or -1 for the
# request's context, start, end, attributes, events), children first and
# engine.generate (their parent) last, in the order the span objects end.
SpanTuple = tuple[str, int, int, int, dict[str, Any], tuple[tuple[str, int], ...]]
_INTERNAL = SpanKind.INTERNAL.value


def _request_spans(request: RequestState, shard: str) -> list[SpanTuple]:
    """`request`'s spans (engine.generate's one event: its first token)."""
    now = time.time_ns()
    samples: Sequence[SampleState] = sorted(request.samples_done, key=lambda s: s.index)
    submitted = request.submitted_ns
    admitted = request.admitted_ns or now
    prefilled = request.prefilled_ns or admitted
    ended = max((s.finished_ns for s in samples), default=now) or now
    first_tokens = [s.span_times[0] for s in samples if s.span_times]
    first_token = min(first_tokens) if first_tokens else None
    reasons = [s.finish_reason.value for s in samples if s.finish_reason is not None]
    attributes: dict[str, Any] = {
        "clotho.shard": shard,
        "clotho.request_id": request.spec.request_id,
        "clotho.prompt_tokens": len(request.input_ids),
        "clotho.n": request.n,
        "clotho.max_new_tokens": request.max_new_tokens,
        "clotho.output_tokens": sum(len(s.output_ids) for s in samples),
        "clotho.finish_reasons": tuple(reasons),
        "clotho.finish_reason": reasons[0] if len(set(reasons)) == 1 else "mixed" if reasons else "error",
        "clotho.policy_versions": tuple(sorted({v.version for s in samples for v in s.spans})),
    }
    if first_token is not None:
        attributes["clotho.time_to_first_token_ms"] = (first_token - submitted) / 1e6
    spans: list[SpanTuple] = []
    if request.admitted_ns:
        spans.append(("engine.queue", -1, submitted, admitted, {}, ()))
        prefill_attributes = {
            "clotho.prompt_tokens": len(request.input_ids),
            "clotho.batch_requests": request.admitted_with,
        }
        spans.append(("engine.prefill", -1, admitted, prefilled, prefill_attributes, ()))
    for s in samples:
        times = [*s.span_times, s.finished_ns or ended]
        last = len(s.spans) - 1
        for i, version_span in enumerate(s.spans):
            stop = s.spans[i + 1].start_token if i < last else len(s.output_ids)
            decode_attributes = {
                "clotho.sample": s.index,
                "clotho.policy_version": version_span.version,
                "clotho.start_token": version_span.start_token,
                "clotho.tokens": stop - version_span.start_token,
                "clotho.finish_reason": s.finish_reason.value if s.finish_reason and i == last else "",
            }
            spans.append(("engine.decode", -1, times[i], times[i + 1], decode_attributes, ()))
    root = len(spans)
    spans = [(name, root, start, end, attrs, events) for name, _, start, end, attrs, events in spans]
    events = (("first_token", first_token),) if first_token is not None else ()
    spans.append(("engine.generate", -1, submitted, max(ended, prefilled), attributes, events))
    return spans


_writer_of: tuple[Any, tuple[Any, Any] | None] | None = None


def _writer() -> tuple[Any, Any] | None:
    """(the SpanBuffer the engine's spans are written into, or None when the export
    takes none, and the Recorder) when they are written from their fields: the
    tracer's Recorder samples inline with random ids (what add_spans does); else None
    (span objects: the SDK's, or a sampler to ask)."""
    global _writer_of
    recorder = telemetry.server_span_recorder(TRACER_NAME) if telemetry.enabled else None
    cached = _writer_of
    if cached is not None and cached[0] is recorder:
        return cached[1]
    writer = None
    if recorder is not None and recorder._random_ids and recorder._inline is not None:
        buffer = buffer_of(recorder.on_end)
        if buffer is not None or recorder.on_end is None:
            writer = (buffer, recorder)
    _writer_of = (recorder, writer)
    return writer


def _sampled(recorder: Any, parent: Any) -> bool:
    """Whether the recorder's inline sampler samples a span under `parent`."""
    if recorder._inline == "always":
        return bool(recorder._always)
    return parent is None or bool(parent[3] & 1)


def _write_objects(ctx: Any, spans: list[SpanTuple], error: BaseException | None) -> None:
    """Write `spans` as span objects (telemetry.start_span: ServerSpans, or the SDK's)."""
    name, _, start, end, attributes, events = spans[-1]
    root = telemetry.start_span(TRACER_NAME, name, ctx, SpanKind.INTERNAL, attributes, start)
    for event, timestamp in events:
        root.add_event(event, timestamp=timestamp)
    if error is not None:
        root.record_exception(error)
        root.set_status(trace.StatusCode.ERROR, str(error))
    root_ctx = trace.set_span_in_context(root)
    for name, _, start, end, attributes, _ in spans[:-1]:
        telemetry.start_span(TRACER_NAME, name, root_ctx, SpanKind.INTERNAL, attributes, start).end(end_time=end)
    root.end(end_time=end)
