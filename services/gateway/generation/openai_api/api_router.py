"""OpenAI-compatible `/v1/models`, `/v1/completions` and `/v1/chat/completions`,
forwarded to InferenceService, so an Atropos `APIServerConfig` (server_type "openai"
or "sglang") or any OpenAI client can point its base_url at the gateway.

Chat prompts come from the model tokenizer's own chat template
(`apply_chat_template(..., add_generation_prompt=True)`). Streaming answers are SSE:
`data: {chunk}` lines and `data: [DONE]`. Errors use OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, with the status from the gateway's
one gRPC-to-HTTP table (http_body.py gives the same shape to the 413 and bad-gzip 400
it answers on `/v1/*` before the routes run).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, AsyncIterator, Callable, Coroutine

import grpc
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from grpc import aio
from opentelemetry import trace

from clotho.v1 import inference_service_pb2 as pb
from services.common.errors import ClothoError, InvalidArgument, Unavailable
from services.gateway.http.errors import http_status
from services.gateway.generation.pool import NO_INFERENCE, InferencePool, prefetch
from services.gateway.http.request_span import RequestSpan
from services.gateway.http.sse import DONE, sse_event
from services.gateway.generation.openai_api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    RequestInvalid,
    StreamText,
    TokenStrings,
    chat_logprobs,
    completion_logprobs,
    new_id,
    now,
    render,
    stream_tokens,
    token_strings,
    usage,
    validate,
)

log = logging.getLogger(__name__)

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                409: "conflict_error", 413: "invalid_request_error", 429: "rate_limit_error"}


def error_type(status: int) -> str:
    return _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


def error_response(status: int, message: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, code, param), status_code=status)


def _from_exception(exc: Exception) -> tuple[int, dict[str, Any]]:
    if isinstance(exc, ClothoError):
        status = http_status(exc.code)
        return status, error_body(status, str(exc), exc.code.name.lower(), getattr(exc, "param", None))
    assert isinstance(exc, aio.AioRpcError)
    code = exc.code()
    status = http_status(code)
    return status, error_body(status, f"inference service: {exc.details() or code.name}", code.name.lower())


class OpenAIRoute(APIRoute):
    """Routes whose errors leave in OpenAI's shape instead of the gateway's."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except (ClothoError, aio.AioRpcError) as exc:
                status, body = _from_exception(exc)
                if status >= 500:
                    log.info("%s %s: %s", request.method, request.url.path, body["error"]["message"])
                return JSONResponse(body, status_code=status)

        return handle




async def _json_body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except ValueError as exc:
        raise RequestInvalid(f"the body is not valid JSON: {exc}") from None


