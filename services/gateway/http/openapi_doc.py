"""The served OpenAPI document (`/openapi.json`, `/docs`) with every route's request
and response body, so that clients and schema-driven fuzzers reach every route.

The hot routes (`/scored_data`, `/scored_data_list`, `/batch`) are plain Starlette
routes that parse bytes themselves, and the inference routes read their JSON by hand
(their dialects accept more than one shape); neither lets the framework parse a body.
Their schemas are declared here and merged into FastAPI's document once, when it is
first asked for: the models below document, they never parse, so ingest keeps its
speed. `ScoredData` is the very model the ingest's Python path validates with.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field

from services.gateway.generation.openai_api.protocol import ChatCompletionRequest, CompletionRequest
from services.gateway.trajectory.scored_data import ScoredData


class _Open(BaseModel):
    """A documented shape that may carry more keys than it names."""

    model_config = ConfigDict(extra="allow")


class ErrorReply(_Open):
    """The gateway's error body (4xx/5xx); OpenAI's `{"error": {...}}` on `/v1/*`."""

    error: str | dict[str, Any]
    code: str | None = None
    detail: list[dict[str, Any]] | None = None


class ScoredDataReply(BaseModel):
    """`/scored_data`: queued, or buffered until the env's group size is made up."""

    status: Literal["received", "buffered"]
    buffer_size: int | None = None


class ScoredDataListReply(BaseModel):
    """`/scored_data_list`: every group taken (all or none)."""

    status: Literal["received"]
    groups_processed: int
    buffered: int | None = None
    last_buffer_size: int | None = None


class BatchReply(_Open):
    """`/batch`: the next batch of exactly batch_size sequences (groups as they were
    sent, every Atropos key present, plus `policy_versions` when a client sent them),
    null when none can be formed; before a trainer registered, an error status."""

    batch: list[ScoredData] | None
    status: str | None = None
    message: str | None = None


class SamplingParamsDoc(_Open):
    """SGLang sampling parameters (those the engine cannot honour are refused, 400)."""

    max_new_tokens: int | None = Field(None, ge=0)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    skip_special_tokens: bool | None = None
    no_stop_trim: bool | None = None


class SGLangGenerateRequest(_Open):
    """SGLang's native `/generate` (generation/sglang_api/protocol.py): `text` or
    `input_ids`, one prompt or a list; per-prompt values given once or as a list."""

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: SamplingParamsDoc | list[SamplingParamsDoc] | None = None
    return_logprob: bool | list[bool] | None = None
    logprob_start_len: int | list[int] | None = None
    top_logprobs_num: int | list[int] | None = None
    return_text_in_logprobs: bool | None = None
    rid: str | list[str] | None = None
    stream: bool | None = None


class PromptTokenIds(BaseModel):
    prompt_token_ids: list[int]


class PromptText(BaseModel):
    prompt: str


class VllmGenerateRequest(_Open):
    """vLLM's `/generate` dialect (generation/vllm_api/protocol.py): `prompt` and
    vLLM SamplingParams fields at the top level."""

    prompt: str | PromptTokenIds | PromptText
    stream: bool | None = None
    n: int | None = Field(None, ge=1)
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None


class MetaInfo(_Open):
    id: str | None = None
    finish_reason: dict[str, Any] | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class SGLangGenerateItem(_Open):
    text: str
    output_ids: list[int] | None = None
    meta_info: MetaInfo


class VllmGenerateReply(_Open):
    text: list[str]
    prompt: str | None = None
    finish_reasons: list[str | None] | None = None


class CompletionChoice(_Open):
    index: int
    text: str | None = None
    message: dict[str, Any] | None = None
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None


class CompletionReply(_Open):
    """An OpenAI completion or chat completion (or, with stream, SSE chunks of it)."""

    id: str
    object: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: dict[str, Any] | None = None


class RegisterReply(BaseModel):
    """`/register`: the requester's id (a random 128-bit integer)."""

    uuid: int


class ModelCard(_Open):
    id: str
    object: str
    created: int | None = None
    owned_by: str | None = None


