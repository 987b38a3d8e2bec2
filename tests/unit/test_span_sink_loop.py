"""services.common.span_sink's export from an event loop (SpanSink.run_on_loop, what
the gateway and the inference server do): the batches leave from the loop over a
grpc.aio channel to a real OTLP/gRPC receiver, with no exporter thread running; spans
ended on other threads wake it; a batch the loop was sending is never lost, whether
the service hands the export back (stop_on_loop: sent once) or its loop just stops
(the next flush sends it); transient refusals are retried as the SDK retries them."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from otlp_receiver import Receiver, otlp_receiver
from span_collect import end_spans, exporting_sink, sink_provider

from services.common import otlp_aio
from services.common.span_sink import SpanSink


class HeldReceiver(Receiver):
    """A receiver whose first Export waits for `release` (`entered` once it began),
    or, with `refuse`, is answered UNAVAILABLE."""

    def __init__(self, refuse: bool = False) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()
        self.refuse = refuse
        self.calls = 0

    def Export(self, request: Any, context: Any) -> Any:
        self.calls += 1
        if self.calls == 1:
            self.entered.set()
            if self.refuse:
                context.abort(grpc.StatusCode.UNAVAILABLE, "collector starting")
            self.release.wait(30)
        return super().Export(request, context)


def exporter_thread(sink: SpanSink) -> bool:
    """Whether `sink`'s exporter thread runs."""
    thread = sink._thread
    return thread is not None and thread.is_alive()


def received(receiver: Receiver) -> list[int]:
    return sorted(s.attributes["i"] for s in receiver.find(lambda s: s.name == "POST /scored_data"))


@contextlib.contextmanager
def held_sink(monkeypatch: Any, batch: int, refuse: bool = False) -> Iterator[tuple[HeldReceiver, SpanSink, Any, Any]]:
    """A HeldReceiver (see it for `refuse`), a sink exporting to it in batches of
    `batch` (the schedule out of the way), the sink's provider and its recorder; the
    receiver is released on the way out, whatever the test left held."""
    receiver = HeldReceiver(refuse)
    with otlp_receiver(receiver) as (_, endpoint):
        sink = exporting_sink(monkeypatch, endpoint, schedule_delay_millis=60_000, max_export_batch_size=batch)
        p, recorder = sink_provider(sink)
        try:
            yield receiver, sink, p, recorder
        finally:
            receiver.release.set()


