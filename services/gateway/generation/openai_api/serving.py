"""Serving an OpenAI call: the model card, whole responses (rendered in the
tokenizer thread) and SSE streams (`data: {chunk}` events, then `data: [DONE]`),
built from InferenceService results with render.py.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from grpc import aio
from opentelemetry import trace

from clotho.v1 import inference_service_pb2 as pb
from services.common.errors import ClothoError
from services.gateway.generation.openai_api.error_shape import error_body, error_from_exception
from services.gateway.generation.openai_api.protocol import ChatCompletionRequest, CompletionRequest
from services.gateway.generation.openai_api.render import (
    Alternatives,
    Rendered,
    StreamText,
    TokenStrings,
    chat_logprobs,
    completion_logprobs,
    now,
    render,
    stream_tokens,
    token_strings,
    usage,
)
from services.gateway.generation.pool import InferencePool
from services.gateway.http.sse import DONE, sse_event

_StreamBody = ChatCompletionRequest | CompletionRequest

log = logging.getLogger(__name__)


def model_card(info: pb.GetModelInfoResponse, created: int) -> dict[str, Any]:
    return {
        "id": info.model_name,
        "object": "model",
        "created": created,
        "owned_by": "clotho",
        "root": info.model_name,
        "max_model_len": info.max_context_len,
    }


# ---- whole responses (tokenizer thread) ---------------------------------------------


def chat_response(
    tokenizer: Any,
    body: ChatCompletionRequest,
    prompt_ids: list[int],
    results: list[pb.Completion],
    model: str,
    response_id: str,
) -> dict[str, Any]:
    choices = []
    completion_tokens = 0
    strings = TokenStrings(tokenizer)
    for k, completion in enumerate(results):
        r = render(
            tokenizer,
            completion,
            body.stops,
            body.skip_special_tokens,
            body.no_stop_trim,
            body.logprobs,
            body.top_logprobs_k,
            strings,
        )
        completion_tokens += r.completion_tokens
        logprobs = None
        if body.logprobs:
            alts = r.alternatives if body.top_logprobs_k else None
            logprobs = chat_logprobs(r.tokens, r.logprobs, body.top_logprobs, alts)
        choices.append(
            {
                "index": k,
                "message": {"role": "assistant", "content": r.text},
                "logprobs": logprobs,
                "finish_reason": r.finish_reason,
                "matched_stop": r.matched_stop,
            }
        )
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": now(),
        "model": model,
        "choices": choices,
        "usage": usage(len(prompt_ids), completion_tokens),
    }


def completion_response(
    tokenizer: Any,
    body: CompletionRequest,
    ids: list[list[int]],
    texts: list[str],
    results: list[list[pb.Completion]],
    model: str,
    response_id: str,
) -> dict[str, Any]:
    choices = []
    completion_tokens = 0
    want_lps = body.logprobs is not None
    k_top = body.top_logprobs_k
    strings = TokenStrings(tokenizer)
    for i, completions in enumerate(results):
        echo_text = texts[i] if body.echo else ""
        for k, completion in enumerate(completions):
            r = render(
                tokenizer, completion, body.stops, body.skip_special_tokens, body.no_stop_trim, want_lps, k_top, strings
            )
            completion_tokens += r.completion_tokens
            logprobs = None
            if want_lps:
                lps: list[float | None]
                tokens, pieces, lps = r.tokens, r.pieces, list(r.logprobs)
                alts = list(r.alternatives) if k_top else [None] * len(tokens)
                if body.echo:
                    p_tokens, p_pieces = token_strings(tokenizer, ids[i], body.skip_special_tokens, strings)
                    p_lps: list[float | None] = list(completion.prompt_logprobs) or [0.0] * len(ids[i])
                    p_lps[0] = None  # the first prompt token has no context
                    p_alts = (
                        strings.alternatives(completion.prompt_top_logprobs, len(ids[i]), k_top)
                        if k_top
                        else [None] * len(ids[i])
                    )
                    tokens, pieces, lps = p_tokens + tokens, p_pieces + pieces, p_lps + lps
                    alts = p_alts + alts
                logprobs = completion_logprobs(tokens, pieces, lps, alternatives=alts)
            choices.append(
                {
                    "index": i * body.n + k,
                    "text": echo_text + r.text,
                    "logprobs": logprobs,
                    "finish_reason": r.finish_reason,
                    "matched_stop": r.matched_stop,
                }
            )
    return {
        "id": response_id,
        "object": "text_completion",
        "created": now(),
        "model": model,
        "choices": choices,
        "usage": usage(sum(len(row) for row in ids), completion_tokens),
    }


# ---- streams -----------------------------------------------------------------------


def _stream_error(exc: Exception) -> bytes:
    if isinstance(exc, (ClothoError, aio.AioRpcError)):
        _, body = error_from_exception(exc)
    else:  # pragma: no cover - defensive
        body = error_body(500, str(exc), grpc.StatusCode.INTERNAL.name.lower())
    return sse_event(body)


@dataclass
class _Streamed:
    """A run of streamed tokens, ready for either route's logprobs shape."""

    tokens: list[str]
    pieces: list[str]
    alternatives: list[Alternatives | None] | None
    logprobs: list[float]


