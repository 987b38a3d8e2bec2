"""OpenTelemetry wiring: one tracer provider per process, configured by OTEL_* vars.

Export is off unless OTEL_TRACES_EXPORTER or an OTLP endpoint variable is set; the
tracer and propagation work either way, so trace context always crosses every hop.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

log = logging.getLogger(__name__)
_configured = False


def _export_requested(env: Mapping[str, str]) -> str | None:
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter and exporter != "none":
        return exporter
    if env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return "otlp"
    return None


def setup_tracing(service_name: str, env: Mapping[str, str] | None = None) -> trace.Tracer:
    """Install the process's tracer provider once and return a tracer for `service_name`.

    `env` defaults to the process environment: the standard OTEL_* variables are the
    configuration surface, read here once at start-up.
    """
    global _configured
    env = os.environ if env is None else env
    if not _configured:
        resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME", service_name)})
        provider = TracerProvider(resource=resource)
        exporter = _export_requested(env)
        if exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        elif exporter == "console":
            import sys

            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            # stderr: stdout carries the services' JSON event lines.
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
        elif exporter:
            log.warning("OTEL_TRACES_EXPORTER=%s is not supported; traces are not exported", exporter)
        trace.set_tracer_provider(provider)
        _configured = True
    return trace.get_tracer(service_name)


def server_interceptors() -> list:
    """The tracing interceptor for grpc.aio servers (continues incoming traceparent)."""
    from opentelemetry.instrumentation.grpc import aio_server_interceptor
    from opentelemetry.instrumentation.grpc.filters import negate, service_name

    # Health probes are noise in traces, and the instrumentation assumes every streaming
    # handler is an async generator, which health's Watch (a coroutine) is not.
    return [aio_server_interceptor(filter_=negate(service_name("grpc.health.v1.Health")))]


def client_interceptors() -> list:
    """Tracing interceptors for grpc.aio channels (sends traceparent in metadata)."""
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors())


def inject_headers(carrier: dict[str, str] | None = None) -> dict[str, str]:
    """W3C trace context of the current span, as headers or gRPC metadata."""
    carrier = {} if carrier is None else carrier
    propagate.inject(carrier)
    return carrier


def extract_context(headers: Mapping[str, str]):
    """The trace context carried by incoming HTTP headers."""
    return propagate.extract(dict(headers))


def shutdown_tracing() -> None:
    provider = trace.get_tracer_provider()
    shutdown = getattr(provider, "shutdown", None)
    if shutdown is not None:
        shutdown()
