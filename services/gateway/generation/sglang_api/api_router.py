"""SGLang-compatible `/generate`, `/health` and `/get_model_info`, forwarded to
InferenceService over gRPC; `/generate` also answers vLLM's dialect (a body with
`prompt` and neither `text` nor `input_ids`: vllm.py). The W3C trace context of the
HTTP request is continued: the gateway's span is its child and the gRPC client
interceptor carries it on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from grpc import aio
from opentelemetry import trace

from services.common.errors import ClothoError, InvalidArgument, Unavailable
from services.gateway.generation.vllm_api import protocol as vllm
from services.gateway.http.errors import error_response
from services.gateway.generation.pool import NO_INFERENCE, InferencePool, prefetch
from services.gateway.http.request_span import RequestSpan
from services.gateway.http.sse import DONE, sse_event
from services.gateway.generation.sglang_api.protocol import GenerateCall, Prompt, parse_generate, result_json, result_rid, top_entries

log = logging.getLogger(__name__)


def _encode_prompts(tokenizer: Any, call: GenerateCall) -> None:
    for prompt in call.prompts:
        if prompt.input_ids is None:
            prompt.input_ids = list(tokenizer.encode(prompt.text))
            if not prompt.input_ids:
                raise InvalidArgument("text encodes to no tokens")


class _TokenTexts:
    """Each token id's text, decoded alone (SGLang's `return_text_in_logprobs`), once
    per call: top logprobs name the same few ids over and over. Tokenizer thread only."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self._tokenizer.decode([token_id])
        return text


def _token_texts(tokenizer: Any, call: GenerateCall) -> _TokenTexts | None:
    return _TokenTexts(tokenizer) if call.return_text_in_logprobs and tokenizer is not None else None


def _decode(
    tokenizer: Any, prompt: Prompt, ids: list[int], texts: _TokenTexts | None
) -> tuple[str, list[str] | None]:
    """The text of `ids`, and each token's own text when `texts` is given."""
    if tokenizer is None:
        return "", None
    text = tokenizer.decode(ids, skip_special_tokens=prompt.skip_special_tokens)
    pieces = [texts(t) for t in ids] if texts is not None else None
    return text, pieces


def _prompt_pieces(texts: _TokenTexts | None, prompt: Prompt) -> list[str] | None:
    if texts is None or prompt.input_ids is None or not prompt.prompt_logprobs:
        return None
    return [texts(t) for t in prompt.input_ids]


def _render(tokenizer: Any, call: GenerateCall, results: list[list[Any]], latency: float) -> list[dict[str, Any]]:
    """All result objects, prompt-major then sample (runs in a thread: decoding)."""
    out = []
    texts = _token_texts(tokenizer, call)
    for prompt, completions in zip(call.prompts, results):
        prompt_pieces = _prompt_pieces(texts, prompt)
        for k, completion in enumerate(completions):
            text, pieces = _decode(
                tokenizer, prompt, list(completion.output_ids), texts if prompt.return_logprob else None
            )
            out.append(
                result_json(prompt, completion, text, result_rid(prompt, k), pieces, prompt_pieces, latency, texts)
            )
    return out


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
        if vllm.is_vllm_body(body):
            return await vllm.generate(inference, body, request.headers)
        call = parse_generate(body)
        started = time.perf_counter()
        with RequestSpan("POST /generate", request.headers) as span:
            tokenizer = await tokenizer_for(call)
            if tokenizer is not None:
                await inference.in_tokenizer_thread(_encode_prompts, tokenizer, call)
            if call.stream:
                # The first message arrives before the 200 goes out (errors keep their
                # status); the stream carries the span on and ends it.
                requests = [call.request(i) for i in range(len(call.prompts))]
                messages = await prefetch(inference.generate_many(requests, span.context()))
                return StreamingResponse(
                    _stream(inference, call, messages, tokenizer, span.hand_off()), media_type="text/event-stream"
                )
            results = await asyncio.gather(*(inference.collect(call.request(i)) for i in range(len(call.prompts))))
            rendered = await inference.in_tokenizer_thread(
                _render, tokenizer, call, results, time.perf_counter() - started
            )
        return JSONResponse(rendered[0] if call.single else rendered)

    @router.get("/health")
    async def health() -> Response:
        """200 once a healthy target answers (SGLang's probe reads only the status);
        the body lists every target's health and load for operators."""
        if not inference.configured:
            return error_response(Unavailable.code, NO_INFERENCE)
        await inference.model_info(refresh=True, timeout=10.0)
        return JSONResponse({"targets": inference.router.status()})

    @router.get("/get_model_info")
    async def get_model_info() -> dict:
        if not inference.configured:
            raise Unavailable(NO_INFERENCE)
        info = await inference.model_info()
        return {
            "model_path": info.model_path,
            "tokenizer_path": inference.tokenizer_path or info.model_path,
            "is_generation": True,
            "model_name": info.model_name,
            "max_context_len": info.max_context_len,
            "eos_token_id": info.eos_token_id,
            "engine": info.engine,
            "shard_count": info.shard_count,
        }

    return router


