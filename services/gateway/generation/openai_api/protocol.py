"""OpenAI's `/v1/completions` and `/v1/chat/completions` request bodies: their schema,
strict validation, and their translation to InferenceService.Generate requests
(render.py turns the results back into OpenAI's JSON).

Requests are validated strictly (a bool is not an integer) and every problem names its
field, as OpenAI's `param` does. Parameters the engine cannot honour are refused with
400 when ignoring them would change the result (`logit_bias`, `suffix`, `best_of` > n,
structured `response_format`). `presence_penalty` and `frequency_penalty` (and the
SGLang/vLLM extension `repetition_penalty`) go to the engine, which applies them to the
choice of token (SamplingParams documents the semantics).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from clotho.v1 import inference_service_pb2 as pb
from services.common.errors import InvalidArgument
from services.gateway.field_paths import field_path

_UINT64 = 2**64
_INT32 = 2**31 - 1
MAX_N = 1024
MAX_TOP_LOGPROBS = 20
# OpenAI's default for the legacy completions route (the chat route has none).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16

FINISH_REASONS = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_ABORT: "abort",
}


class RequestInvalid(InvalidArgument):
    """A body that does not validate: the message names the field, `param` holds it."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def validate(model: type[BaseModel], body: Any) -> Any:
    """Validate a parsed JSON body; RequestInvalid names the first bad field."""
    if not isinstance(body, dict):
        raise RequestInvalid("the body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        problems = []
        first = None
        for err in exc.errors():
            path = field_path(err.get("loc", ()), fields_only=True)
            first = first or path or None
            msg = err.get("msg", "invalid").removeprefix("Value error, ")
            problems.append(f"{path or 'body'}: {msg}")
        raise RequestInvalid("; ".join(dict.fromkeys(problems)), first) from None


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    include_usage: bool = False


class _Sampling(BaseModel):
    """What both routes share."""

    model_config = ConfigDict(strict=True, extra="allow")

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    max_tokens: int | None = Field(None, ge=0, le=_INT32)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=_INT32)
    stop: Any = None
    seed: int | None = Field(None, ge=-(2**63), lt=_UINT64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # SGLang / vLLM extensions.
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    repetition_penalty: float | None = Field(None, gt=0.0, allow_inf_nan=False)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> list[str]:
        if value is None:
            return []
        if isinstance(value, str):
            return [value] if value else []
        if isinstance(value, list) and all(isinstance(s, str) for s in value):
            return [s for s in value if s]
        raise ValueError("must be a string or a list of strings")

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise ValueError("is not supported by this server")
        return value

    @property
    def stops(self) -> list[str]:
        return list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, max_tokens: int | None) -> pb.SamplingParams:
        out = pb.SamplingParams(n=self.n, stop=self.stops, ignore_eos=self.ignore_eos)
        if max_tokens is not None:
            out.max_new_tokens = max_tokens
        if self.temperature is not None:
            out.temperature = self.temperature
        if self.top_p is not None:
            out.top_p = self.top_p
        if self.top_k is not None and self.top_k > 0:
            out.top_k = self.top_k
        if self.seed is not None:
            out.seed = self.seed % _UINT64
        if self.stop_token_ids:
            out.stop_token_ids.extend(self.stop_token_ids)
        if self.frequency_penalty is not None:
            out.frequency_penalty = self.frequency_penalty
        if self.presence_penalty is not None:
            out.presence_penalty = self.presence_penalty
        if self.repetition_penalty is not None:
            out.repetition_penalty = self.repetition_penalty
        return out


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: Any
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> list[str] | list[list[int]]:
        """Normalised to a list of strings or a list of token-id lists."""

        def token_ids(row: Any) -> bool:
            return (
                isinstance(row, list)
                and bool(row)
                and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= _INT32 for t in row)
            )

        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and value:
            if all(isinstance(p, str) for p in value):
                return list(value)
            if token_ids(value):
                return [list(value)]
            if all(token_ids(p) for p in value):
                return [list(p) for p in value]
        raise ValueError(
            "must be a string, a non-empty list of strings, a list of token ids or a list of lists of token ids"
        )

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("is not supported by this server")
        return value

    def check(self) -> None:
        if self.best_of is not None and self.best_of != self.n:
            raise RequestInvalid("best_of: only best_of equal to n is supported", "best_of")
        if self.stream and self.echo and self.logprobs is not None:
            raise RequestInvalid("echo: echo with logprobs is not supported while streaming", "echo")

    @property
    def max_new_tokens(self) -> int:
        return self.max_tokens if self.max_tokens is not None else COMPLETIONS_DEFAULT_MAX_TOKENS

    @property
    def top_logprobs_k(self) -> int:
        """Alternatives per generated token (and echoed prompt position) to ask for."""
        return self.logprobs or 0


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    role: str = Field(min_length=1)
    content: str | list[ContentPart] | None = None

    def for_template(self, where: str) -> dict[str, Any]:
        """The message as chat templates expect it: text content as one string."""
        out = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            texts = []
            for j, part in enumerate(self.content):
                if part.type not in ("text", "input_text") or part.text is None:
                    raise RequestInvalid(
                        f"{where}.content[{j}].type: {part.type!r} content is not supported (text only)",
                        f"{where}.content[{j}].type",
                    )
                texts.append(part.text)
            out["content"] = "".join(texts)
        return out


class ResponseFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    type: Literal["text", "json_object", "json_schema"] = "text"


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    max_tokens: int | None = Field(None, ge=1, le=_INT32)
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    max_completion_tokens: int | None = Field(None, ge=1, le=_INT32)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    # vLLM / SGLang extensions for the chat template.
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    def check(self) -> None:
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestInvalid("top_logprobs: requires logprobs to be true", "top_logprobs")
        if self.response_format is not None and self.response_format.type != "text":
            raise RequestInvalid(
                f"response_format.type: {self.response_format.type!r} is not supported (only 'text')",
                "response_format.type",
            )
        if self.add_generation_prompt and self.continue_final_message:
            raise RequestInvalid(
                "continue_final_message: cannot be combined with add_generation_prompt", "continue_final_message"
            )

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def top_logprobs_k(self) -> int:
        """Alternatives per generated token to ask for."""
        return (self.top_logprobs or 0) if self.logprobs else 0

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.for_template(f"messages[{i}]") for i, m in enumerate(self.messages)]


# ---- results -------------------------------------------------------------------


# One position's alternatives: (token string, logprob), most likely first.