class _Sample:
    """Streaming state of one choice: the ids so far, the text sent so far, and the text
    offset of the next logprob token (completions). `chunk` and `completion` turn the
    engine's messages into the text delta to send and, when logprobs were asked for,
    the streamed tokens (both in the tokenizer thread)."""

    def __init__(self, inference: InferencePool, tokenizer: Any, strings: TokenStrings, body: _StreamBody) -> None:
        self.inference = inference
        self.tokenizer = tokenizer
        self.strings = strings
        self.body = body
        self.text = StreamText(body.stops, body.no_stop_trim)
        self.ids: list[int] = []
        self.offset = 0

    async def _tokens(self, ids: list[int], tops: Any, logprobs: list[float]) -> _Streamed:
        tokens, pieces, alts = await self.inference.in_tokenizer_thread(
            stream_tokens, self.strings, ids, self.body.skip_special_tokens, tops, self.body.top_logprobs_k
        )
        return _Streamed(tokens, pieces, alts, logprobs)

    async def chunk(self, chunk: pb.TokenChunk, want_logprobs: bool) -> tuple[str, _Streamed | None]:
        new_ids = list(chunk.token_ids)
        self.ids.extend(new_ids)
        skip = self.body.skip_special_tokens
        text = await self.inference.in_tokenizer_thread(self.tokenizer.decode, self.ids, skip_special_tokens=skip)
        delta = self.text.update(text)
        if not (want_logprobs and new_ids):
            return delta, None
        return delta, await self._tokens(new_ids, chunk.top_logprobs, list(chunk.logprobs))

    async def completion(
        self, completion: pb.Completion, want_logprobs: bool
    ) -> tuple[Rendered, str, _Streamed | None]:
        b = self.body
        r = await self.inference.in_tokenizer_thread(
            render, self.tokenizer, completion, b.stops, b.skip_special_tokens, b.no_stop_trim, False
        )
        delta = self.text.final(r.text)
        sent = len(self.ids)
        rest = list(completion.output_ids)[sent:]
        if not (want_logprobs and rest):
            return r, delta, None
        streamed = await self._tokens(
            rest, completion.output_top_logprobs[sent:], list(completion.output_logprobs)[sent:]
        )
        return r, delta, streamed


def _chat_logprobs(streamed: _Streamed | None, top: int | None) -> dict[str, Any] | None:
    if streamed is None:
        return None
    return chat_logprobs(streamed.tokens, streamed.logprobs, top, streamed.alternatives)


def _completion_logprobs(sample: _Sample, streamed: _Streamed | None) -> dict[str, Any] | None:
    """A completion's logprobs at the sample's text offset, which moves past them."""
    if streamed is None:
        return None
    out = completion_logprobs(streamed.tokens, streamed.pieces, streamed.logprobs, sample.offset, streamed.alternatives)
    sample.offset += sum(len(p) for p in streamed.pieces)
    return out


