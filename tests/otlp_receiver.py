"""An in-process OTLP/gRPC trace receiver (opentelemetry-proto's TraceService): real
service processes export to it over loopback and tests read what arrived."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict = field(default_factory=dict)
    links: list[tuple[str, str]] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    user_agent: str = ""  # of the export request that brought it (the sender's gRPC stack)


def _value(v):  # an AnyValue as Python
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.request_sizes: list[int] = []  # spans per export request, in arrival order
        self._lock = threading.Lock()

    def Export(self, request, context):
        agent = dict(context.invocation_metadata()).get("user-agent", "")
        with self._lock:
            self.request_sizes.append(sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans))
        for rs in request.resource_spans:
            res = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    span = Span(
                        res.get("service.name", ""),
                        s.name,
                        s.trace_id.hex(),
                        s.span_id.hex(),
                        s.parent_span_id.hex(),
                        {a.key: _value(a.value) for a in s.attributes},
                        [(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
                        [e.name for e in s.events],
                        agent,
                    )
                    with self._lock:
                        self.spans.append(span)
        return trace_service_pb2.ExportTraceServiceResponse()

    def find(self, predicate: Callable[[Span], bool]) -> list[Span]:
        with self._lock:
            return [s for s in self.spans if predicate(s)]

    async def wait_for(self, predicate: Callable[[Span], bool], timeout: float = 60.0, count: int = 1) -> list[Span]:
        deadline = time.monotonic() + timeout
        while len(found := self.find(predicate)) < count:
            if time.monotonic() > deadline:
                names = sorted({(s.service, s.name) for s in self.find(lambda _s: True)})
                raise AssertionError(f"{count} matching span(s) not received in {timeout}s; received {names}")
            await asyncio.sleep(0.05)
        return found


@contextlib.contextmanager
def otlp_receiver(receiver: Receiver | None = None) -> Iterator[tuple[Receiver, str]]:
    """A started receiver (`receiver`, default a plain one) and its endpoint
    (http://127.0.0.1:PORT, OTLP/gRPC)."""
    receiver = Receiver() if receiver is None else receiver
    server = grpc.server(futures.ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield receiver, f"http://127.0.0.1:{port}"
    finally:
        server.stop(0)


def export_env(endpoint: str, **extra: str) -> dict[str, str]:
    """OTEL_* variables that make a service export every span to `endpoint` promptly."""
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_TRACES_SAMPLER": "parentbased_always_on",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
        **extra,
    }
