"""Serving an SGLang /generate call: prompt text to ids, the whole reply rendered
in the tokenizer thread, and the SSE stream of cumulative text (`data: {...}`
events, then `data: [DONE]`), as SGLang's server answers them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from grpc import aio
from opentelemetry import trace

from services.common.errors import ClothoError, InvalidArgument
from services.gateway.generation.pool import InferencePool
from services.gateway.generation.sglang_api.protocol import GenerateCall, Prompt, result_json, result_rid, top_entries
from services.gateway.http.sse import DONE, sse_event

log = logging.getLogger(__name__)


def encode_prompts(tokenizer: Any, call: GenerateCall) -> None:
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


def _decode(tokenizer: Any, prompt: Prompt, ids: list[int], texts: _TokenTexts | None) -> tuple[str, list[str] | None]:
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


def render(tokenizer: Any, call: GenerateCall, results: list[list[Any]], latency: float) -> list[dict[str, Any]]:
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


async def stream(
    inference: InferencePool,
    call: GenerateCall,
    messages: AsyncGenerator[tuple[int, Any], None],
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
                yield sse_event(
                    {"text": text, "output_ids": state.ids, "meta_info": meta, "index": index}, ensure_ascii=True
                )
            else:
                result = await inference.in_tokenizer_thread(
                    _final_result,
                    tokenizer,
                    texts,
                    prompt,
                    item.completion,
                    result_rid(prompt, item.index),
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
