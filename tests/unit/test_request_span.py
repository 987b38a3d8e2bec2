"""The gateway's HTTP server spans (services.gateway.http.request_span) through a real
GatewayApp: the C way (services.common._otlp_fast.HttpSpans, what the gateway uses
when the extension is built) and the Python one (begin_request / end_request) make
the same span for every kind of request -- a plain root, a continued traceparent, a
request under a current span, a route template, a client error, a raised error --
and leave the caller's context as it was."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode
from span_collect import Batches, provider, trace_with

from services.gateway.generation.pool import InferencePool
from services.gateway.http import request_span
from services.gateway.http.app import create_app
from services.gateway.trajectory import TrajectoryState

GROUP = {"tokens": [[1, 2, 3]], "masks": [[-100, 2, 3]], "scores": [1.0]}


@pytest.fixture(params=["c", "python"])
def way(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Tracing on (a provider whose export takes ServerSpans, as telemetry installs
    it), the request spans made the C way or the Python way."""
    if request.param == "c":
        assert request_span._HttpSpans is not None, "the _otlp_fast extension is not built (pip install -e .)"
    else:
        monkeypatch.setattr(request_span, "_HttpSpans", None)
    p, out = provider()
    trace_with(monkeypatch, p, "clotho.gateway")
    yield request.param, p, out
    p.shutdown()


@pytest.fixture
async def client(way: Any) -> Any:
    app = create_app(TrajectoryState(), InferencePool([]), max_body_bytes=1 << 20)

    @app.get("/items/{item_id}")
    async def item(item_id: str) -> dict:
        return {"item": item_id}

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
        yield c, app, way


def exported(way: Any) -> list[Any]:
    _, p, out = way
    p.force_flush()
    return list(out.spans)


# ServerSpans hold what the export reads in the SDK span's private fields (_kind,
# _parent, _attributes, _status, _start_time, _end_time), not its properties.


def only(spans: list[Any]) -> Any:
    assert len(spans) == 1, [s.name for s in spans]
    return spans[0]


async def test_a_plain_request_is_a_sampled_root_with_its_route_and_status(client: Any) -> None:
    c, app, way = client
    r = await c.post("/scored_data", json=GROUP)
    assert r.status_code == 200
    span = only(exported(way))
    assert span.name == "POST /scored_data"
    assert span._kind is SpanKind.SERVER
    assert span._parent is None
    assert span.context.trace_flags.sampled and span.context.trace_id and span.context.span_id
    assert dict(span._attributes) == {
        "http.request.method": "POST",
        "url.path": "/scored_data",
        "http.route": "/scored_data",
        "http.response.status_code": 200,
    }
    assert span._status.status_code is StatusCode.UNSET
    assert span._start_time <= span._end_time
    # The request's context was made current for it, and is no longer.
    assert trace.get_current_span() is trace.INVALID_SPAN
    assert type(app._spans).__name__ == ("HttpSpans" if way[0] == "c" else "PySpans")


async def test_a_traceparent_is_continued(client: Any) -> None:
    c, _, way = client
    trace_id, parent_id = 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331
    headers = {"traceparent": f"00-{trace_id:032x}-{parent_id:016x}-01"}
    assert (await c.post("/scored_data", json=GROUP, headers=headers)).status_code == 200
    span = only(exported(way))
    assert span.context.trace_id == trace_id
    assert span._parent is not None and span._parent.span_id == parent_id and span._parent.is_remote
    assert span.context.span_id != parent_id


async def test_a_request_under_a_current_span_is_its_child(client: Any) -> None:
    c, _, way = client
    _, p, _ = way
    with p.get_tracer("t").start_as_current_span("caller") as caller:
        assert (await c.get("/status")).status_code == 200
        assert trace.get_current_span() is caller
    spans = {s.name: s for s in exported(way)}
    server = spans["GET /status"]
    assert server._parent is not None and server._parent.span_id == caller.get_span_context().span_id
    assert server.context.trace_id == caller.get_span_context().trace_id


async def test_a_route_template_names_the_span(client: Any) -> None:
    c, _, way = client
    assert (await c.get("/items/abc")).json() == {"item": "abc"}
    span = only(exported(way))
    assert span.name == "GET /items/{item_id}"
    assert span._attributes["url.path"] == "/items/abc"
    assert span._attributes["http.route"] == "/items/{item_id}"


