"""Serving an OpenAI call: the model card, whole responses (rendered in the
tokenizer thread) and SSE streams (`data: {chunk}` events, then `data: [DONE]`),
built from InferenceService results with render.py.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import grpc
from grpc import aio
from opentelemetry import trace

from clotho.v1 import inference_service_pb2 as pb
from services.common.errors import ClothoError
from services.gateway.generation.openai_api.error_shape import error_body, error_from_exception
from services.gateway.generation.openai_api.protocol import ChatCompletionRequest, CompletionRequest
from services.gateway.generation.openai_api.render import (
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


class _Sample:
    """Streaming state of one choice."""

    def __init__(self, stops: list[str], no_stop_trim: bool) -> None:
        self.text = StreamText(stops, no_stop_trim)
        self.ids: list[int] = []
        self.offset = 0  # text offset of the next logprob token (completions)


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

    samples = [_Sample(body.stops, body.no_stop_trim) for _ in range(body.n)]
    completion_tokens = 0
    skip = body.skip_special_tokens
    strings = TokenStrings(tokenizer)
    try:
        for k in range(body.n):
            yield chunk(
                {"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            )
        async for _, message in messages:
            k = message.index
            sample = samples[k]
            if message.WhichOneof("payload") == "chunk":
                new_ids = list(message.chunk.token_ids)
                sample.ids.extend(new_ids)
                text = await inference.in_tokenizer_thread(tokenizer.decode, sample.ids, skip_special_tokens=skip)
                delta = sample.text.update(text)
                logprobs = None
                if body.logprobs and new_ids:
                    tokens, _, alts = await inference.in_tokenizer_thread(
                        stream_tokens, strings, new_ids, skip, message.chunk.top_logprobs, body.top_logprobs_k
                    )
                    logprobs = chat_logprobs(tokens, list(message.chunk.logprobs), body.top_logprobs, alts)
                if delta or logprobs:
                    yield chunk({"index": k, "delta": {"content": delta}, "logprobs": logprobs, "finish_reason": None})
                continue
            completion = message.completion
            r = await inference.in_tokenizer_thread(
                render, tokenizer, completion, body.stops, skip, body.no_stop_trim, False
            )
            completion_tokens += r.completion_tokens
            delta = sample.text.final(r.text)
            logprobs = None
            rest = list(completion.output_ids)[len(sample.ids) :]
            if body.logprobs and rest:
                tokens, _, alts = await inference.in_tokenizer_thread(
                    stream_tokens,
                    strings,
                    rest,
                    skip,
                    completion.output_top_logprobs[len(sample.ids) :],
                    body.top_logprobs_k,
                )
                logprobs = chat_logprobs(
                    tokens, list(completion.output_logprobs)[len(sample.ids) :], body.top_logprobs, alts
                )
            yield chunk(
                {
                    "index": k,
                    "delta": {"content": delta} if delta else {},
                    "logprobs": logprobs,
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
    samples = {(i, k): _Sample(body.stops, body.no_stop_trim) for i in range(len(requests)) for k in range(n)}
    want_lps = body.logprobs is not None
    skip = body.skip_special_tokens
    strings = TokenStrings(tokenizer)
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
                new_ids = list(message.chunk.token_ids)
                sample.ids.extend(new_ids)
                text = await inference.in_tokenizer_thread(tokenizer.decode, sample.ids, skip_special_tokens=skip)
                delta = sample.text.update(text)
                logprobs = None
                if want_lps and new_ids:
                    tokens, pieces, alts = await inference.in_tokenizer_thread(
                        stream_tokens, strings, new_ids, skip, message.chunk.top_logprobs, body.top_logprobs_k
                    )
                    logprobs = completion_logprobs(tokens, pieces, list(message.chunk.logprobs), sample.offset, alts)
                    sample.offset += sum(len(p) for p in pieces)
                if delta or logprobs:
                    yield event({"index": i * n + k, "text": delta, "logprobs": logprobs, "finish_reason": None})
                continue
            completion = message.completion
            r = await inference.in_tokenizer_thread(
                render, tokenizer, completion, body.stops, skip, body.no_stop_trim, False
            )
            completion_tokens += r.completion_tokens
            delta = sample.text.final(r.text)
            logprobs = None
            rest = list(completion.output_ids)[len(sample.ids) :]
            if want_lps and rest:
                tokens, pieces, alts = await inference.in_tokenizer_thread(
                    stream_tokens,
                    strings,
                    rest,
                    skip,
                    completion.output_top_logprobs[len(sample.ids) :],
                    body.top_logprobs_k,
                )
                logprobs = completion_logprobs(
                    tokens, pieces, list(completion.output_logprobs)[len(sample.ids) :], sample.offset, alts
                )
            yield event(
                {
                    "index": i * n + k,
                    "text": delta,
                    "logprobs": logprobs,
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
