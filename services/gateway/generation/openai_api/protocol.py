"""OpenAI's `/v1/completions` and `/v1/chat/completions` bodies, translated to
InferenceService.Generate requests, and the results back into OpenAI's JSON.

Requests are validated strictly (a bool is not an integer) and every problem names its
field, as OpenAI's `param` does. Parameters the engine cannot honour are refused with
400 when ignoring them would change the result (`logit_bias`, `suffix`, `best_of` > n,
structured `response_format`). `presence_penalty` and `frequency_penalty` (and the
SGLang/vLLM extension `repetition_penalty`) go to the engine, which applies them to the
choice of token (SamplingParams documents the semantics).

Logprobs are the policy's own (before temperature, top-k and top-p), the sampled
token's and its alternatives alike, from the engine's top-k logprobs (at most 20 per
position). Chat: `logprobs: true, top_logprobs: k` gives each `logprobs.content[j]`
the k most likely tokens, most likely first, as `{token, logprob, bytes}`. Legacy
completions: `logprobs: k` gives each `top_logprobs[j]` a `{token: logprob}` dict of
the k most likely tokens plus the sampled one (k or k + 1 entries, as OpenAI: 0 gives
the sampled token alone); with `echo`, the prompt positions too (None for the first).
A token's string is the token decoded alone, special tokens kept. Should the engine
return no alternatives for a position (an inference service that predates them), that
position lists the sampled token alone.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

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
Alternatives = list[tuple[str, float]]


class TokenStrings:
    """Token id -> the token's string as logprobs show it (decoded alone, special
    tokens kept), each id decoded once: alternatives name the same few ids over and
    over. Tokenizer thread only."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def alternatives(self, tops: Sequence[pb.TopLogprobs], count: int, k: int) -> list[Alternatives | None]:
        """The k most likely tokens at each of `count` positions (None where `tops`
        has no entry)."""
        out: list[Alternatives | None] = []
        for i in range(count):
            top = tops[i] if i < len(tops) else None
            if top is None or not top.token_ids:
                out.append(None)
            else:
                out.append([(self(t), lp) for t, lp in zip(top.token_ids[:k], top.logprobs[:k])])
        return out


@dataclass
class Rendered:
    """One sample, decoded: what both routes' choices are built from."""

    text: str
    finish_reason: str | None
    matched_stop: int | str | None
    # Per kept token (the ones the text covers): id, logprob, token string, text piece.
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    # Per kept token, its alternatives (token string, logprob), most likely first, when
    # top logprobs were asked for; None where the engine sent none.
    alternatives: list[Alternatives | None] = field(default_factory=list)
    completion_tokens: int = 0


def matched_stop(completion: pb.Completion, stops: list[str]) -> int | str | None:
    if completion.finish_reason != pb.FINISH_REASON_STOP:
        return None
    matched = completion.matched_stop
    if matched in stops:
        return matched
    if matched.lstrip("-").isdigit():
        return int(matched)
    return completion.output_ids[-1] if completion.output_ids else None


def stop_cut(text: str, completion: pb.Completion, stops: list[str], no_stop_trim: bool) -> int | None:
    """Where the text ends when a stop string ended the sample: OpenAI leaves the stop
    string out."""
    matched = completion.matched_stop
    if no_stop_trim or completion.finish_reason != pb.FINISH_REASON_STOP or matched not in stops:
        return None
    cut = text.find(matched)
    return cut if cut >= 0 else None


def render(
    tokenizer: Any,
    completion: pb.Completion,
    stops: list[str],
    skip_special: bool,
    no_stop_trim: bool,
    with_tokens: bool,
    top_logprobs: int = 0,
    strings: TokenStrings | None = None,
) -> Rendered:
    """Decode a Completion (runs in the tokenizer thread). With a stop string the text
    is cut before it and the tokens past the cut are left out of the logprobs. With
    `top_logprobs` k, each kept token's k most likely alternatives too."""
    ids = list(completion.output_ids)
    text = tokenizer.decode(ids, skip_special_tokens=skip_special)
    cut = stop_cut(text, completion, stops, no_stop_trim)
    if cut is not None:
        text = text[:cut]
    out = Rendered(
        text=text,
        finish_reason=FINISH_REASONS.get(completion.finish_reason),
        matched_stop=matched_stop(completion, stops),
        completion_tokens=len(ids),
    )
    if with_tokens:
        strings = strings or TokenStrings(tokenizer)
        offset = 0
        for tok, lp in zip(ids, completion.output_logprobs):
            if cut is not None and offset >= cut:
                break
            piece = tokenizer.decode([tok], skip_special_tokens=skip_special)
            out.token_ids.append(tok)
            out.logprobs.append(lp)
            out.tokens.append(strings(tok))
            out.pieces.append(piece)
            offset += len(piece)
        if top_logprobs > 0:
            out.alternatives = strings.alternatives(completion.output_top_logprobs, len(out.token_ids), top_logprobs)
    return out


