"""A span processor for the OTLP/gRPC wire exporter: ended spans go onto a plain list.

The SDK's BatchSpanProcessor costs the thread that ends a span ~2.5 us per span on
the gateway's ingest route (the provider's fan-out, a pid check, its metrics hooks,
the deque, an Event checked per span), a few percent of a whole ingest request. Here
ending a ServerSpan (services.common.server_span) is `SpanSink.add`: one length check
against the queue's bound and a list append (atomic under the GIL: no lock per span);
the exporter thread is woken once per batch (when the queue reaches the batch size)
or wakes on its schedule, takes what is queued in batches of up to the batch size
and exports each as one request. SDK spans (child spans, the gRPC server
instrumentation's) come through the provider's `on_end` onto the list.
ServerSpans (services.common.server_span: the gateway's, the inference server's and
engine's, the trainer's) do not wait as objects: a Recorder's `on_end` is
`add_server`, which writes the span as its OTLP bytes when it ends into the sink's
SpanBuffer (services.common._otlp_fast: the bytes back to back, in runs by recorder);
the gateway's request spans (services.gateway.http.request_span's C HttpSpans) are
written there too. Hundreds of spans waiting for the exporter were hundreds of
objects (with their attribute dicts and contexts) for every garbage collection to
walk, and the exporter encoded them under the GIL the service's threads need; now
the exporter takes runs of bytes (EncodedSpans) and the buffer counts toward the
same bound and batches.

The BatchSpanProcessor's settings and behaviour are kept: OTEL_BSP_SCHEDULE_DELAY,
OTEL_BSP_MAX_QUEUE_SIZE (past it a span is dropped and counted: `dropped`),
OTEL_BSP_MAX_EXPORT_BATCH_SIZE, OTEL_BSP_EXPORT_TIMEOUT (read the SDK's way), with
the SDK's defaults but for the batch and the queue where their variables are not set:
batches of 2048 spans and a queue of 8192 (the SDK's 512 and 2048; a default batch
stays within a queue that is set, a default queue holds a batch that is). What exporting
costs a server is mostly the exporter thread running beside its requests, per export
cycle, more than the spans' own export (bench/tracing_inprocess.py's `deferred`
mode); a quarter of the cycles took served ingest's exporting cost from -9.0% to
-6.7% of req/s in one run (on: -5.1%). A batch of 2048 gateway spans is ~0.5 MB, well
under a collector's 4 MiB default. `force_flush` exports everything queued before it returns,
`shutdown` (the provider's, at exit and after SIGTERM) exports what is queued, then
stops the exporter; a forked child starts with an empty queue and its own thread.

A service whose requests all run on one asyncio loop (the gateway, the inference
server: services.common.server.run_service) exports from that loop instead
(`run_on_loop`): a task there waits for a batch or the schedule, takes the batch and
sends it over a grpc.aio channel (services.common.otlp_aio: the exporter's settings
and retries), one batch in flight; a span ended on another thread (the engine's)
wakes it through the loop. No exporter thread then runs beside the requests: its
GIL hand-offs were most of what exporting cost a busy gateway (bench/tracing_inprocess.py:
+3.9 us per ingest request over `on` from the thread, +1.0 us from the loop, the
export's own work, in one run). A batch in flight is never lost: `stop_on_loop` (the
service stopping) waits for it; a loop that stops without it (killed, closed) leaves
the batch to the next force_flush or shutdown, which sends it again (at least once).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import threading
import time
import weakref
from typing import Any

from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY, attach, detach, set_value
from opentelemetry.sdk.environment_variables import OTEL_BSP_MAX_EXPORT_BATCH_SIZE, OTEL_BSP_MAX_QUEUE_SIZE
from opentelemetry.sdk.trace import SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor

log = logging.getLogger(__name__)
try:  # built by `pip install`, as the encoder
    _SpanBuffer: Any = importlib.import_module("services.common._otlp_fast").SpanBuffer
except ImportError:
    _SpanBuffer = None
# The SDK's readers of the OTEL_BSP_* variables (untyped).
_BSP: Any = BatchSpanProcessor


# Where OTEL_BSP_MAX_EXPORT_BATCH_SIZE and OTEL_BSP_MAX_QUEUE_SIZE are not set (the
# module's doc).
DEFAULT_MAX_EXPORT_BATCH_SIZE = 2048
DEFAULT_MAX_QUEUE_SIZE = 8192


def _set(var: str) -> bool:
    return bool(os.environ.get(var, "").strip())


def buffer_of(on_end: Any) -> Any:
    """The SpanBuffer whose `add` is `on_end` (a Recorder's on_end when a lone SpanSink
    takes its spans, written as their OTLP bytes), else None."""
    buffer: Any = getattr(on_end, "__self__", None)
    if _SpanBuffer is not None and type(buffer) is _SpanBuffer and on_end == buffer.add:
        return buffer
    return None


class SpanSink(SpanProcessor):
    """Batches ended spans for `exporter` (one that takes ServerSpans and SDK spans)."""

    def __init__(
        self,
        exporter: Any,
        schedule_delay_millis: float | None = None,
        max_queue_size: int | None = None,
        max_export_batch_size: int | None = None,
        export_timeout_millis: float | None = None,
    ) -> None:
        if max_queue_size is None:
            max_queue_size = _BSP._default_max_queue_size() if _set(OTEL_BSP_MAX_QUEUE_SIZE) else None
        if schedule_delay_millis is None:
            schedule_delay_millis = _BSP._default_schedule_delay_millis()
        if max_export_batch_size is None:
            max_export_batch_size = (
                _BSP._default_max_export_batch_size() if _set(OTEL_BSP_MAX_EXPORT_BATCH_SIZE) else None
            )
        # Clotho's defaults (the module's doc), kept within what is set: a batch no
        # larger than a queue that is, a queue no smaller than a batch that is.
        if max_export_batch_size is None:
            max_export_batch_size = min(DEFAULT_MAX_EXPORT_BATCH_SIZE, max_queue_size or DEFAULT_MAX_QUEUE_SIZE)
        if max_queue_size is None:
            max_queue_size = max(DEFAULT_MAX_QUEUE_SIZE, max_export_batch_size)
        if export_timeout_millis is None:
            export_timeout_millis = _BSP._default_export_timeout_millis()
        _BSP._validate_arguments(max_queue_size, schedule_delay_millis, max_export_batch_size)
        self.exporter = exporter
        self.max_queue_size = max_queue_size
        self.max_export_batch_size = max_export_batch_size
        self.export_timeout_millis = export_timeout_millis
        self._delay = schedule_delay_millis / 1e3
        # Spans dropped because the queue was full.
        self.dropped = 0
        self._shutdown = False
        self._limit = max_queue_size
        # Appended to by the threads that end spans; only the exporter (under
        # _export_lock) removes from its front.
        self._spans: list[Any] = []
        # Spans written as their bytes (what HttpSpans queues), or None without the
        # C extension; _start hands it the exporter's wake-up.
        self._buffer: Any = None
        # What a Recorder's spans end into (see the module's doc).
        self.add_server = self.add
        if _SpanBuffer is not None:
            from services.common.otlp_encode import encode_server_span

            self._buffer = _SpanBuffer(self._spans, None, self._drop, max_queue_size, max_export_batch_size)
            self._buffer.fallback = encode_server_span  # a span the C writer leaves (links, a trace state)
            self.add_server = self._buffer.add
        self._start()
        if hasattr(os, "register_at_fork"):
            reinit = weakref.WeakMethod(self._start)

            def after_in_child() -> None:
                start = reinit()
                if start is not None:
                    start()

            os.register_at_fork(after_in_child=after_in_child)

    def _start(self) -> None:
        """Start the exporter thread with an empty queue (a forked child's copy of
        its parent's queue is the parent's to export)."""
        self._spans.clear()
        if self._buffer is not None:
            self._buffer.clear()
        self._export_lock = threading.Lock()
        # The task exporting on a loop (run_on_loop), while one does.
        self._pump: asyncio.Task[None] | None = None
        self._pump_stopping = False
        # The batch the loop is sending, until its export call returns.
        self._inflight: list[Any] | None = None
        self._idle = threading.Event()  # set while no batch is in flight on the loop
        self._idle.set()
        self._start_thread()

    def _start_thread(self) -> None:
        self._wake = threading.Event()
        self._notify = self._wake.set
        if self._buffer is not None:
            self._buffer.wake = self._notify
        self._halt = threading.Event()
        self._thread: threading.Thread | None = threading.Thread(
            target=self._worker, args=(self._halt,), name="OtelSpanSink", daemon=True
        )
        self._thread.start()

    def run_on_loop(self, loop: asyncio.AbstractEventLoop | None = None) -> bool:
        """Export from `loop` (default: the running one; call from its thread) instead
        of the exporter thread: a task there takes the batches and sends them with
        `exporter.aio_export()` (services.common.otlp_aio), one at a time. Spans ended
        on other threads wake it through the loop. Until `stop_on_loop` (or the task
        ends with its loop) the thread is stopped. False (nothing changes) when the
        exporter has no aio export (or returns None) or the sink is shut down."""
        make = getattr(self.exporter, "aio_export", None)
        if make is None or self._shutdown or self._pump is not None:
            return False
        sender = make()
        if sender is None:
            return False
        loop = loop or asyncio.get_running_loop()
        self._stop_thread()
        event = asyncio.Event()
        owner = threading.get_ident()

        def notify() -> None:
            # From the buffer (C) or add(): never raises.
            if threading.get_ident() == owner:
                event.set()
            else:
                try:
                    loop.call_soon_threadsafe(event.set)
                except RuntimeError:  # the loop is closed: the done callback restarts the thread
                    pass

        self._notify = notify
        if self._buffer is not None:
            self._buffer.wake = notify
        self._pump = loop.create_task(self._run_pump(event, sender), name="OtelSpanSink")
        self._pump.add_done_callback(self._pump_done)
        return True

    async def stop_on_loop(self) -> None:
        """Hand the export back to a thread once the batch in flight is sent (what a
        service does before it shuts tracing down: nothing sent twice)."""
        pump = self._pump
        if pump is None or pump.done():
            return
        self._pump_stopping = True
        self._notify()
        await asyncio.wait([pump])

    def _stop_thread(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._halt.set()
            self._wake.set()
            thread.join()

    async def _run_pump(self, event: asyncio.Event, sender: Any) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        try:
            while self._pump is task and not self._pump_stopping and not self._shutdown:
                if self.queued() < self.max_export_batch_size:
                    timer = loop.call_later(self._delay, event.set)
                    await event.wait()
                    timer.cancel()
                    event.clear()
                sent = False
                while self._pump is task and not self._pump_stopping and not self._shutdown:
                    if not self._more_to_send(sent, everything=False):
                        break
                    # Not while another thread flushes (it holds the lock for its sends).
                    if not self._export_lock.acquire(blocking=False):
                        break
                    try:
                        batch = self._take()
                        self._inflight = batch
                        self._idle.clear()
                    finally:
                        self._export_lock.release()
                    sent = True
                    try:
                        await sender.export(batch)
                    except asyncio.CancelledError:
                        # Not known to be delivered: left in _inflight for the next
                        # flush (_reclaim) to send.
                        self._idle.set()
                        raise
                    except Exception:
                        log.exception("Exception while exporting spans.")
                    if self._inflight is batch:
                        self._inflight = None
                    self._idle.set()
        finally:
            if not self._shutdown:
                with contextlib.suppress(Exception):
                    await sender.close()

    def _pump_done(self, task: Any) -> None:
        """The pump ended (stop_on_loop, its loop closing, shutdown): the thread
        exports again, a batch left in flight first (_reclaim)."""
        if task is not self._pump:  # a forked child's copy of its parent's pump
            return
        self._pump = None
        self._pump_stopping = False
        if not self._shutdown:
            self._start_thread()

    def add(self, span: Any) -> None:
        """Queue an ended, sampled span (what ServerSpan.end calls)."""
        n = self.queued()
        if n >= self._limit:  # the queue's bound; 0 once shut down
            self._drop()
            return
        self._spans.append(span)
        if n + 1 == self.max_export_batch_size:
            self._notify()

    def queued(self) -> int:
        """Spans waiting for the exporter."""
        return len(self._spans) if self._buffer is None else len(self._spans) + len(self._buffer)

    def _drop(self) -> None:
        if not self.dropped and not self._shutdown:
            log.warning("span queue full (OTEL_BSP_MAX_QUEUE_SIZE=%d): dropping spans", self.max_queue_size)
        self.dropped += 1

    # SpanProcessor: SDK spans.
    def on_start(self, span: Any, parent_context: Any = None) -> None:
        pass

    def on_end(self, span: Any) -> None:
        if span.context.trace_flags.sampled:
            self.add(span)

    def _worker(self, halt: threading.Event) -> None:
        wake = self._wake
        while not self._shutdown and not halt.is_set():
            if self.queued() < self.max_export_batch_size:
                wake.wait(self._delay)
                wake.clear()
            if self._shutdown or halt.is_set():
                break
            self._export(everything=False)
        # shutdown() exports what is left once this thread is done.

    def _take(self) -> list[Any]:
        """Up to a batch of what is queued (under _export_lock): runs of written spans
        first (an EncodedSpan per recorder's run), then span objects."""
        spans = self._spans
        buffer = self._buffer
        batch_size = self.max_export_batch_size
        batch: list[Any] = []
        n = 0
        while buffer is not None and n < batch_size and (run := buffer.take(batch_size - n)) is not None:
            batch.append(run)
            n += run.spans
        objects = spans[: batch_size - n]
        del spans[: len(objects)]  # appends only go to the end: these are the same spans
        batch += objects
        return batch

    def _send(self, batch: list[Any]) -> None:
        token = attach(set_value(_SUPPRESS_INSTRUMENTATION_KEY, True))
        try:
            self.exporter.export(batch)
        except Exception:
            log.exception("Exception while exporting spans.")
        finally:
            detach(token)

    def _export(self, everything: bool) -> None:
        """Export what is queued in runs of up to the batch size (when not
        `everything`, stop once less than a batch is left unless nothing was sent)."""
        with self._export_lock:
            self._reclaim()
            sent = False
            while self._more_to_send(sent, everything):
                sent = True
                self._send(self._take())

    def _more_to_send(self, sent: bool, everything: bool) -> bool:
        """Whether an export cycle sends another batch: while anything is queued when
        sending `everything`, else while a full batch is (and once, whatever is
        queued, when nothing was `sent` yet)."""
        queued = self.queued()
        return bool(queued) and (everything or not sent or queued >= self.max_export_batch_size)

    def _reclaim(self) -> None:
        """Send here a batch that the loop took and cannot finish sending: its loop
        is not running, or is this thread's and waits for us (at-least-once: a batch
        the collector had already received arrives twice)."""
        batch = self._inflight
        if batch is None:
            return
        pump = self._pump
        if pump is not None and pump.get_loop().is_running() and not self._on_loop_thread():
            # The loop's send goes on: wait for it (bounded by the export timeout);
            # one cancelled leaves the batch here.
            self._idle.wait(self.export_timeout_millis / 1e3)
        if self._inflight is batch:
            self._inflight = None
            self._idle.set()
            self._send(batch)

    def _on_loop_thread(self) -> bool:
        """Whether this thread runs the loop that exports (run_on_loop)."""
        pump = self._pump
        try:
            return pump is not None and asyncio.get_running_loop() is pump.get_loop()
        except RuntimeError:
            return False

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        if self._shutdown:
            return False
        self._export(everything=True)
        return True

    def shutdown(self, timeout_millis: int = 30000) -> None:
        if self._shutdown:
            return
        deadline = time.monotonic() + timeout_millis / 1e3
        self._shutdown = True
        self._limit = 0
        if self._buffer is not None:
            self._buffer.limit = 0
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_millis / 1e3)
        pump = self._pump
        if pump is not None:
            # It sends no more (_shutdown); a batch it holds is sent below (_reclaim).
            if self._on_loop_thread():
                pump.cancel()
            else:
                with contextlib.suppress(RuntimeError):  # its loop is closed
                    pump.get_loop().call_soon_threadsafe(pump.cancel)
        self._export(everything=True)
        remaining = max(0.0, deadline - time.monotonic()) * 1e3
        try:
            self.exporter.shutdown(timeout_millis=remaining)
        except TypeError:  # an exporter whose shutdown takes no timeout
            self.exporter.shutdown()