async def until(condition: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_the_loop_sends_the_batches_and_no_exporter_thread_runs(monkeypatch: Any) -> None:
    with otlp_receiver() as (receiver, endpoint):
        sink = exporting_sink(monkeypatch, endpoint, schedule_delay_millis=60_000, max_export_batch_size=8)
        p, recorder = sink_provider(sink)
        assert exporter_thread(sink)

        async def serve() -> None:
            assert sink.run_on_loop()
            assert not exporter_thread(sink)
            end_spans(recorder, 8)  # a full batch, on the loop: the pump wakes
            await until(lambda: len(receiver.request_sizes) == 1)
            # A full batch ended on another thread wakes the loop too.
            worker = threading.Thread(target=end_spans, args=(recorder, 8))
            worker.start()
            worker.join()
            await until(lambda: len(receiver.request_sizes) == 2)
            assert not exporter_thread(sink)
            # Handed back: the thread exports again.
            await sink.stop_on_loop()
            assert exporter_thread(sink)

        asyncio.run(serve())
        assert receiver.request_sizes == [8, 8]
        end_spans(recorder, 3)
        assert sink.force_flush()
        assert receiver.request_sizes == [8, 8, 3]
        # The loop's two batches went over grpc.aio, the thread's over the SDK's channel.
        # (The SDK's channel options, its user agent among them, are kept on both.)
        agents = [s.user_agent for s in receiver.find(lambda s: True)]
        assert all(a.startswith("OTel-OTLP-Exporter-Python/") for a in agents), agents
        assert ["grpc-python-asyncio/" in a for a in agents] == [True] * 16 + [False] * 3
        p.shutdown()


def test_the_schedule_sends_what_is_queued_from_the_loop(monkeypatch: Any) -> None:
    with otlp_receiver() as (receiver, endpoint):
        sink = exporting_sink(monkeypatch, endpoint, schedule_delay_millis=50, max_export_batch_size=512)
        p, recorder = sink_provider(sink)

        async def serve() -> None:
            assert sink.run_on_loop()
            end_spans(recorder, 3)  # far from a batch: the schedule sends them
            await until(lambda: len(received(receiver)) == 3)
            await sink.stop_on_loop()

        asyncio.run(serve())
        assert received(receiver) == [0, 1, 2]
        p.shutdown()


def test_a_service_handing_back_the_export_waits_for_its_batch_in_flight(monkeypatch: Any) -> None:
    with held_sink(monkeypatch, 8) as (receiver, sink, p, recorder):

        async def serve() -> None:
            assert sink.run_on_loop()
            end_spans(recorder, 8)
            await until(receiver.entered.is_set)  # the loop's send is held by the receiver
            end_spans(recorder, 2)  # queued behind it
            stopping = asyncio.ensure_future(sink.stop_on_loop())
            # Once it has marked the pump stopping it waits for the pump, whose batch
            # is still held: not done (one that did not wait would be done by then).
            await until(lambda: sink._pump_stopping or stopping.done())
            assert not stopping.done()
            receiver.release.set()
            await stopping

        asyncio.run(serve())
        p.shutdown()
        # The held batch once (no re-send), then what was queued behind it.
        assert receiver.request_sizes == [8, 2]
        assert received(receiver) == [0, 0, 1, 1, 2, 3, 4, 5, 6, 7]


@pytest.mark.parametrize("then", ["force_flush", "shutdown"])
def test_a_batch_in_flight_when_the_loop_stops_is_sent_by_the_next_flush(monkeypatch: Any, then: str) -> None:
    """The loop stops (a service killed mid-export, a test's loop) with its send held
    by the receiver: the flush on this thread sends the batch itself."""
    with held_sink(monkeypatch, 8) as (receiver, sink, p, recorder):
        loop = asyncio.new_event_loop()

        async def start() -> Any:
            assert sink.run_on_loop()
            end_spans(recorder, 8)
            await until(receiver.entered.is_set)
            return sink._pump

        try:
            pump = loop.run_until_complete(start())  # returns with the send in flight
            end_spans(recorder, 1)
            if then == "force_flush":
                assert sink.force_flush()
            else:
                p.shutdown()
            # Sent again from here while the first send is still held: nothing lost.
            assert receiver.request_sizes == [8, 1]
            assert received(receiver) == [0, 0, 1, 2, 3, 4, 5, 6, 7]
            receiver.release.set()
            if then == "force_flush":
                p.shutdown()
            loop.run_until_complete(asyncio.wait([pump]))  # shut down, the pump ends
        finally:
            receiver.release.set()  # before the loop closes: its send must not stay held
            loop.close()


def test_a_refused_export_is_retried_from_the_loop(monkeypatch: Any) -> None:
    with held_sink(monkeypatch, 4, refuse=True) as (receiver, sink, p, recorder):

        async def serve() -> None:
            assert sink.run_on_loop()
            end_spans(recorder, 4)
            # UNAVAILABLE first; the retry (after ~1 s of backoff) is taken.
            await until(lambda: len(received(receiver)) == 4)
            await sink.stop_on_loop()

        asyncio.run(serve())
        assert receiver.calls == 2 and receiver.request_sizes == [4]
        p.shutdown()


def test_without_an_aio_export_the_thread_keeps_exporting() -> None:
    from span_collect import Batches

    out = Batches()
    sink = SpanSink(out, schedule_delay_millis=60_000)
    p, recorder = sink_provider(sink)

    async def serve() -> bool:
        return sink.run_on_loop()

    assert not asyncio.run(serve())
    assert exporter_thread(sink)
    p.shutdown()


@pytest.mark.parametrize("missing", ["an exporter setting", "the SDK's tries"])
def test_an_exporter_without_the_settings_keeps_the_thread(monkeypatch: Any, missing: str) -> None:
    """An SDK release whose OTLP exporter keeps its settings (or its module its retry
    count) under other names: the export stays on the thread rather than fail on the loop."""
    sink = exporting_sink(monkeypatch, "http://127.0.0.1:9", schedule_delay_millis=60_000)
    if missing == "an exporter setting":
        del sink.exporter._insecure
    else:
        monkeypatch.setattr(otlp_aio, "MAX_TRIES", None)

    async def serve() -> bool:
        return sink.run_on_loop()

    assert not asyncio.run(serve())
    assert exporter_thread(sink)
    sink.shutdown()
