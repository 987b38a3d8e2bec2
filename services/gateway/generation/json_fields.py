"""Checked reads of a JSON request object's fields, with errors that name the field:
what SGLang's and vLLM's /generate dialects (sglang_api/protocol.py,
vllm_api/protocol.py) share."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from services.common.errors import InvalidArgument

INT32_MAX = 2**31 - 1
UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class Fields:
    """The fields of `params`; errors name them as `<where>.<key>` (or `<key>`)."""

    def __init__(self, params: Mapping[str, Any], where: str = "") -> None:
        self.params = params
        self.prefix = f"{where}." if where else ""

    def number(self, key: str, lo: float, hi: float | None = None, lo_open: bool = False) -> float | None:
        """A number in [lo, hi] ((lo, hi] with lo_open), or None when absent."""
        value = self.params.get(key)
        if value is None:
            return None
        if not is_number(value):
            raise InvalidArgument(f"{self.prefix}{key} must be a number, got {value!r}")
        if value < lo or (lo_open and value == lo) or (hi is not None and value > hi):
            if lo_open:
                bound = f"({lo}, {hi}]" if hi is not None else f"({lo}, inf)"
            else:
                bound = f"[{lo}, {hi if hi is not None else 'inf'}]"
            raise InvalidArgument(f"{self.prefix}{key} must be in {bound}, got {value}")
        return value

    def integer(self, key: str, lo: int, hi: int) -> int | None:
        """An integer in [lo, hi], or None when absent."""
        value = self.params.get(key)
        if value is None:
            return None
        if not is_int(value):
            raise InvalidArgument(f"{self.prefix}{key} must be an integer, got {value!r}")
        if not lo <= value <= hi:
            raise InvalidArgument(f"{self.prefix}{key} must be between {lo} and {hi}, got {value}")
        return value

    def flag(self, key: str, default: bool) -> bool:
        """A boolean, `default` when absent."""
        value = self.params.get(key, default)
        if not isinstance(value, bool):
            raise InvalidArgument(f"{self.prefix}{key} must be true or false, got {value!r}")
        return value

    def strings(self, key: str) -> list[str]:
        """A string or a list of strings, as a list ([] when absent)."""
        value = self.params.get(key)
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(s, str) for s in value):
            return list(value)
        raise InvalidArgument(f"{self.prefix}{key} must be a string or a list of strings, got {value!r}")


def read_sampling(fields: Fields, out: Any, seed_key: str = "seed") -> None:
    """The sampling fields both /generate dialects spell alike, checked and set on `out`
    (a clotho.v1.SamplingParams): temperature, top_p, top_k (-1 or 0: all tokens, left
    unset), the three penalties and the seed (under `seed_key`)."""
    if (v := fields.number("temperature", 0.0)) is not None:
        out.temperature = v
    if (v := fields.number("top_p", 0.0, 1.0, lo_open=True)) is not None:
        out.top_p = v
    if (v := fields.integer("top_k", -1, INT32_MAX)) is not None and v > 0:
        out.top_k = v
    for key in ("frequency_penalty", "presence_penalty"):
        if (v := fields.number(key, -2.0, 2.0)) is not None:
            setattr(out, key, v)
    if (v := fields.number("repetition_penalty", 0.0, lo_open=True)) is not None:
        out.repetition_penalty = v
    if (v := fields.integer(seed_key, 0, UINT64_MAX)) is not None:
        out.seed = v
