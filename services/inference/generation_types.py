"""The generation engine's request and result types, free of protobuf so the engine can
be driven and tested without gRPC (the servicer converts at the edge)."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field


class FinishReason(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass(frozen=True)
class SamplingOptions:
    """Per-request sampling; `max_new_tokens=None` takes the engine's default."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    n: int = 1
    ignore_eos: bool = False
    seed: int | None = None
    # Penalties (proto SamplingParams has the exact semantics): frequency/presence over
    # the tokens generated so far in the sample, repetition over prompt + output. They
    # shape only the choice of token, never the reported logprobs.
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0

    @property
    def penalised(self) -> bool:
        return self.frequency_penalty != 0 or self.presence_penalty != 0 or self.repetition_penalty != 1


# The most alternatives a request may ask for per position (OpenAI's bound on
# `top_logprobs`), for generated tokens and prompt positions alike.
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class GenerationRequest:
    """`top_logprobs` > 0 also returns, per generated token, that many most likely tokens;
    `prompt_top_logprobs` > 0 the same per prompt position (and implies the prompt
    logprobs). Both under the policy's own distribution, as the sampled logprobs are."""

    input_ids: Sequence[int]
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    return_prompt_logprobs: bool = False
    stream: bool = False
    request_id: str = ""
    top_logprobs: int = 0
    prompt_top_logprobs: int = 0

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.return_prompt_logprobs or self.prompt_top_logprobs > 0


@dataclass(frozen=True)
class TopLogprobs:
    """The most likely tokens at one position, most likely first (empty where a position
    has no prediction: the first prompt token)."""

    token_ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] = ()


@dataclass(frozen=True)
class VersionSpan:
    """Generated tokens from index `start_token` on came from policy `version`."""

    start_token: int
    version: int


@dataclass(frozen=True)
class TokenChunk:
    """Tokens one decode step added to sample `index` (streaming only)."""

    index: int
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    version: int
    # One per token when the request asked for top_logprobs, else empty.
    top_logprobs: tuple[TopLogprobs, ...] = ()


@dataclass(frozen=True)
class Completion:
    """The final result of sample `index`."""

    index: int
    output_ids: tuple[int, ...]
    output_logprobs: tuple[float, ...]
    finish_reason: FinishReason
    matched_stop: str
    version_spans: tuple[VersionSpan, ...]
    prompt_logprobs: tuple[float, ...]
    prompt_tokens: int
    # One per output token when the request asked for top_logprobs, else empty.
    output_top_logprobs: tuple[TopLogprobs, ...] = ()
    # One per prompt token (the first empty) when it asked for prompt_top_logprobs.
    prompt_top_logprobs: tuple[TopLogprobs, ...] = ()
    # time.monotonic() in the serving process when the sample's first output token was
    # sampled; 0.0 when unknown (no token, or an engine that does not say).
    first_token_at: float = 0.0


@dataclass(frozen=True)
class ServedPolicy:
    """The served policy: version 0 is the loaded weights, each commit adds one."""

    version: int = 0
    committed_at: float = 0.0
    step: int = 0
