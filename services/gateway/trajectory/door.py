"""What the gateway refuses at the door because no trainer could train on it.

Atropos' `run-api` checks only types; Clotho's door checks types too (scored_data.py)
and, on every way in (`/scored_data`, `/scored_data_list`, GatewayService
SubmitScoredData; the C fast path declines whatever this module would refuse), what
would poison training:

- a number that is not finite (NaN, Infinity; Python's json even spells them as
  invalid JSON) in scores, per-token fields, distillation logprobs or a free-form field;
- a token id that is negative, or not below the vocabulary size the gateway learned
  from the inference service (`GetModelInfo`; without one only negatives are refused);
- an empty sequence; a group with more sequences than the trainer's batch size (no
  batch could ever hold it: batch formation would stop for good);
- a negative env_id (it would index the environments from the end).

Each problem names its field and index, as the shape checks do.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

# Token ids travel as int32 (ScoredSequence): the bound when no vocabulary is known.
INT32_LIMIT = 2**31

_FLOAT_ROWS = {"advantages": 2, "ref_logprobs": 2, "inference_logprobs": 2, "distill_logprobs": 3}
_FREE_FORM = ("messages", "generation_params", "overrides", "group_overrides", "images")


@dataclass(frozen=True, slots=True)
class DoorLimits:
    """What the door checks groups against (TrajectoryState.limits)."""

    # The model's vocabulary size, from InferenceService.GetModelInfo (None: unknown).
    vocab_size: int | None = None
    # The trainer's batch size (None: no trainer registered yet).
    batch_size: int | None = None

    @property
    def token_limit(self) -> int:
        """Token ids must be below this."""
        return self.vocab_size if self.vocab_size else INT32_LIMIT


def _bad_floats(rows: Any, depth: int, path: str) -> Iterator[str]:
    if depth == 1:
        for i, x in enumerate(rows):
            if not math.isfinite(x):
                yield f"{path}[{i}] is {x}: numbers must be finite"
        return
    for i, row in enumerate(rows):
        yield from _bad_floats(row, depth - 1, f"{path}[{i}]")


def _bad_json_numbers(value: Any, path: str, depth: int = 0) -> Iterator[str]:
    if isinstance(value, float):
        if not math.isfinite(value):
            yield f"{path} is {value}: numbers must be finite"
    elif depth > 200:  # deeper than any JSON parser here accepts; nothing to walk
        return
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _bad_json_numbers(item, f"{path}.{key}", depth + 1)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _bad_json_numbers(item, f"{path}[{i}]", depth + 1)


def _first(problems: Iterable[str], limit: int = 20) -> list[str]:
    out = []
    for problem in problems:
        out.append(problem)
        if len(out) >= limit:
            break
    return out


def door_problems(group: dict[str, Any], limits: DoorLimits, prefix: str = "") -> list[str]:
    """What in a group dict (types already checked) no trainer could train on."""
    p = prefix
    problems: list[str] = []
    limit = limits.token_limit
    tokens = group["tokens"]
    for i, row in enumerate(tokens):
        if not row:
            problems.append(f"{p}tokens[{i}] is empty: a sequence needs at least one token")
            continue
        low, high = min(row), max(row)
        if low < 0 or high >= limit:
            j, t = next((j, t) for j, t in enumerate(row) if t < 0 or t >= limit)
            if t < 0:
                problems.append(f"{p}tokens[{i}][{j}] is {t}: token ids are not negative")
            else:
                problems.append(f"{p}tokens[{i}][{j}] is {t}: outside the model's vocabulary [0, {limit})")
    problems += _first(_bad_floats(group["scores"], 1, f"{p}scores"))
    for name, depth in _FLOAT_ROWS.items():
        value = group.get(name)
        if value:
            problems += _first(_bad_floats(value, depth, f"{p}{name}"))
    for name in _FREE_FORM:
        value = group.get(name)
        if value is not None:
            problems += _first(_bad_json_numbers(value, f"{p}{name}"))
    problems += env_id_problems(group.get("env_id"), prefix)
    problems += size_problems(len(tokens), limits, prefix)
    return problems


def size_problems(size: int, limits: DoorLimits, prefix: str = "") -> list[str]:
    """A group no batch can hold (more sequences than the trainer's batch size)."""
    if limits.batch_size is not None and size > limits.batch_size:
        return [
            f"{prefix}tokens has {size} sequences but the trainer's batch size is {limits.batch_size}: "
            "no batch could hold the group"
        ]
    return []


def env_id_problems(env_id: int | None, prefix: str = "") -> list[str]:
    """An env_id that is negative (it would index from the end) or beyond int64."""
    if env_id is not None and env_id < 0:
        return [f"{prefix}env_id is {env_id}: environment ids are not negative"]
    if env_id is not None and env_id >= 2**63:
        return [f"{prefix}env_id is {env_id}: environment ids are below 2**63"]
    return []
