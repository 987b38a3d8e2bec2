"""Serving a vLLM /generate call (the caller, SGLang's /generate route, checked
`is_vllm_body`): prompt text to ids, one InferenceService call, and the reply or the
one streamed line, rendered in the tokenizer thread (protocol.py)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi.responses import JSONResponse, Response, StreamingResponse

from services.common.errors import InvalidArgument, Unavailable
from services.gateway.generation.pool import InferencePool
from services.gateway.generation.vllm_api.protocol import VllmCall, parse_vllm, render, stream_line
from services.gateway.http.request_span import RequestSpan

log = logging.getLogger(__name__)
_warned_no_tokenizer = False


async def _tokenizer(inference: InferencePool, call: VllmCall) -> Any:
    """The tokenizer; token-id prompts still work (with empty text) without one."""
    global _warned_no_tokenizer
    try:
        return await inference.tokenizer()
    except Unavailable as exc:
        if call.input_ids is None:
            raise
        if not _warned_no_tokenizer:
            log.warning("%s; vLLM /generate answers with empty text", exc)
            _warned_no_tokenizer = True
        return None


def _encode(tokenizer: Any, text: str) -> list[int]:
    ids = list(tokenizer.encode(text))
    if not ids:
        raise InvalidArgument("prompt encodes to no tokens")
    return ids


async def _once(line: bytes) -> AsyncIterator[bytes]:
    yield line


async def generate(inference: InferencePool, body: dict[str, Any], headers: Mapping[str, str]) -> Response:
    """Answer a vLLM /generate body (the caller checked `is_vllm_body`)."""
    call = parse_vllm(body)
    with RequestSpan("POST /generate", headers):
        tokenizer = await _tokenizer(inference, call)
        if call.input_ids is None:
            assert call.text is not None
            call.input_ids = await inference.in_tokenizer_thread(_encode, tokenizer, call.text)
        completions = await inference.collect(call.request())
        if call.stream:
            line = await inference.in_tokenizer_thread(stream_line, tokenizer, call, completions)
            return StreamingResponse(_once(line), media_type="application/x-ndjson")
        reply = await inference.in_tokenizer_thread(render, tokenizer, call, completions)
    return JSONResponse(reply)
