"""SGLang-compatible `/generate`, `/health` and `/get_model_info`, forwarded to
InferenceService over gRPC; `/generate` also answers vLLM's dialect (a body with
`prompt` and neither `text` nor `input_ids`: vllm_api/). The W3C trace context of the
HTTP request is continued: the gateway's span is its child and the gRPC client
interceptor carries it on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from services.common.errors import InvalidArgument, Unavailable
from services.gateway.generation.pool import NO_INFERENCE, InferencePool, prefetch
from services.gateway.generation.sglang_api.protocol import GenerateCall, parse_generate
from services.gateway.generation.sglang_api.serving import encode_prompts, render, stream
from services.gateway.generation.vllm_api import protocol as vllm_protocol
from services.gateway.generation.vllm_api import serving as vllm_serving
from services.gateway.http.errors import error_response
from services.gateway.http.request_span import RequestSpan

log = logging.getLogger(__name__)

# How long /health waits for a target that has not reported its health yet.
HEALTH_PROBE_SECONDS = 2.0


def generate_router(inference: InferencePool) -> APIRouter:
    router = APIRouter()
    warned_no_tokenizer = False

    async def tokenizer_for(call: GenerateCall) -> Any:
        """The tokenizer; prompts given as ids still work (with empty text) without one."""
        nonlocal warned_no_tokenizer
        needs_text_in = any(p.input_ids is None for p in call.prompts)
        try:
            return await inference.tokenizer()
        except Unavailable as exc:
            if needs_text_in:
                raise
            if not warned_no_tokenizer:
                log.warning("%s; /generate answers output_ids with empty text", exc)
                warned_no_tokenizer = True
            return None

    @router.post("/generate", response_model=None)
    async def generate(request: Request) -> Response:
        if not inference.configured:
            raise Unavailable(NO_INFERENCE)
        try:
            body = json.loads(await request.body())
        except ValueError as exc:
            raise InvalidArgument(f"the body is not valid JSON: {exc}") from None
        if vllm_protocol.is_vllm_body(body):
            return await vllm_serving.generate(inference, body, request.headers)
        call = parse_generate(body)
        started = time.perf_counter()
        with RequestSpan("POST /generate", request.headers) as span:
            tokenizer = await tokenizer_for(call)
            if tokenizer is not None:
                await inference.in_tokenizer_thread(encode_prompts, tokenizer, call)
            if call.stream:
                # The first message arrives before the 200 goes out (errors keep their
                # status); the stream carries the span on and ends it.
                requests = [call.request(i) for i in range(len(call.prompts))]
                messages = await prefetch(inference.generate_many(requests, span.context()))
                return StreamingResponse(
                    stream(inference, call, messages, tokenizer, span.hand_off()), media_type="text/event-stream"
                )
            results = await asyncio.gather(*(inference.collect(call.request(i)) for i in range(len(call.prompts))))
            rendered = await inference.in_tokenizer_thread(
                render, tokenizer, call, results, time.perf_counter() - started
            )
        return JSONResponse(rendered[0] if call.single else rendered)

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
