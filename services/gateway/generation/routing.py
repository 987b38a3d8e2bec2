"""Which InferenceService target takes the next call: the least loaded healthy one.

Load is the number of calls this gateway has in flight to a target; ties go round
robin, so an idle mesh still spreads its work. Health has two sources:

- each target's `grpc.health.v1` Watch stream: NOT_SERVING (a shard that is resyncing
  its weights, or shutting down) takes the target out at once and SERVING brings it
  back; a broken stream counts as unreachable and is re-opened with backoff (the
  re-probe that notices a restarted target). A server that cannot serve Watch is
  polled with Check instead;
- a liveness probe: a health Check every `probe_seconds` with a `probe_timeout_seconds`
  deadline, beside the Watch stream. A process that is frozen (SIGSTOP, a wedged event
  loop) keeps its TCP connection and its Watch stream silent; the probe's deadline
  notices it, takes the target out and sets its `lost` event, which cancels the calls
  in flight to it (pool.py retries them elsewhere when nothing was streamed yet). The
  first answer after that brings it back;
- failures: a call that ends UNAVAILABLE ejects its target for `eject_seconds`, after
  which it is tried again even if it has no health service to say so.

When no target is healthy, `acquire` raises Unavailable naming every target and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import propagate, trace

from clotho.client import bearer_metadata
from clotho.v1 import inference_service_pb2_grpc as pb_grpc
from services.common import client_span, telemetry
from services.common.access import Access
from services.common.errors import Unavailable
from services.common.server import GRPC_OPTIONS

log = logging.getLogger(__name__)

SERVICE_NAME = "clotho.v1.InferenceService"
# gRPC's own reconnect backoff grows to minutes; a restarted target should be back
# within seconds.
_CHANNEL_OPTIONS = [
    *GRPC_OPTIONS,
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
_TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def open_channel(address: str, access: Access | None = None) -> aio.Channel:
    """A channel to one InferenceService target, presenting `access`'s service token (and
    TLS when it has a CA), with quick reconnects.

    The channel has no interceptors: a grpc.aio interceptor wraps every call and every
    message of its stream in Python (a fifth of the gateway's gRPC cost of a tiny
    /generate). Calls on it carry the token and the trace context themselves
    (`call_metadata`, `Target.call`), and make their client span while tracing is on."""
    access = access or Access()
    credentials = access.channel_credentials()
    if credentials is not None:
        return aio.secure_channel(address, credentials, options=_CHANNEL_OPTIONS)
    return aio.insecure_channel(address, options=_CHANNEL_OPTIONS)


def call_metadata(access: Access | None = None) -> tuple[tuple[str, str], ...] | None:
    """What every call on `open_channel(address, access)`'s channel sends itself: the
    service token (if any)."""
    return bearer_metadata((access or Access()).token)


@dataclass
class Target:
    """One InferenceService address and what the router knows about it."""

    address: str
    channel: Any = None
    stub: Any = None
    in_flight: int = 0
    # From the health stream: True SERVING, False NOT_SERVING or unreachable, None unknown
    # (no stream yet, or the target has no health service).
    serving: bool | None = None
    health_reason: str = ""
    ejected_until: float = 0.0
    eject_reason: str = ""
    # From the liveness probe: why the target stopped answering ("" while it answers).
    unresponsive: str = ""
    # Set while the target is unresponsive or unreachable: calls in flight to it give up.
    lost: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    watcher: asyncio.Task | None = field(default=None, repr=False)
    prober: asyncio.Task | None = field(default=None, repr=False)
    # Metadata every call sends itself (the token), on a channel without interceptors;
    # None: the channel's interceptors send what calls need.
    metadata: tuple[tuple[str, str], ...] | None = field(default=None, repr=False)

    def healthy(self, now: float) -> bool:
        return self.serving is not False and not self.unresponsive and now >= self.ejected_until

    @property
    def why_lost(self) -> str:
        return self.unresponsive or self.health_reason or "lost"

    def call_kwargs(self, timeout: float | None) -> dict[str, Any]:
        """A call's keyword arguments: its timeout and, on a channel without
        interceptors, `metadata` and the current trace context where there is one (a
        caller's traceparent, passed on as the tracing interceptor passes it with
        tracing off)."""
        kwargs: dict[str, Any] = {"timeout": timeout}
        if self.metadata is None:
            return kwargs
        metadata = self.metadata
        if trace.get_current_span().get_span_context().is_valid:
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            metadata = (*metadata, *carrier.items())
        if metadata:
            kwargs["metadata"] = metadata
        return kwargs

    def call(self, method: str, fn: Callable[..., Any], request: Any, timeout: float | None) -> Any:
        """`fn(request, ...)` (a stub's `method`) with the token and the trace context as
        metadata and, while tracing is on, its CLIENT span (as the tracing interceptor
        made it), ended when the call is done."""
        if not telemetry.enabled or self.metadata is None:
            return fn(request, **self.call_kwargs(timeout))
        span, carried = client_span.start_call(method)
        metadata = (*self.metadata, *carried)
        try:
            call = fn(request, timeout=timeout, metadata=metadata or None)
        except BaseException as exc:
            if span is not None:
                client_span.fail_call(span, exc)
            raise
        if span is not None:
            client_span.end_call(span, call)
        return call


class Router:
    """Least-loaded choice over targets with health tracking. Channels and health
    watchers start on first use, on the running loop."""

    def __init__(
        self,
        addresses: Iterable[str],
        eject_seconds: float = 5.0,
        watch_health: bool = True,
        channel_factory: Callable[[str], Any] = open_channel,
        metadata_factory: Callable[[], tuple[tuple[str, str], ...] | None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
        max_backoff_seconds: float = 2.0,
        probe_seconds: float = 1.0,
        probe_timeout_seconds: float = 5.0,
    ) -> None:
        self.targets = [Target(address=a) for a in addresses]
        self.eject_seconds = eject_seconds
        self.watch_health = watch_health
        self.max_backoff_seconds = max_backoff_seconds
        self.probe_seconds = probe_seconds
        self.probe_timeout_seconds = probe_timeout_seconds
        self._channel_factory = channel_factory
        self._metadata_factory = metadata_factory
        self._clock = clock
        self._turn = itertools.count()
        self._started = False

    def _start(self) -> None:
        if self._started:
            return
        self._started = True
        for target in self.targets:
            target.channel = self._channel_factory(target.address)
            target.metadata = self._metadata_factory()
            target.stub = pb_grpc.InferenceServiceStub(target.channel)
            if self.watch_health:
                target.watcher = asyncio.create_task(self._watch(target), name=f"health {target.address}")
                target.prober = asyncio.create_task(self._probe(target), name=f"liveness {target.address}")

    def acquire(self, exclude: Iterable[Target] = ()) -> Target:
        """The least loaded healthy target (round robin among equals), its in-flight
        count raised; pair with release()."""
        self._start()
        now = self._clock()
        skip = {id(t) for t in exclude}
        healthy = [t for t in self.targets if t.healthy(now) and id(t) not in skip]
        if not healthy:
            raise Unavailable(self.describe_unhealthy(now))
        least = min(t.in_flight for t in healthy)
        tied = [t for t in healthy if t.in_flight == least]
        chosen = tied[next(self._turn) % len(tied)]
        chosen.in_flight += 1
        return chosen

    def release(self, target: Target) -> None:
        target.in_flight -= 1

    def failed(self, target: Target, reason: str) -> None:
        """Eject a target whose call ended UNAVAILABLE; it is tried again after the
        cool-down, or as soon as its health turns SERVING again after being lost."""
        if target.healthy(self._clock()):
            log.warning("inference target %s ejected for %.1fs: %s", target.address, self.eject_seconds, reason)
        target.ejected_until = self._clock() + self.eject_seconds
        target.eject_reason = reason

    def describe_unhealthy(self, now: float | None = None) -> str:
        now = self._clock() if now is None else now
        parts = []
        for t in self.targets:
            if t.unresponsive:
                why = t.unresponsive
            elif t.serving is False:
                why = t.health_reason or "not serving"
            elif now < t.ejected_until:
                why = f"ejected for {t.ejected_until - now:.1f}s more after: {t.eject_reason}"
            else:
                why = "healthy"
            parts.append(f"{t.address} ({why})")
        return f"no healthy inference service: {'; '.join(parts)}"

    def status(self) -> list[dict[str, Any]]:
        now = self._clock()
        return [
            {
                "target": t.address,
                "healthy": t.healthy(now),
                "in_flight": t.in_flight,
                "reason": "" if t.healthy(now) else self._reason(t),
            }
            for t in self.targets
        ]

    @staticmethod
    def _reason(t: Target) -> str:
        if t.unresponsive:
            return t.unresponsive
        return t.health_reason if t.serving is False else t.eject_reason

    def any_known_serving(self) -> bool:
        """Whether some target is healthy and its health service said SERVING (what
        `/health` answers from without calling anyone)."""
        self._start()
        now = self._clock()
        return any(t.serving is True and t.healthy(now) for t in self.targets)

    async def _probe(self, target: Target) -> None:
        """Liveness: a Check under a deadline every `probe_seconds`. Only a deadline
        that passes marks the target unresponsive (a refused connection is the Watch
        stream's to report); any answer at all clears it."""
        stub = health_pb2_grpc.HealthStub(target.channel)
        request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        while True:
            try:
                await stub.Check(request, timeout=self.probe_timeout_seconds, metadata=target.metadata or None)
                self._set_unresponsive(target, "")
            except aio.AioRpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    self._set_unresponsive(
                        target, f"unresponsive: no health answer within {self.probe_timeout_seconds:g}s"
                    )
                elif code != grpc.StatusCode.UNAVAILABLE:
                    # Answered, if only to say it has no health service: alive.
                    self._set_unresponsive(target, "")
            await asyncio.sleep(self.probe_seconds)

    def _set_unresponsive(self, target: Target, reason: str) -> None:
        if reason and not target.unresponsive:
            log.warning("inference target %s is unhealthy: %s", target.address, reason)
        elif not reason and target.unresponsive:
            log.info("inference target %s answers again", target.address)
        target.unresponsive = reason
        self._update_lost(target)

    @staticmethod
    def _update_lost(target: Target) -> None:
        # NOT_SERVING alone (a resync, a drain) lets the calls in flight finish.
        if target.unresponsive or (target.serving is False and target.health_reason.startswith("unreachable")):
            target.lost.set()
        else:
            target.lost.clear()

    async def _watch(self, target: Target) -> None:
        """Follow the target's health: the Watch stream where it works, else a Check
        every `probe_seconds` (a server whose interceptors cannot carry Watch answers
        it with an error other than UNAVAILABLE)."""
        backoff = 0.1
        stub = health_pb2_grpc.HealthStub(target.channel)
        request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        use_watch = True
        while True:
            try:
                if use_watch:
                    call = stub.Watch(request, metadata=target.metadata or None)
                    try:
                        async for response in call:
                            self._on_status(target, response.status)
                            backoff = 0.1
                    finally:
                        call.cancel()
                    self._set(target, False, "health stream ended")
                else:
                    response = await stub.Check(request, timeout=self.probe_seconds, metadata=target.metadata or None)
                    self._on_status(target, response.status)
                    backoff = 0.1
                    await asyncio.sleep(self.probe_seconds)
                    continue
            except aio.AioRpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.UNIMPLEMENTED:
                    # No health service: failures alone decide.
                    self._set(target, None, "")
                    log.info(
                        "inference target %s has no grpc.health service; ejecting on failures only", target.address
                    )
                    return
                if code == grpc.StatusCode.NOT_FOUND:
                    # Check on a server that does not know the service name.
                    self._set(target, None, "")
                elif use_watch and code not in _TRANSIENT:
                    log.info(
                        "health Watch on %s failed (%s); polling Check every %.1fs instead",
                        target.address,
                        code.name,
                        self.probe_seconds,
                    )
                    use_watch = False
                    continue
                else:
                    self._set(target, False, f"unreachable: {exc.details() or code.name}")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff_seconds)

    def _on_status(self, target: Target, status: int) -> None:
        if status == _SERVING:
            if target.serving is not True:
                # Coming (back) to SERVING ends a failure ejection early: the target
                # restarted or reconnected. A SERVING that merely repeats (Check polls)
                # leaves an ejection for a failure the health service did not see.
                target.ejected_until = 0.0
            self._set(target, True, "")
        elif status == _NOT_SERVING:
            self._set(target, False, "health: NOT_SERVING")
        else:
            # UNKNOWN / SERVICE_UNKNOWN: nothing to go by; failures decide.
            self._set(target, None, "")

    def _set(self, target: Target, serving: bool | None, reason: str) -> None:
        if serving is False and target.serving is not False:
            log.warning("inference target %s is unhealthy: %s", target.address, reason)
        elif serving is True and target.serving is False:
            log.info("inference target %s is healthy again", target.address)
        target.serving = serving
        target.health_reason = reason
        self._update_lost(target)

    async def close(self) -> None:
        for target in self.targets:
            for task in (target.watcher, target.prober):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            target.watcher = target.prober = None
            if target.channel is not None:
                await target.channel.close()
                target.channel = target.stub = None
        self._started = False
