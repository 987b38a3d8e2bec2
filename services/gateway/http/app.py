"""The gateway's HTTP app: Atropos' trajectory API (atropos_api/), SGLang's and
vLLM's `/generate` (generation/sglang_api/, generation/vllm_api/), the OpenAI routes
(generation/openai_api/) and Prometheus `/metrics`, behind one error table
(errors.py), CORS, the precompressed gzip of /batch and the request-body middleware
(body.py), whose fast entry answers the ingest routes without the framework's
layers (`GatewayApp`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response

from services.common import telemetry
from services.gateway.atropos_api.batch_gzip import BatchCompressor, PrecompressedGZipMiddleware, ResponseGzip
from services.gateway.atropos_api.routes import add_atropos_routes
from services.gateway.generation.openai_api.api_router import openai_router
from services.gateway.generation.pool import InferencePool
from services.gateway.generation.sglang_api.api_router import generate_fast_route, generate_router
from services.gateway.http import errors as http_errors
from services.gateway.http.body import FastRoute, RequestBodyMiddleware
from services.gateway.http.metrics import RouteLatency, metrics_response
from services.gateway.http.openapi_doc import install_openapi
from services.gateway.http.request_span import http_spans, traced_request
from services.gateway.trajectory.durable import DurableState
from services.gateway.trajectory.state import TrajectoryState

log = logging.getLogger(__name__)


# Prometheus scrapes are noise in traces.
UNTRACED_PATHS = frozenset({"/metrics"})


class GatewayApp(FastAPI):
    """FastAPI with a short way in for the ingest routes.

    `/scored_data`, `/scored_data_list`, `/batch` and a non-streamed `/generate` are
    answered by RequestBodyMiddleware's fast routes; reaching them through the framework's layers (telemetry, error
    middleware, body limits) costs a tenth of an ingest. Requests for those paths
    enter here through the same middlewares that run before RequestBodyMiddleware in
    the full stack (the bearer-token check, when installed) and RequestBodyMiddleware
    itself; whatever it does not answer (cross-origin posts) continues through the
    full stack.
    """

    fast_paths: frozenset[tuple[str, str]] = frozenset()
    _fast_entry: Any = None
    # Per-route request latency for /metrics; None measures nothing.
    latency: RouteLatency | None = None
    # request_span.http_spans(), once tracing is on.
    _spans: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self._dispatch(scope, receive, send)
            return
        latency = self.latency
        start = time.perf_counter()
        try:
            if not telemetry.enabled or scope["path"] in UNTRACED_PATHS:
                await self._dispatch(scope, receive, send)
            else:
                # The request's server span, inline (request_span.http_spans).
                spans = self._spans
                if spans is None:
                    spans = self._spans = http_spans()
                span, traced_send, token = spans.begin(scope, send)
                if span is None:
                    await traced_request(self._dispatch, scope, receive, send)
                    return
                try:
                    await self._dispatch(scope, receive, traced_send)
                except BaseException as exc:
                    spans.end(span, traced_send, scope, token, exc)
                    raise
                spans.end(span, traced_send, scope, token, None)
        finally:
            if latency is not None:
                latency.observe(scope, time.perf_counter() - start)

    async def _dispatch(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and (scope["method"], scope["path"]) in self.fast_paths:
            entry = self._fast_entry
            if entry is None:
                entry = self._fast_entry = self._build_fast_entry()
            await entry(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    def _build_fast_entry(self) -> Any:
        full = super().__call__
        # user_middleware runs outermost first; keep everything up to and including
        # RequestBodyMiddleware, applied around the full stack.
        outer = []
        for middleware in self.user_middleware:
            outer.append(middleware)
            factory: object = middleware.cls
            if factory is RequestBodyMiddleware:
                break
        else:
            return full
        entry: Any = full
        for middleware in reversed(outer):
            entry = middleware.cls(entry, *middleware.args, **middleware.kwargs)
        return entry


def create_app(
    state: TrajectoryState, inference: InferencePool, max_body_bytes: int, response_gzip: ResponseGzip = "auto"
) -> FastAPI:
    # FastAPI's own telemetry (server span, operation spans, metrics, logs) is off:
    # GatewayApp makes one server span per request while tracing is on
    # (request_span.traced_request), and /metrics has the per-route latency.
    app = GatewayApp(
        title="Clotho gateway (AtroposLib API)",
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    http_errors.install(app)
    # Starlette runs the last added middleware first: RequestBodyMiddleware, added at
    # the end, bounds and inflates bodies before anything else reads them.
    app.add_middleware(
        CORSMiddleware, allow_origins=["*"], allow_credentials=True, allow_methods=["*"], allow_headers=["*"]
    )
    compressor = BatchCompressor(compresslevel=1, minimum_size=1000, policy=response_gzip)
    # mypy cannot match a constructor taking **kwargs: Any against Starlette's ParamSpec factory.
    app.add_middleware(PrecompressedGZipMiddleware, compressor=compressor)  # type: ignore[arg-type]

    fast_routes: dict[tuple[str, str], FastRoute] = dict(add_atropos_routes(app, DurableState(state), compressor))
    fast_routes["POST", "/generate"] = generate_fast_route(inference, compressor)

    latency = RouteLatency()

    @app.get("/metrics")
    async def metrics() -> Response:
        return metrics_response(state, latency)

    app.add_middleware(RequestBodyMiddleware, max_bytes=max_body_bytes, fast_routes=fast_routes)
    app.fast_paths = frozenset(fast_routes)

    app.include_router(generate_router(inference))
    app.include_router(openai_router(inference))
    # The fast routes' paths too: an included router's routes (/generate) are not
    # app.routes' own, and a fast route's request never meets the router.
    latency.set_routes([*(getattr(route, "path", "") for route in app.routes), *(path for _, path in fast_routes)])
    app.latency = latency
    install_openapi(app)
    return app
