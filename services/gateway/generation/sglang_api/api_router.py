"""SGLang-compatible `/generate`, `/health` and `/get_model_info`, forwarded to
InferenceService over gRPC; `/generate` also answers vLLM's dialect (a body with
`prompt` and neither `text` nor `input_ids`: vllm_api/). The W3C trace context of the
HTTP request is continued: the gateway's span is its child and the gRPC client
interceptor carries it on.

A non-streamed SGLang `/generate` (what environments send on every group) is also
answered on the request-body middleware's fast entry (`generate_fast_route`, see
http/body.py), without the framework's layers: the same handler, the same answer
bytes and headers (the `Vary` that CORS and the gzip middleware add), the same
errors. Streams, vLLM's dialect, cross-origin calls and answers the gzip
middleware would compress take the full stack.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from collections.abc import Mapping
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import Headers
from starlette.types import Scope

from services.common.errors import InvalidArgument, Unavailable
from services.gateway.atropos_api.batch_gzip import BatchCompressor, wants_gzip
from services.gateway.generation.pool import NO_INFERENCE, InferencePool, prefetch
from services.gateway.generation.sglang_api.protocol import GenerateCall, parse_generate
from services.gateway.generation.sglang_api.serving import encode_prompts, render, stream
from services.gateway.generation.vllm_api import protocol as vllm_protocol
from services.gateway.generation.vllm_api import serving as vllm_serving
from services.gateway.http.body import FastRoute
from services.gateway.http.errors import error_response
from services.gateway.http.json_guard import body_problem
from services.gateway.http.request_span import RequestSpan

log = logging.getLogger(__name__)

# How long /health waits for a target that has not reported its health yet.
HEALTH_PROBE_SECONDS = 2.0


def _json_body(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise InvalidArgument(f"the body is not valid JSON: {exc}") from None


def _render_json(content: Any) -> bytes:
    """The answer's JSON: compact UTF-8 as JSONResponse writes it, by orjson (a tenth
    of the cost; numbers keep their values, very small ones may be spelled 1e-7 for
    1e-07)."""
    return orjson.dumps(content)


class _Generate:
    """SGLang's /generate, shared by the route and its fast entry."""

    def __init__(self, inference: InferencePool) -> None:
        self.inference = inference
        self.warned_no_tokenizer = False

    async def tokenizer_for(self, call: GenerateCall) -> Any:
        """The tokenizer; prompts given as ids still work (with empty text) without one."""
        needs_text_in = any(p.input_ids is None for p in call.prompts)
        try:
            return await self.inference.tokenizer()
        except Unavailable as exc:
            if needs_text_in:
                raise
            if not self.warned_no_tokenizer:
                log.warning("%s; /generate answers output_ids with empty text", exc)
                self.warned_no_tokenizer = True
            return None

    async def answer(self, call: GenerateCall, headers: Mapping[str, str]) -> Any:
        """The JSON answer to `call`, or a StreamingResponse for a streamed one."""
        inference = self.inference
        started = time.perf_counter()
        with RequestSpan("POST /generate", headers) as span:
            tokenizer = await self.tokenizer_for(call)
            if tokenizer is not None and any(p.input_ids is None for p in call.prompts):
                await inference.in_tokenizer_thread(encode_prompts, tokenizer, call)
            if call.stream:
                # The first message arrives before the 200 goes out (errors keep their
                # status); the stream carries the span on and ends it.
                requests = [call.request(i) for i in range(len(call.prompts))]
                messages = await prefetch(inference.generate_many(requests, span.context()))
                return StreamingResponse(
                    stream(inference, call, messages, tokenizer, span.hand_off()), media_type="text/event-stream"
                )
            if len(call.prompts) == 1:
                results = [await inference.collect(call.request(0))]
            else:
                results = await asyncio.gather(*(inference.collect(call.request(i)) for i in range(len(call.prompts))))
            rendered = await inference.in_tokenizer_thread(
                render, tokenizer, call, results, time.perf_counter() - started
            )
        return rendered[0] if call.single else rendered


# One handler per pool, shared by the route and its fast entry.
_handlers: weakref.WeakKeyDictionary[InferencePool, _Generate] = weakref.WeakKeyDictionary()


def _handler(inference: InferencePool) -> _Generate:
    handler = _handlers.get(inference)
    if handler is None:
        handler = _handlers[inference] = _Generate(inference)
    return handler


def generate_fast_route(inference: InferencePool, compressor: BatchCompressor) -> FastRoute:
    """The fast entry of `/generate` (http/body.py): a non-streamed SGLang call answered
    as the route answers it; None (take the full stack) for anything else."""
    handler = _handler(inference)
    # What the full stack adds to a same-origin answer: CORS's Vary, and the gzip
    # middleware's (which leaves a loopback answer plain) on a body of its minimum size.
    vary = [(b"vary", b"Origin")]
    vary_large = [(b"vary", b"Origin, Accept-Encoding")]

    async def fast(raw: bytes, scope: Scope) -> tuple[bytes, list[tuple[bytes, bytes]]] | None:
        if wants_gzip(scope, compressor.policy):
            return None
        # What the body middleware refuses before any route reads a body; raising
        # lets the fast entry name the field.
        if raw and body_problem(raw) is not None:
            raise InvalidArgument("the body is not acceptable JSON")
        if not inference.configured:
            raise Unavailable(NO_INFERENCE)
        body = _json_body(raw)
        if vllm_protocol.is_vllm_body(body):
            return None
        call = parse_generate(body)
        if call.stream:
            return None
        data = _render_json(await handler.answer(call, Headers(scope=scope)))
        return data, vary_large if len(data) >= compressor.minimum_size else vary

    return fast


def generate_router(inference: InferencePool) -> APIRouter:
    router = APIRouter()
    handler = _handler(inference)

    @router.post("/generate", response_model=None)
    async def generate(request: Request) -> Response:
        if not inference.configured:
            raise Unavailable(NO_INFERENCE)
        body = _json_body(await request.body())
        if vllm_protocol.is_vllm_body(body):
            return await vllm_serving.generate(inference, body, request.headers)
        answer = await handler.answer(parse_generate(body), request.headers)
        if isinstance(answer, Response):
            return answer
        return Response(_render_json(answer), media_type="application/json")

    @router.get("/health")
    async def health() -> Response:
        """200 while a target is healthy (SGLang's probe reads only the status); the
        body lists every target's health and load for operators. Answered from what the
        router's health watchers know, without waiting on any engine; only while no
        target has said SERVING yet (just started) does it ask one, under
        HEALTH_PROBE_SECONDS."""
        if not inference.configured:
            return error_response(Unavailable.code, NO_INFERENCE)
        if not inference.router.any_known_serving():
            await inference.model_info(refresh=True, timeout=HEALTH_PROBE_SECONDS)
        return JSONResponse({"targets": inference.router.status()})

    @router.get("/get_model_info")
    async def get_model_info() -> dict:
        if not inference.configured:
            raise Unavailable(NO_INFERENCE)
        info = await inference.model_info()
        return {
            "model_path": info.model_path,
            # The served name, never the gateway's own tokenizer directory.
            "tokenizer_path": info.model_path,
            "is_generation": True,
            "model_name": info.model_name,
            "max_context_len": info.max_context_len,
            "eos_token_id": info.eos_token_id,
            "engine": info.engine,
            "shard_count": info.shard_count,
        }

    return router
