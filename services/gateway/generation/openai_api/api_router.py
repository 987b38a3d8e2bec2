"""OpenAI-compatible `/v1/models`, `/v1/completions` and `/v1/chat/completions`,
forwarded to InferenceService, so an Atropos `APIServerConfig` (server_type "openai"
or "sglang") or any OpenAI client can point its base_url at the gateway.

Chat prompts come from the model tokenizer's own chat template
(`apply_chat_template(..., add_generation_prompt=True)`). Streaming answers are SSE:
`data: {chunk}` lines and `data: [DONE]`. Errors use OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, with the status from the gateway's
one gRPC-to-HTTP table (error_shape.py; http/body.py gives the same shape to the 413 and bad-gzip 400
it answers on `/v1/*` before the routes run).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from clotho.v1 import inference_service_pb2 as pb
from services.common.errors import InvalidArgument, Unavailable
from services.gateway.generation.openai_api.error_shape import OpenAIRoute, error_response
from services.gateway.generation.openai_api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    RequestInvalid,
    validate,
)
from services.gateway.generation.openai_api.render import new_id
from services.gateway.generation.openai_api.serving import (
    chat_response,
    chat_stream,
    completion_response,
    completion_stream,
    model_card,
)
from services.gateway.generation.pool import NO_INFERENCE, InferencePool, prefetch
from services.gateway.http.request_span import RequestSpan

log = logging.getLogger(__name__)


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
        return {"object": "list", "data": [model_card(info, started)]}

    @router.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> Response:
        require_inference()
        info = await inference.model_info()
        if model_id != info.model_name:
            return error_response(404, f"The model {model_id!r} does not exist", "model_not_found", "model")
        return JSONResponse(model_card(info, started))

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
                    completion_stream(
                        inference, body, call_id, requests, messages, texts, tokenizer, model, span.hand_off()
                    ),
                    media_type="text/event-stream",
                )
            results = await asyncio.gather(*(inference.collect(r) for r in requests))
            payload = await inference.in_tokenizer_thread(
                completion_response, tokenizer, body, ids, texts, results, model, call_id
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
                    chat_stream(inference, body, generate, messages, tokenizer, model, span.hand_off()),
                    media_type="text/event-stream",
                )
            results = await inference.collect(generate)
            payload = await inference.in_tokenizer_thread(
                chat_response, tokenizer, body, ids, results, model, generate.request_id
            )
            return JSONResponse(payload)

    return router