@dataclass
class _Sofar:
    """One streamed sample so far: its ids and its meta_info logprob entries."""

    ids: list[int] = field(default_factory=list)
    logprobs: list[list[Any]] = field(default_factory=list)
    tops: list[Any] = field(default_factory=list)


def _chunk_text(tokenizer: Any, texts: _TokenTexts | None, prompt: Prompt, sofar: _Sofar, chunk: Any) -> str:
    """Add a TokenChunk to `sofar`; the sample's text so far (tokenizer thread)."""
    new = list(chunk.token_ids)
    sofar.ids.extend(new)
    if prompt.return_logprob:
        sofar.logprobs.extend(
            [lp, tok, texts(tok) if texts is not None else None] for lp, tok in zip(chunk.logprobs, new)
        )
        if prompt.top_logprobs_k > 0:
            sofar.tops.extend(top_entries(chunk.top_logprobs, len(new), prompt.top_logprobs_k, texts))
    text, _ = _decode(tokenizer, prompt, sofar.ids, None)
    return text


def _final_result(
    tokenizer: Any, texts: _TokenTexts | None, prompt: Prompt, completion: Any, rid: str, latency: float
) -> dict[str, Any]:
    text, pieces = _decode(tokenizer, prompt, list(completion.output_ids), texts if prompt.return_logprob else None)
    return result_json(prompt, completion, text, rid, pieces, _prompt_pieces(texts, prompt), latency, texts)


async def _stream(
    inference: InferencePool,
    call: GenerateCall,
    messages: AsyncIterator[tuple[int, Any]],
    tokenizer: Any,
    span: trace.Span,
) -> AsyncIterator[bytes]:
    """SGLang's stream: one `data: {...}` line per chunk with the text and ids so far
    (cumulative, as SGLang streams by default; `index` is the prompt-major sample
    number; with return_logprob the output logprobs so far, and their top logprobs
    with top_logprobs_num), the final result per sample (prompt logprobs too), then
    `data: [DONE]`."""
    started = time.perf_counter()
    sofar: dict[tuple[int, int], _Sofar] = {}
    texts = _token_texts(tokenizer, call)
    try:
        async for i, item in messages:
            prompt = call.prompts[i]
            index = i * prompt.n + item.index
            if item.WhichOneof("payload") == "chunk":
                state = sofar.setdefault((i, item.index), _Sofar())
                text = await inference.in_tokenizer_thread(_chunk_text, tokenizer, texts, prompt, state, item.chunk)
                meta: dict[str, Any] = {
                    "id": result_rid(prompt, item.index),
                    "finish_reason": None,
                    "prompt_tokens": len(prompt.input_ids or ()),
                    "completion_tokens": len(state.ids),
                    "weight_version": str(item.chunk.version),
                }
                if prompt.return_logprob:
                    meta["output_token_logprobs"] = state.logprobs
                    if prompt.top_logprobs_k > 0:
                        meta["output_top_logprobs"] = state.tops
                yield sse_event({"text": text, "output_ids": state.ids, "meta_info": meta, "index": index}, ensure_ascii=True)
            else:
                result = await inference.in_tokenizer_thread(
                    _final_result, tokenizer, texts, prompt, item.completion, result_rid(prompt, item.index),
                    time.perf_counter() - started,
                )
                result["index"] = index
                yield sse_event(result, ensure_ascii=True)
    except (aio.AioRpcError, ClothoError) as exc:
        message = exc.details() if isinstance(exc, aio.AioRpcError) else str(exc)
        yield sse_event({"error": {"message": f"inference service: {message}"}}, ensure_ascii=True)
    finally:
        await messages.aclose()
        span.end()
    yield DONE
