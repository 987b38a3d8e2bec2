"""Checks every engine applies to a request before accepting it."""

from __future__ import annotations

import math

from services.common.errors import InvalidArgument
from services.inference.generation_types import MAX_TOP_LOGPROBS, GenerationRequest


def resolve_max_new_tokens(
    request: GenerationRequest,
    *,
    vocab_size: int,
    max_context_len: int,
    max_n: int,
    default_max_new_tokens: int,
) -> int:
    """Raise InvalidArgument naming what is wrong with `request`; otherwise return its
    max_new_tokens (the default, clamped to the context, when unset)."""
    ids = request.input_ids
    if len(ids) == 0:
        raise InvalidArgument("input_ids is empty: a prompt needs at least one token")
    for i, t in enumerate(ids):
        if not 0 <= t < vocab_size:
            raise InvalidArgument(f"input_ids[{i}] = {t} is outside the vocabulary [0, {vocab_size})")
    opts = request.sampling
    if not (math.isfinite(opts.temperature) and opts.temperature >= 0):
        raise InvalidArgument(f"temperature must be >= 0, got {opts.temperature}")
    if not 0 < opts.top_p <= 1:
        raise InvalidArgument(f"top_p must be in (0, 1], got {opts.top_p}")
    if opts.top_k < 0:
        raise InvalidArgument(f"top_k must be >= 0, got {opts.top_k}")
    for name in ("frequency_penalty", "presence_penalty"):
        value = getattr(opts, name)
        if not -2 <= value <= 2:  # NaN fails too
            raise InvalidArgument(f"{name} must be in [-2, 2], got {value}")
    if not (math.isfinite(opts.repetition_penalty) and opts.repetition_penalty > 0):
        raise InvalidArgument(f"repetition_penalty must be a finite number > 0, got {opts.repetition_penalty}")
    if not 1 <= opts.n <= max_n:
        raise InvalidArgument(f"n must be between 1 and max_batch_size {max_n}, got {opts.n}")
    for name, k in (("top_logprobs", request.top_logprobs), ("prompt_top_logprobs", request.prompt_top_logprobs)):
        if not 0 <= k <= MAX_TOP_LOGPROBS:
            raise InvalidArgument(f"{name} must be between 0 and {MAX_TOP_LOGPROBS}, got {k}")
    room = max_context_len - len(ids)
    if room < 0:
        raise InvalidArgument(f"prompt has {len(ids)} tokens, more than max_context_len {max_context_len}")
    if opts.max_new_tokens is None:
        return min(default_max_new_tokens, room)
    if opts.max_new_tokens > room:
        raise InvalidArgument(
            f"prompt ({len(ids)} tokens) + max_new_tokens ({opts.max_new_tokens}) exceeds "
            f"max_context_len {max_context_len}"
        )
    return opts.max_new_tokens