async def test_a_client_error_is_not_a_span_error(client: Any) -> None:
    c, _, way = client
    r = await c.post("/scored_data", content=b"{not json", headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500
    span = only(exported(way))
    assert span._attributes["http.response.status_code"] == r.status_code
    assert span._status.status_code is StatusCode.UNSET
    assert "error.type" not in span._attributes


async def test_a_raised_error_ends_the_span_as_an_error(client: Any) -> None:
    c, _, way = client
    assert (await c.get("/boom")).status_code == 500
    span = only(exported(way))
    assert span.name == "GET /boom"
    assert span._status.status_code is StatusCode.ERROR
    assert span._attributes["error.type"] == "RuntimeError"
    assert span._attributes["http.route"] == "/boom"
    assert trace.get_current_span() is trace.INVALID_SPAN


async def test_a_handler_uses_the_request_span_as_any_span(way: Any) -> None:
    """The request's span, as a handler finds it (the C way's RootSpan, the Python
    way's HttpServerSpan), is an opentelemetry Span whose every method does what a
    ServerSpan's does: attributes, a new name, events, an exception, a status; it
    records until the request ended; its context is the one exported."""
    app = create_app(TrajectoryState(), InferencePool([]), max_body_bytes=1 << 20)
    seen: list[Any] = []

    @app.get("/work")
    async def work() -> dict:
        span = trace.get_current_span()
        assert isinstance(span, trace.Span) and span.is_recording()
        span.set_attribute("one", 1)
        span.set_attributes({"list": [1, 2], "none": None, "s": "x"})
        span.update_name("renamed")
        span.add_event("e", {"k": 2})
        span.record_exception(ValueError("v"))
        span.set_status(StatusCode.OK)
        span.set_status(StatusCode.ERROR)  # OK is final
        seen.append(span)
        return {}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
        assert (await c.get("/work")).status_code == 200
    span = only(exported(way))
    assert not seen[0].is_recording()
    assert span.get_span_context() == seen[0].get_span_context()
    assert span.name == "renamed"  # the path is its route: the name stays
    assert dict(span._attributes) == {
        "http.request.method": "GET",
        "url.path": "/work",
        "one": 1,
        "list": (1, 2),
        "s": "x",
        "http.route": "/work",
        "http.response.status_code": 200,
    }
    assert [e.name for e in span._events] == ["e", "exception"]
    assert span._events[1].attributes["exception.type"] == "ValueError"
    assert span._status.status_code is StatusCode.OK
    assert type(span).__name__ == ("RootSpan" if way[0] == "c" else "HttpServerSpan")


@pytest.mark.parametrize("way", ["c"], indirect=True)  # the Python way draws from `random`: it reseeds a child
def test_a_forked_child_draws_ids_of_its_own(way: Any) -> None:
    """The C way draws ids from a page of kernel randomness: a forked child must not
    draw what is left of its parent's page (both would make the same ids)."""
    spans = request_span.http_spans()
    scope = {"type": "http", "method": "GET", "path": "/status", "headers": []}

    def ids() -> tuple[int, int]:
        span, send, token = spans.begin(scope, None)
        spans.end(span, send, scope, token, None)
        ctx = span.get_span_context()
        return ctx.trace_id, ctx.span_id

    ids()  # the page is drawn
    child = in_a_forked_child(ids)
    assert str(ids()) != child


def sink_app(monkeypatch: pytest.MonkeyPatch, sink: Any) -> tuple[Any, Any, list[Any]]:
    """(provider, app, seen): a GatewayApp traced into `sink` (the OTLP/gRPC export's
    SpanSink, as telemetry installs it) with two routes that keep their request
    spans in `seen`: `/plain`, and `/event`, whose span gets an event (the bytes
    written at its end do not cover it)."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    p = TracerProvider(resource=Resource.create({"service.name": "gw"}))
    p.add_span_processor(sink)
    trace_with(monkeypatch, p, "clotho.gateway")
    app = create_app(TrajectoryState(), InferencePool([]), max_body_bytes=1 << 20)
    seen: list[Any] = []

    @app.get("/plain")
    async def plain() -> dict:
        seen.append(trace.get_current_span())
        return {}

    @app.get("/event")
    async def event() -> dict:
        span = trace.get_current_span()
        span.add_event("e", {"k": 1})
        seen.append(span)
        return {}

    return p, app, seen


async def test_spans_reach_a_span_sink_as_the_encoder_writes_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the OTLP/gRPC export's SpanSink, the C way writes each usual span as its
    OTLP bytes into the sink's SpanBuffer when it ends; taken as runs (EncodedSpans)
    they are byte for byte what the encoder writes for the same spans, in a whole
    export request too. A span the bytes do not cover (an event) goes to the sink's
    list as it is."""
    from services.common import otlp_encode
    from services.common.span_sink import SpanSink

    EncodedSpan = otlp_encode._EncodedSpan
    sink = SpanSink(Batches(), schedule_delay_millis=60_000)
    p, app, seen = sink_app(monkeypatch, sink)

    @app.get("/attrs/{name}")
    async def attrs(name: str) -> dict:
        span = trace.get_current_span()
        span.set_attributes({"i": -3, "big": 1 << 40, "b": True, "f": 0.25, "s": "", "u": "ünï"})
        seen.append(span)
        return {}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
        for path in ("/plain", "/attrs/ä", "/event", "/plain"):
            assert (await c.get(path)).status_code == 200
    # The event's span waits as itself; the other three as their bytes, in order.
    assert sink._spans == [seen[2]]
    assert len(sink._buffer) == 3 and sink.queued() == 4
    written = [seen[0], seen[1], seen[3]]
    first = sink._buffer.take(1)
    rest = sink._buffer.take(512)
    assert len(sink._buffer) == 0 and sink._buffer.take(512) is None
    assert type(first) is EncodedSpan and (first.spans, rest.spans) == (1, 2)
    assert first._recorder is rest._recorder is seen[0]._recorder
    assert first.data == otlp_encode.encode_server_span(seen[0])
    assert rest.data == b"".join(otlp_encode.encode_server_span(s) for s in written[1:])
    assert otlp_encode.encode_request([first, rest, seen[2]]) == otlp_encode.encode_request([*written, seen[2]])
    p.shutdown()


async def test_written_spans_share_the_sinks_bound_and_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """The spans written into the SpanBuffer and the span objects on the sink's list
    are one queue: one bound (past it a span is dropped and counted, whichever way
    it would have waited), a batch is reached by both together and wakes the
    exporter, which takes written spans as one run counted as the spans it holds;
    a forked child starts with the queue empty."""
    from services.common import otlp_encode
    from services.common.span_sink import SpanSink
    from services.common.telemetry import _otlp_exporter

    out = Batches(block=True)
    sink = SpanSink(out, schedule_delay_millis=60_000, max_queue_size=4, max_export_batch_size=3)
    p, app, seen = sink_app(monkeypatch, sink)

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
        for _ in range(3):  # a batch: the exporter takes it (and blocks there)
            assert (await c.get("/plain")).status_code == 200
        assert out.entered.wait(10)
        assert sink.queued() == 0
        for path in ("/plain", "/event", "/plain", "/plain", "/plain"):  # 4 fit, the last does not
            assert (await c.get(path)).status_code == 200
    assert sink.dropped == 1 and sink.queued() == 4 and len(sink._buffer) == 3

    # A forked child's copy of the queue is its parent's to export.
    assert in_a_forked_child(lambda: f"{sink.queued()} {len(sink._buffer)}") == "0 0"

    out.release.set()
    assert sink.force_flush()
    # The OTLP/gRPC exporter's count of a batch (its metrics, its log lines).
    otlp = _otlp_exporter({})
    assert [otlp._count_data(b) for b in out.batches] == [3, 3, 1]
    otlp.shutdown()
    assert [type(b[0]).__name__ for b in out.batches] == ["EncodedSpan", "EncodedSpan", "RootSpan"]
    assert out.batches[2][0] is seen[4]
    sent = [seen[i] for i in (0, 1, 2, 3, 5, 6)]
    assert otlp_encode.encode_request([*out.batches[0], *out.batches[1]]) == otlp_encode.encode_request(sent)
    p.shutdown()


def in_a_forked_child(what: Any) -> str:
    """What `what()` returns (as a str) in a forked child of this process, which
    leaves without pytest's teardown."""
    import os

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(write, str(what()).encode())
        finally:
            os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    out = os.read(read, 1000).decode()
    os.close(read)
    assert status == 0
    return out