DOC_MODELS: tuple[type[BaseModel], ...] = (
    ScoredData,
    ScoredDataReply,
    ScoredDataListReply,
    BatchReply,
    ErrorReply,
    SGLangGenerateRequest,
    VllmGenerateRequest,
    SGLangGenerateItem,
    VllmGenerateReply,
    CompletionRequest,
    ChatCompletionRequest,
    CompletionReply,
    ModelCard,
    RegisterReply,
)

_TEXT = {"type": "string"}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(code): _json(_ref("ErrorReply"), "Error") for code in codes}


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _ingest(summary: str, body: dict[str, Any], reply: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "operationId": summary.lower().replace(" ", "_"),
            "requestBody": _body(body),
            "responses": {"200": _json(_ref(reply), "Taken, durably"), **_errors(400, 401, 413, 422, 503)},
        }
    }


def _components(schema: dict[str, Any]) -> None:
    defs = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in DOC_MODELS:
        doc = model.model_json_schema(ref_template="#/components/schemas/{model}", mode="validation")
        defs.update(doc.pop("$defs", {}))
        defs[model.__name__] = doc


def _merge(op: dict[str, Any], request: dict[str, Any] | None, reply: dict[str, Any], errors: tuple) -> None:
    if request is not None:
        op["requestBody"] = _body(request)
    op.setdefault("responses", {})["200"] = _json(reply, "Success (with stream: text/event-stream)")
    op["responses"].update(_errors(*errors))


def document(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document of `app` plus the bodies it cannot see."""
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    _components(schema)
    paths = schema.setdefault("paths", {})
    paths["/scored_data"] = _ingest("Submit scored data", _ref("ScoredData"), "ScoredDataReply")
    paths["/scored_data_list"] = _ingest(
        "Submit scored data list", {"type": "array", "items": _ref("ScoredData")}, "ScoredDataListReply"
    )
    paths["/batch"] = {
        "get": {
            "summary": "Take the next batch",
            "operationId": "take_batch",
            "responses": {"200": _json(_ref("BatchReply"), "The next batch, or null"), **_errors(401, 503)},
        }
    }
    generate = {"oneOf": [_ref("SGLangGenerateRequest"), _ref("VllmGenerateRequest")]}
    generated = {
        "oneOf": [
            _ref("SGLangGenerateItem"),
            {"type": "array", "items": _ref("SGLangGenerateItem")},
            _ref("VllmGenerateReply"),
        ]
    }
    inference = (400, 401, 413, 503, 504)
    known = {
        ("/generate", "post"): (generate, generated),
        ("/v1/completions", "post"): (_ref("CompletionRequest"), _ref("CompletionReply")),
        ("/v1/chat/completions", "post"): (_ref("ChatCompletionRequest"), _ref("CompletionReply")),
        ("/v1/models/{model_id}", "get"): (None, _ref("ModelCard")),
    }
    for (path, method), (request, reply) in known.items():
        op = paths.get(path, {}).get(method)
        if op is not None:
            _merge(op, request, reply, inference)
    replies = {
        ("/register", "post"): _json(_ref("RegisterReply"), "Registered"),
        ("/latest_example", "get"): _json(_ref("ScoredData"), "The latest group queued (empty lists before any)"),
    }
    texts = {
        ("/reset_data", "get"): "Reset successful",
        ("/metrics", "get"): "Prometheus text exposition",
        ("/health", "get"): "Healthy (empty body); 503 when no inference service is",
    }
    for (path, method), reply in replies.items():
        op = paths.get(path, {}).get(method)
        if op is not None:
            op.setdefault("responses", {})["200"] = reply
    for (path, method), text in texts.items():
        op = paths.get(path, {}).get(method)
        if op is not None:
            op.setdefault("responses", {})["200"] = {"description": text, "content": {"text/plain": {"schema": _TEXT}}}
    return schema


def install_openapi(app: FastAPI) -> None:
    """Serve `document(app)` (built once, on the first request for it)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
