"""Trace links between the submissions of scored groups and the batches that hand
them out: a group keeps the span context of the `/scored_data` (or SubmitScoredData)
call that brought it, and a batch's hand-out span links to each of its groups'.

OpenTelemetry API only (no SDK, no transport): while tracing is off every span here is
non-recording and nothing is stored.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Link, ProxyTracer, SpanContext, TraceFlags
from opentelemetry.trace.propagation import _SPAN_KEY
from opentelemetry.trace.span import DEFAULT_TRACE_STATE

from services.common.current_span import context_var, current_span
from services.gateway.trajectory.queue_index import Group

tracer = trace.get_tracer("clotho.gateway.trajectory")
_new_context = tuple.__new__
_current_link: Any = None
if context_var is not None:  # the default runtime context
    try:  # built by `pip install` (optional)
        _current_link = importlib.import_module("services.common._otlp_fast").current_link
    except (ImportError, AttributeError):
        pass


def submission_span() -> SpanContext | bytes | None:
    """What a later link needs of the current span when it is sampled, else None: the
    usual context (local, the default trace state) as the 25 bytes of its trace id,
    span id (big-endian) and flags, any other as its SpanContext.

    A group keeps this until its batch is handed out. Bytes are no object for the
    garbage collector: a kept SpanContext (a tuple) counted toward every young
    collection's threshold for as long as its group waited, so an ingest with
    tracing on ran half as many collections again as one without. The gateway's
    usual request span (a C RootSpan) gives its bytes as they are, no SpanContext or
    int made (_otlp_fast.current_link)."""
    if _current_link is not None:
        return _current_link(context_var, _SPAN_KEY, _of_span)
    span = current_span()
    return None if span is None else _of_span(span)


def _of_span(span: trace.Span) -> SpanContext | bytes | None:
    """submission_span's answer for `span`."""
    ctx = span.get_span_context()
    # SpanContext: (trace_id, span_id, is_remote, trace_flags, trace_state, is_valid).
    if not (ctx[5] and ctx[3] & 1):
        return None
    if ctx[2] is False and ctx[4] is DEFAULT_TRACE_STATE and 0 <= ctx[3] < 256:
        return ctx[0].to_bytes(16, "big") + ctx[1].to_bytes(8, "big") + bytes((ctx[3],))
    return ctx


def link_context(kept: SpanContext | bytes) -> SpanContext:
    """The SpanContext of what submission_span returned."""
    if type(kept) is bytes:
        # SpanContext's own __new__ re-checks the ids: these came from a valid one.
        return _new_context(
            SpanContext,
            (
                int.from_bytes(kept[:16], "big"),
                int.from_bytes(kept[16:24], "big"),
                False,
                TraceFlags(kept[24]),
                DEFAULT_TRACE_STATE,
                True,
            ),
        )
    assert isinstance(kept, SpanContext)
    return kept


def _link_limit() -> int | None:
    """How many links the tracer's spans keep (the SDK's span limits,
    OTEL_SPAN_LINK_COUNT_LIMIT: 128 by default; None: no limit)."""
    real = tracer._tracer if isinstance(tracer, ProxyTracer) else tracer
    limits = getattr(real, "_span_limits", None)
    return getattr(limits, "max_links", None) if limits is not None else None


@contextlib.contextmanager
def handout_span(groups: Sequence[Group], step: int, route: str) -> Iterator[trace.Span]:
    """A span for handing `groups` out as batch `step`, linked to the submissions
    they came from (each once; `clotho.linked_submissions` counts them); `route`
    names the way out (StreamBatches, /batch).

    A span keeps at most the tracer's link limit (the last ones given): only the
    last that many distinct submissions are made into links. Making one for every
    group (a SpanContext and a Link each, ~2.7 us) cost a 1024-group batch 2.8 ms
    of the event loop for 128 links kept, and left a thousand short-lived objects
    per batch for the garbage collector."""
    if not trace.get_current_span().is_recording():
        yield trace.INVALID_SPAN
        return
    # Distinct submissions in the order they came: a kept link is bytes (the usual
    # context) or a SpanContext (keyed by its ids).
    firsts: dict[Any, SpanContext | bytes] = {}
    for g in groups:
        kept = g.span
        if kept is not None:
            firsts.setdefault(kept if type(kept) is bytes else (kept.trace_id, kept.span_id), kept)
    distinct = list(firsts.values())
    limit = _link_limit()
    chosen = distinct if limit is None else distinct[max(len(distinct) - limit, 0) :]
    links = [Link(link_context(kept)) for kept in chosen]
    attributes: dict[str, str | int] = {
        "clotho.step": step,
        "clotho.route": route,
        "clotho.groups": len(groups),
        "clotho.sequences": sum(g.size for g in groups),
        "clotho.linked_submissions": len(distinct),
    }
    with tracer.start_as_current_span("gateway.batch", links=links, attributes=attributes) as span:
        yield span
