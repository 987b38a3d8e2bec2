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

When the export takes them (OTLP/gRPC, or none) the spans are
services.common.server_span ServerSpans from the tracer's Recorder, not SDK spans:
the same fields at a fraction of the CPU (four or more spans per request, each
~25 us through the SDK, were most of what exporting cost the inference process).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind

from services.common import telemetry

if TYPE_CHECKING:
    from services.inference.torch_engine.batch import RequestState, SampleState

TRACER_NAME = "clotho.inference.engine"


def _starter(request_ctx: Any) -> Any:
    """start(name, parent span or None (the request's context), start_time,
    attributes) -> a started INTERNAL span (telemetry.start_span)."""

    def start(name: str, parent: Any, start_time: int, attributes: dict[str, Any] | None = None) -> Any:
        context = request_ctx if parent is None else trace.set_span_in_context(parent)
        return telemetry.start_span(TRACER_NAME, name, context, SpanKind.INTERNAL, attributes or {}, start_time)

    return start


def write_request_spans(request: RequestState, shard: str) -> None:
    """Write `request`'s spans (event loop; once, when its samples have all ended or
    it failed)."""
    ctx = request.trace_ctx
    if ctx is None:
        return
    request.trace_ctx = None
    now = time.time_ns()
    samples: Sequence[SampleState] = sorted(request.samples_done, key=lambda s: s.index)
    submitted = request.submitted_ns
    admitted = request.admitted_ns or now
    prefilled = request.prefilled_ns or admitted
    ended = max((s.finished_ns for s in samples), default=now) or now
    first_tokens = [s.span_times[0] for s in samples if s.span_times]
    reasons = [s.finish_reason.value for s in samples if s.finish_reason is not None]
    attributes: dict[str, Any] = {
        "clotho.shard": shard,
        "clotho.request_id": request.spec.request_id,
        "clotho.prompt_tokens": len(request.input_ids),
        "clotho.n": request.n,
        "clotho.max_new_tokens": request.max_new_tokens,
        "clotho.output_tokens": sum(len(s.output_ids) for s in samples),
        "clotho.finish_reasons": reasons,
        "clotho.finish_reason": reasons[0] if len(set(reasons)) == 1 else "mixed" if reasons else "error",
        "clotho.policy_versions": sorted({v.version for s in samples for v in s.spans}),
    }
    if first_tokens:
        attributes["clotho.time_to_first_token_ms"] = (min(first_tokens) - submitted) / 1e6
    start = _starter(ctx)
    root = start("engine.generate", None, submitted, attributes)
    if first_tokens:
        root.add_event("first_token", timestamp=min(first_tokens))
    if request.error is not None:
        root.record_exception(request.error)
        root.set_status(trace.StatusCode.ERROR, str(request.error))
    if request.admitted_ns:
        start("engine.queue", root, submitted).end(end_time=admitted)
        prefill = start(
            "engine.prefill",
            root,
            admitted,
            {"clotho.prompt_tokens": len(request.input_ids), "clotho.batch_requests": request.admitted_with},
        )
        prefill.end(end_time=prefilled)
    for s in samples:
        times = [*s.span_times, s.finished_ns or ended]
        for i, version_span in enumerate(s.spans):
            stop = s.spans[i + 1].start_token if i + 1 < len(s.spans) else len(s.output_ids)
            decode = start(
                "engine.decode",
                root,
                times[i],
                {
                    "clotho.sample": s.index,
                    "clotho.policy_version": version_span.version,
                    "clotho.start_token": version_span.start_token,
                    "clotho.tokens": stop - version_span.start_token,
                    "clotho.finish_reason": s.finish_reason.value if s.finish_reason and i == len(s.spans) - 1 else "",
                },
            )
            decode.end(end_time=times[i + 1])
    root.end(end_time=max(ended, prefilled))