async def chat_stream(
    inference: InferencePool,
    body: ChatCompletionRequest,
    request: pb.GenerateRequest,
    messages: AsyncGenerator[tuple[int, pb.GenerateResponse], None],
    tokenizer: Any,
    model: str,
    span: trace.Span,
) -> AsyncIterator[bytes]:
    """chat.completion.chunk events: the role first, content deltas (with logprobs if
    asked), a last chunk per choice with its finish_reason, the usage chunk when
    stream_options.include_usage, then [DONE]."""
    header = {"id": request.request_id, "object": "chat.completion.chunk", "created": now(), "model": model}

    def chunk(choice: dict[str, Any]) -> bytes:
        event = {**header, "choices": [choice]}
        if body.include_usage:
            event["usage"] = None
        return sse_event(event)

    strings = TokenStrings(tokenizer)
    samples = [_Sample(inference, tokenizer, strings, body) for _ in range(body.n)]
    completion_tokens = 0
    want_lps = bool(body.logprobs)
    try:
        for k in range(body.n):
            yield chunk(
                {"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            )
        async for _, message in messages:
            k = message.index
            sample = samples[k]
            if message.WhichOneof("payload") == "chunk":
                delta, streamed = await sample.chunk(message.chunk, want_lps)
                logprobs = _chat_logprobs(streamed, body.top_logprobs)
                if delta or logprobs:
                    yield chunk({"index": k, "delta": {"content": delta}, "logprobs": logprobs, "finish_reason": None})
                continue
            r, delta, streamed = await sample.completion(message.completion, want_lps)
            completion_tokens += r.completion_tokens
            yield chunk(
                {
                    "index": k,
                    "delta": {"content": delta} if delta else {},
                    "logprobs": _chat_logprobs(streamed, body.top_logprobs),
                    "finish_reason": r.finish_reason,
                    "matched_stop": r.matched_stop,
                }
            )
        if body.include_usage:
            yield sse_event({**header, "choices": [], "usage": usage(len(request.input_ids), completion_tokens)})
    except (ClothoError, aio.AioRpcError) as exc:
        yield _stream_error(exc)
    finally:
        await messages.aclose()
        span.end()
    yield DONE


async def completion_stream(
    inference: InferencePool,
    body: CompletionRequest,
    response_id: str,
    requests: list[pb.GenerateRequest],
    messages: AsyncGenerator[tuple[int, pb.GenerateResponse], None],
    texts: list[str],
    tokenizer: Any,
    model: str,
    span: trace.Span,
) -> AsyncIterator[bytes]:
    """text_completion events: the echoed prompt first (if echo), text deltas (with
    logprobs if asked), a last event per choice with its finish_reason, the usage event
    when stream_options.include_usage, then [DONE]."""
    header = {"id": response_id, "object": "text_completion", "created": now(), "model": model}

    def event(choice: dict[str, Any]) -> bytes:
        out = {**header, "choices": [choice]}
        if body.include_usage:
            out["usage"] = None
        return sse_event(out)

    n = body.n
    strings = TokenStrings(tokenizer)
    samples = {(i, k): _Sample(inference, tokenizer, strings, body) for i in range(len(requests)) for k in range(n)}
    want_lps = body.logprobs is not None
    completion_tokens = 0
    try:
        if body.echo:
            for i, text in enumerate(texts):
                for k in range(n):
                    samples[(i, k)].offset = len(text)
                    yield event({"index": i * n + k, "text": text, "logprobs": None, "finish_reason": None})
        async for i, message in messages:
            k = message.index
            sample = samples[(i, k)]
            if message.WhichOneof("payload") == "chunk":
                delta, streamed = await sample.chunk(message.chunk, want_lps)
                logprobs = _completion_logprobs(sample, streamed)
                if delta or logprobs:
                    yield event({"index": i * n + k, "text": delta, "logprobs": logprobs, "finish_reason": None})
                continue
            r, delta, streamed = await sample.completion(message.completion, want_lps)
            completion_tokens += r.completion_tokens
            yield event(
                {
                    "index": i * n + k,
                    "text": delta,
                    "logprobs": _completion_logprobs(sample, streamed),
                    "finish_reason": r.finish_reason,
                    "matched_stop": r.matched_stop,
                }
            )
        if body.include_usage:
            prompt_tokens = sum(len(r.input_ids) for r in requests)
            yield sse_event({**header, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
    except (ClothoError, aio.AioRpcError) as exc:
        yield _stream_error(exc)
    finally:
        await messages.aclose()
        span.end()
    yield DONE
