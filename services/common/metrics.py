"""Prometheus text over HTTP for services whose own port speaks gRPC (inference, trainer).

`serve_metrics` runs prometheus-client's own HTTP server (a thread, so a scrape never
waits on the service's event loop) on the service's configured host only, with the
service's own registry: `/metrics` (any path) answers the text exposition format.
A settings field `metrics_port` turns it on: 0 leaves it off, and the port bound is
announced in the service's ready line. The gateway serves `/metrics` on its HTTP port
instead.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

log = logging.getLogger(__name__)

METRICS_PORT_DESCRIPTION = (
    "Port of the Prometheus /metrics endpoint, bound on --host; 0 leaves it off "
    "(`clotho up` picks a free one). The bound port is in the ready line."
)


@dataclass
class MetricsEndpoint:
    """A running metrics HTTP server; `close()` stops it."""

    host: str
    port: int
    server: WSGIServer
    thread: threading.Thread

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve_metrics(host: str, port: int, registry: CollectorRegistry) -> MetricsEndpoint:
    """Serve `registry` on host:port (port 0 picks a free one) from a daemon thread."""
    server, thread = start_http_server(port, addr=host, registry=registry)
    bound = int(server.server_port)
    log.info("Prometheus metrics on http://%s:%d/metrics", host, bound)
    return MetricsEndpoint(host=host, port=bound, server=server, thread=thread)


__all__ = ["METRICS_PORT_DESCRIPTION", "MetricsEndpoint", "serve_metrics"]
