"""Trace links between the submissions of scored groups and the batches that hand
them out: a group keeps the span context of the `/scored_data` (or SubmitScoredData)
call that brought it, and a batch's hand-out span links to each of its groups'.

OpenTelemetry API only (no SDK, no transport): while tracing is off every span here is
non-recording and nothing is stored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from opentelemetry import trace
from opentelemetry.trace import Link, SpanContext

from services.common.current_span import sampled_span_context
from services.gateway.trajectory.queue_index import Group

tracer = trace.get_tracer("clotho.gateway.trajectory")


def submission_span() -> SpanContext | None:
    """The current span's context when it is sampled (what a later link can find)."""
    return sampled_span_context()


@contextlib.contextmanager
def handout_span(groups: Sequence[Group], step: int, route: str) -> Iterator[trace.Span]:
    """A span for handing `groups` out as batch `step`, linked to every submission
    they came from; `route` names the way out (StreamBatches, /batch)."""
    if not trace.get_current_span().is_recording():
        yield trace.INVALID_SPAN
        return
    seen: set[int] = set()
    links = []
    for g in groups:
        ctx = g.span
        if ctx is not None and ctx.span_id not in seen:
            seen.add(ctx.span_id)
            links.append(Link(ctx))
    attributes: dict[str, str | int] = {
        "clotho.step": step,
        "clotho.route": route,
        "clotho.groups": len(groups),
        "clotho.sequences": sum(g.size for g in groups),
        "clotho.linked_submissions": len(links),
    }
    with tracer.start_as_current_span("gateway.batch", links=links, attributes=attributes) as span:
        yield span
