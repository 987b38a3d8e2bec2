"""The generation engine's request and result types, free of protobuf so the engine can
be driven and tested without gRPC (the servicer converts at the edge)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Sequence


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


@dataclass(frozen=True)
class GenerationRequest:
    input_ids: Sequence[int]
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    return_prompt_logprobs: bool = False
    stream: bool = False
    request_id: str = ""


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


@dataclass(frozen=True)
class PolicyState:
    """The served policy: version 0 is the loaded weights, each commit adds one."""

    version: int = 0
    committed_at: float = 0.0
    step: int = 0
