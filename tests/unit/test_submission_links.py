"""The trajectory store's record of the submission that brought a group
(services.gateway.trajectory.tracing): what a group keeps from a `/scored_data`
call's span, and the hand-out span's links made from it."""

from __future__ import annotations

import gc

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState
from span_collect import provider, trace_with

from services.gateway.generation.pool import InferencePool
from services.gateway.http.app import create_app
from services.gateway.trajectory import TrajectoryState, tracing
from services.gateway.trajectory.tracing import handout_span, link_context, submission_span

GROUP = {"tokens": [[1, 2, 3], [1, 2, 4]], "masks": [[-100, 2, 3], [-100, 2, 4]], "scores": [1.0, 0.0]}


@pytest.mark.parametrize(
    "ctx",
    [
        SpanContext((1 << 127) + 5, (1 << 63) + 7, False, TraceFlags(0x03)),  # sampled, random trace id
        SpanContext(9, 10, False, TraceFlags(0x01)),
        SpanContext(9, 10, True, TraceFlags(0x01)),  # a remote parent's
        SpanContext(9, 10, False, TraceFlags(0x01), TraceState([("k", "v")])),
    ],
)
@pytest.mark.parametrize("way", ["c", "python"])
def test_what_a_group_keeps_gives_back_the_submissions_context(
    ctx: SpanContext, way: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if way == "python":  # without the C extension's current_link
        monkeypatch.setattr(tracing, "_current_link", None)
    else:
        assert tracing._current_link is not None, "the _otlp_fast extension is not built (pip install -e .)"
    with trace.use_span(NonRecordingSpan(ctx)):
        kept = submission_span()
    assert kept is not None
    back = link_context(kept)
    assert (back.trace_id, back.span_id, back.is_remote, back.trace_flags, back.trace_state) == (
        ctx.trace_id,
        ctx.span_id,
        ctx.is_remote,
        ctx.trace_flags,
        ctx.trace_state,
    )
    # The usual context is kept as bytes: no object for the garbage collector to
    # count and walk while the group waits.
    usual = not ctx.is_remote and not ctx.trace_state
    assert (type(kept) is bytes) == usual
    assert gc.is_tracked(kept) != usual


def test_an_unsampled_span_leaves_nothing_to_link() -> None:
    with trace.use_span(NonRecordingSpan(SpanContext(9, 10, False, TraceFlags(0)))):
        assert submission_span() is None
    assert submission_span() is None  # no current span


async def test_a_hand_out_links_each_submission_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through a real GatewayApp: the groups of three `/scored_data` calls (one of them
    posted twice in one call) keep their calls' spans; a hand-out span over them
    links to each call once."""
    p, out = provider()
    trace_with(monkeypatch, p, "clotho.gateway")
    monkeypatch.setattr(tracing, "tracer", p.get_tracer("clotho.gateway.trajectory"))
    state = TrajectoryState()
    app = create_app(state, InferencePool([]), max_body_bytes=1 << 20)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
        for _ in range(2):
            assert (await c.post("/scored_data", json=GROUP)).status_code == 200
        assert (await c.post("/scored_data_list", json=[GROUP, GROUP])).status_code == 200
    p.force_flush()
    calls = sorted((s.context.trace_id, s.context.span_id) for s in out.spans if s.name.startswith("POST /scored_data"))
    assert len(calls) == 3
    groups = list(state.queue)
    assert len(groups) == 4 and all(type(g.span) is bytes for g in groups)  # the usual context: bytes
    with p.get_tracer("t").start_as_current_span("step"), handout_span(groups, 1, "/batch") as span:
        links = sorted((link.context.trace_id, link.context.span_id) for link in span.links)  # type: ignore[attr-defined]
    assert links == calls
    p.shutdown()


def test_a_hand_out_links_the_last_submissions_the_span_keeps(monkeypatch: pytest.MonkeyPatch) -> None:
    """A span keeps at most its tracer's link limit (OTEL_SPAN_LINK_COUNT_LIMIT): the
    hand-out links the last that many distinct submissions (as the SDK would keep
    them), and counts them all."""
    from opentelemetry.sdk.trace import SpanLimits

    from services.gateway.trajectory.queue_index import Group

    p, out = provider(span_limits=SpanLimits(max_links=3))
    monkeypatch.setattr(tracing, "tracer", p.get_tracer("clotho.gateway.trajectory"))
    contexts = [SpanContext(100 + i, 200 + i, False, TraceFlags(0x01)) for i in range(6)]
    contexts.append(SpanContext(7, 8, True, TraceFlags(0x01)))  # a remote parent's: kept as itself
    kept = []
    for ctx in [*contexts, contexts[0], contexts[5]]:  # two submissions with two groups each
        with trace.use_span(NonRecordingSpan(ctx)):
            kept.append(submission_span())
    groups = [Group(id=i, size=2, body=b"", env_id=None) for i in range(len(kept))]
    for g, k in zip(groups, kept, strict=True):
        g.span = k
    groups.append(Group(id=99, size=1, body=b"", env_id=None))  # untraced (stored before a restart)
    with p.get_tracer("t").start_as_current_span("step"), handout_span(groups, 1, "/batch") as span:
        pass
    linked = [(link.context.trace_id, link.context.span_id, link.context.is_remote) for link in span.links]  # type: ignore[attr-defined]
    assert linked == [(104, 204, False), (105, 205, False), (7, 8, True)]
    assert span.attributes["clotho.linked_submissions"] == 7  # type: ignore[attr-defined]
    assert span.attributes["clotho.groups"] == 10  # type: ignore[attr-defined]
    p.shutdown()