def _chat_prompt(tokenizer: Any, body: ChatCompletionRequest) -> list[int]:
    """The chat template's rendering of the messages, as token ids (tokenizer thread)."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidArgument("the model's tokenizer has no chat template: use /v1/completions")
    kwargs = dict(body.chat_template_kwargs or {})
    if body.tools:
        kwargs["tools"] = body.tools
    try:
        text = tokenizer.apply_chat_template(
            body.template_messages(),
            tokenize=False,
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
            **kwargs,
        )
    except RequestInvalid:
        raise
    except Exception as exc:  # noqa: BLE001 - templates raise anything (jinja, ValueError)
        raise RequestInvalid(f"messages: the chat template rejected them: {exc}", "messages") from None
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise RequestInvalid("messages: the chat template renders them to no tokens", "messages")
    return list(ids)


def _completion_prompts(tokenizer: Any, body: CompletionRequest) -> tuple[list[list[int]], list[str]]:
    """Each prompt as token ids and as text (text is needed for echo only)."""
    ids, texts = [], []
    for i, prompt in enumerate(body.prompt):
        if isinstance(prompt, str):
            row = list(tokenizer.encode(prompt))
            if not row:
                where = "prompt" if len(body.prompt) == 1 else f"prompt[{i}]"
                raise RequestInvalid(f"{where}: encodes to no tokens", where)
            ids.append(row)
            texts.append(prompt)
        else:
            ids.append(list(prompt))
            texts.append(tokenizer.decode(prompt, skip_special_tokens=body.skip_special_tokens) if body.echo else "")
    return ids, texts


def openai_router(inference: InferencePool) -> APIRouter:
    router = APIRouter(route_class=OpenAIRoute)
    started = int(time.time())

    def require_inference() -> None:
        if not inference.configured:
            raise Unavailable(NO_INFERENCE)

    @router.get("/v1/models")
    async def list_models() -> dict:
        require_inference()
        info = await inference.model_info()
        return {"object": "list", "data": [_model_card(info, started)]}

    @router.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> Response:
        require_inference()
        info = await inference.model_info()
        if model_id != info.model_name:
            return error_response(404, f"The model {model_id!r} does not exist", "model_not_found", "model")
        return JSONResponse(_model_card(info, started))

    @router.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Response:
        require_inference()
        body: CompletionRequest = validate(CompletionRequest, await _json_body(request))
        body.check()
        with RequestSpan("POST /v1/completions", request.headers) as span:
            tokenizer = await inference.tokenizer()
            info = await inference.model_info()
            ids, texts = await inference.in_tokenizer_thread(_completion_prompts, tokenizer, body)
            want_prompt_lps = body.echo and body.logprobs is not None
            call_id = new_id("cmpl")
            requests = [
                pb.GenerateRequest(
                    input_ids=row,
                    sampling_params=body.sampling_params(body.max_new_tokens),
                    return_prompt_logprobs=want_prompt_lps,
                    stream=body.stream,
                    request_id=call_id if len(ids) == 1 else f"{call_id}-{i}",
                    top_logprobs=body.top_logprobs_k,
                    prompt_top_logprobs=body.top_logprobs_k if want_prompt_lps else 0,
                )
                for i, row in enumerate(ids)
            ]
            model = body.model or info.model_name
            if body.stream:
                # The first message arrives before the 200 goes out: errors keep their status.
                messages = await prefetch(inference.generate_many(requests, span.context()))
                return StreamingResponse(
                    _completion_stream(inference, body, call_id, requests, messages, texts, tokenizer, model,
                                       span.hand_off()),
                    media_type="text/event-stream",
                )
            results = await asyncio.gather(*(inference.collect(r) for r in requests))
            payload = await inference.in_tokenizer_thread(
                _completion_response, tokenizer, body, ids, texts, results, model, call_id
            )
            return JSONResponse(payload)

    @router.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        require_inference()
        body: ChatCompletionRequest = validate(ChatCompletionRequest, await _json_body(request))
        body.check()
        with RequestSpan("POST /v1/chat/completions", request.headers) as span:
            tokenizer = await inference.tokenizer()
            info = await inference.model_info()
            ids = await inference.in_tokenizer_thread(_chat_prompt, tokenizer, body)
            generate = pb.GenerateRequest(
                input_ids=ids,
                sampling_params=body.sampling_params(body.max_new_tokens),
                stream=body.stream,
                request_id=new_id("chatcmpl"),
                top_logprobs=body.top_logprobs_k,
            )
            model = body.model or info.model_name
            if body.stream:
                messages = await prefetch(inference.generate_many([generate], span.context()))
                return StreamingResponse(
                    _chat_stream(inference, body, generate, messages, tokenizer, model, span.hand_off()),
                    media_type="text/event-stream",
                )
            results = await inference.collect(generate)
            payload = await inference.in_tokenizer_thread(
                _chat_response, tokenizer, body, ids, results, model, generate.request_id
            )
            return JSONResponse(payload)

    return router


def _model_card(info: pb.GetModelInfoResponse, created: int) -> dict[str, Any]:
    return {
        "id": info.model_name,
        "object": "model",
        "created": created,
        "owned_by": "clotho",
        "root": info.model_name,
        "max_model_len": info.max_context_len,
    }


# ---- whole responses (tokenizer thread) ---------------------------------------------


def _chat_response(
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
        r = render(tokenizer, completion, body.stops, body.skip_special_tokens, body.no_stop_trim, body.logprobs,
                   body.top_logprobs_k, strings)
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


def _completion_response(
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
            r = render(tokenizer, completion, body.stops, body.skip_special_tokens, body.no_stop_trim, want_lps,
                       k_top, strings)
            completion_tokens += r.completion_tokens
            logprobs = None
            if want_lps:
                tokens, pieces, lps = r.tokens, r.pieces, list(r.logprobs)
                alts = list(r.alternatives) if k_top else [None] * len(tokens)
                if body.echo:
                    p_tokens, p_pieces = token_strings(tokenizer, ids[i], body.skip_special_tokens, strings)
                    p_lps: list[float | None] = list(completion.prompt_logprobs) or [0.0] * len(ids[i])
                    p_lps[0] = None  # the first prompt token has no context
                    p_alts = (
                        strings.alternatives(completion.prompt_top_logprobs, len(ids[i]), k_top)
                        if k_top else [None] * len(ids[i])
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
        _, body = _from_exception(exc)
    else:  # pragma: no cover - defensive
        body = error_body(500, str(exc), grpc.StatusCode.INTERNAL.name.lower())
    return sse_event(body)


class _Sample:
    """Streaming state of one choice."""

    def __init__(self, stops: list[str], no_stop_trim: bool) -> None:
        self.text = StreamText(stops, no_stop_trim)
        self.ids: list[int] = []
        self.offset = 0  # text offset of the next logprob token (completions)


async def _chat_stream(
    inference: InferencePool,
    body: ChatCompletionRequest,
    request: pb.GenerateRequest,
    messages: AsyncIterator[tuple[int, pb.GenerateResponse]],
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
            yield chunk({"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None})
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
            r = await inference.in_tokenizer_thread(render, tokenizer, completion, body.stops, skip,
                                                    body.no_stop_trim, False)
            completion_tokens += r.completion_tokens
            delta = sample.text.final(r.text)
            logprobs = None
            rest = list(completion.output_ids)[len(sample.ids):]
            if body.logprobs and rest:
                tokens, _, alts = await inference.in_tokenizer_thread(
                    stream_tokens, strings, rest, skip, completion.output_top_logprobs[len(sample.ids):],
                    body.top_logprobs_k,
                )
                logprobs = chat_logprobs(
                    tokens, list(completion.output_logprobs)[len(sample.ids):], body.top_logprobs, alts
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


async def _completion_stream(
    inference: InferencePool,
    body: CompletionRequest,
    response_id: str,
    requests: list[pb.GenerateRequest],
    messages: AsyncIterator[tuple[int, pb.GenerateResponse]],
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
            r = await inference.in_tokenizer_thread(render, tokenizer, completion, body.stops, skip,
                                                    body.no_stop_trim, False)
            completion_tokens += r.completion_tokens
            delta = sample.text.final(r.text)
            logprobs = None
            rest = list(completion.output_ids)[len(sample.ids):]
            if want_lps and rest:
                tokens, pieces, alts = await inference.in_tokenizer_thread(
                    stream_tokens, strings, rest, skip, completion.output_top_logprobs[len(sample.ids):],
                    body.top_logprobs_k,
                )
                logprobs = completion_logprobs(
                    tokens, pieces, list(completion.output_logprobs)[len(sample.ids):], sample.offset, alts
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