def token_strings(
    tokenizer: Any, ids: list[int], skip_special: bool, strings: TokenStrings | None = None
) -> tuple[list[str], list[str]]:
    """(token strings, text pieces) of ids, for logprobs (tokenizer thread)."""
    strings = strings or TokenStrings(tokenizer)
    return (
        [strings(t) for t in ids],
        [tokenizer.decode([t], skip_special_tokens=skip_special) for t in ids],
    )


def stream_tokens(
    strings: TokenStrings, ids: list[int], skip_special: bool, tops: Sequence[pb.TopLogprobs], k: int
) -> tuple[list[str], list[str], list[Alternatives | None] | None]:
    """(token strings, text pieces, alternatives or None) of a streamed run of tokens
    whose top logprobs are `tops` (tokenizer thread)."""
    tokens, pieces = token_strings(strings.tokenizer, ids, skip_special, strings)
    return tokens, pieces, strings.alternatives(tops, len(ids), k) if k > 0 else None


def _chat_token(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def chat_logprobs(
    tokens: list[str],
    logprobs: list[float],
    top: int | None,
    alternatives: Sequence[Alternatives | None] | None = None,
) -> dict[str, Any]:
    """`choices[i].logprobs` of a chat completion: per token its `top` most likely
    alternatives (the sampled token alone where `alternatives` has none)."""
    content = []
    for j, (tok, lp) in enumerate(zip(tokens, logprobs)):
        entry = _chat_token(tok, lp)
        alts = alternatives[j] if alternatives is not None and j < len(alternatives) else None
        if not top:
            entry["top_logprobs"] = []
        elif alts is None:
            entry["top_logprobs"] = [_chat_token(tok, lp)]
        else:
            entry["top_logprobs"] = [_chat_token(t, v) for t, v in alts[:top]]
        content.append(entry)
    return {"content": content, "refusal": None}


def _legacy_top(token: str, logprob: float, alts: Alternatives | None) -> dict[str, float]:
    """One position of a legacy completion's top_logprobs: the alternatives, most
    likely first, then the sampled token if it is not among them (a token string two
    ids share keeps the likelier one's logprob)."""
    out: dict[str, float] = {}
    for t, v in alts or ():
        out.setdefault(t, v)
    out.setdefault(token, logprob)
    return out


def completion_logprobs(
    tokens: list[str],
    pieces: list[str],
    logprobs: list[float | None],
    start_offset: int = 0,
    alternatives: Sequence[Alternatives | None] | None = None,
) -> dict[str, Any]:
    """`choices[i].logprobs` of a legacy completion; a None logprob (the first prompt
    token of an echo) has no top entry."""
    offsets = []
    at = start_offset
    for piece in pieces:
        offsets.append(at)
        at += len(piece)
    alts = list(alternatives or ())
    alts += [None] * (len(tokens) - len(alts))
    return {
        "tokens": list(tokens),
        "token_logprobs": list(logprobs),
        "top_logprobs": [
            None if lp is None else _legacy_top(tok, lp, alt) for tok, lp, alt in zip(tokens, logprobs, alts)
        ],
        "text_offset": offsets,
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class StreamText:
    """Text deltas of one streamed sample. Holds back what could still turn out to be
    the start of a stop string (OpenAI never sends the stop string) and a trailing
    replacement character (half of a multi-byte character)."""

    def __init__(self, stops: list[str], no_stop_trim: bool = False) -> None:
        self.stops = [] if no_stop_trim else stops
        self.sent = 0

    def _held(self, text: str) -> int:
        """Length of the longest end of `text` that begins some stop string."""
        held = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), held, -1):
                if text.endswith(stop[:k]):
                    held = k
                    break
        return held

    def update(self, text: str) -> str:
        cuts = [p for s in self.stops if (p := text.find(s)) >= 0]
        if cuts:
            safe = min(cuts)
        else:
            safe = len(text) - self._held(text)
            if text.endswith("\ufffd"):
                safe = min(safe, len(text) - 1)
        if safe <= self.sent:
            return ""
        delta = text[self.sent : safe]
        self.sent = safe
        return delta

    def final(self, text: str) -> str:
        delta = text[self.sent :]
        self.sent = max(self.sent, len(text))
        return delta
