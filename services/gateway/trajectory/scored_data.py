"""Atropos `ScoredData` groups: parsing, validation, and the dict form the store keeps.

A group is kept as the same dict Atropos' server builds (every Atropos key present,
None when absent), so `/batch` answers byte for byte what Atropos would. Parsing
accepts what Atropos' pydantic model accepts (lax types) and then checks what Atropos
does not. Every problem names its field and index.

Two levels of checking:
- `parse_scored_data` / `group_problems`: a well-formed group, every per-sequence
  length agreeing (the C fast path takes only such groups).
- The door (`read_group`, `read_group_list`, `admit_group`: what the ingest routes
  and SubmitScoredData take): as lenient as `run-api` on the optional fields
  (advantages, ref_logprobs, inference_logprobs, messages, overrides, distill_*
  whose lengths disagree with tokens are kept and returned by `/batch` as sent; the
  trainer decides per sequence what it can use of them), strict where the data would
  poison training: masks and scores must line up with tokens (they decide what is
  trained on and how), and `door.door_problems` (non-finite numbers, token ids outside
  the vocabulary, empty sequences, groups larger than a batch, negative env ids).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import orjson
from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from services.common.errors import InvalidArgument
from services.gateway.field_paths import field_path
from services.gateway.trajectory.door import DoorLimits, door_problems, env_id_problems, size_problems
from services.gateway.trajectory.receipts import completion_tokens

try:  # the C fast path (_scored_fast.c), built by `pip install`
    from services.gateway.trajectory import _scored_fast
except ImportError:  # pragma: no cover - an install without a C compiler
    _scored_fast = None

log = logging.getLogger(__name__)

# Token ids and labels travel as int32 in ScoredSequence; checking the range at the
# door keeps a batch from failing to encode later.
Int32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]

# The keys of Atropos' group dict, in Atropos' order.
ATROPOS_KEYS = (
    "tokens",
    "masks",
    "scores",
    "advantages",
    "ref_logprobs",
    "messages",
    "generation_params",
    "inference_logprobs",
    "overrides",
    "group_overrides",
    "images",
    "env_id",
    "distill_token_ids",
    "distill_logprobs",
)
# Clotho's extension: the policy version of each sequence (None where unknown). Only
# present in a group dict when some sequence carries one.
POLICY_VERSIONS = "policy_versions"

# Optional per-sequence fields whose entries are per-token lists.
PER_TOKEN_FIELDS = ("advantages", "ref_logprobs", "inference_logprobs")
# Optional fields with one entry per sequence (the names `present_fields` uses).
PER_SEQUENCE_FIELDS = (
    "advantages",
    "ref_logprobs",
    "inference_logprobs",
    "messages",
    "overrides",
    "distill_token_ids",
    "distill_logprobs",
)


class ScoredData(BaseModel):
    """Atropos' ScoredData request body, plus Clotho's optional `policy_versions`."""

    tokens: list[list[Int32]]
    masks: list[list[Int32]]
    scores: list[float]
    advantages: list[list[float]] | None = None
    ref_logprobs: list[list[float]] | None = None
    messages: list[list[dict[str, Any]]] | None = None
    generation_params: dict[str, Any] | None = None
    inference_logprobs: list[list[float]] | None = None
    overrides: list[dict] | None = None
    group_overrides: dict | None = None
    images: Any | None = None
    env_id: int | None = None
    distill_token_ids: list[list[list[Int32]]] | None = None
    distill_logprobs: list[list[list[float]]] | None = None
    policy_versions: list[Annotated[int, Field(ge=0, le=2**64 - 1)] | None] | None = None


_ONE = TypeAdapter(ScoredData)
_MANY = TypeAdapter(list[ScoredData])


class ScoredDataInvalid(InvalidArgument):
    """A submission that is not a valid group; `problems` names each bad field."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        shown = "; ".join(problems[:5])
        if len(problems) > 5:
            shown += f"; and {len(problems) - 5} more"
        super().__init__(shown)


def _pydantic_problems(exc: ValidationError, prefix: str = "") -> list[str]:
    problems = []
    for err in exc.errors(include_url=False):
        path = field_path(err["loc"])
        where = f"{prefix}{path}" if path else (prefix.rstrip(".") or "body")
        problems.append(f"{where}: {err['msg']}")
    return problems


def to_group(data: ScoredData) -> dict[str, Any]:
    """The dict Atropos keeps for a group (every Atropos key, None when absent)."""
    group = {key: getattr(data, key) for key in ATROPOS_KEYS}
    if data.policy_versions is not None:
        group[POLICY_VERSIONS] = data.policy_versions
    return group


# orjson and Python's json (Starlette's JSONResponse, hence Atropos' /batch) write a
# few floats differently: orjson 1e-5 as 0.00001 and 1e-7 as 1e-7, Python 1e-05 and
# 1e-07 (they agree elsewhere, 1e+16 included). Logprobs of confident tokens are such
# floats, so the fix is per list of floats, not a slow re-encode of the whole group.
_FLOAT_FIELDS = {"scores": 1, "advantages": 2, "ref_logprobs": 2, "inference_logprobs": 2, "distill_logprobs": 3}
_FREE_FORM_FIELDS = ("messages", "generation_params", "overrides", "group_overrides", "images")


def _may_differ(encoded: bytes) -> bool:
    # A superset of the patterns: "e-" also matches words in strings (then json is
    # used for that field: slower, still exact).
    return b"0.0000" in encoded or b"e-" in encoded


def _floats_json(value: list, depth: int) -> bytes:
    if depth > 1:
        return b"[" + b",".join(_floats_json(v, depth - 1) for v in value) + b"]"
    encoded = orjson.dumps(value)
    if not _may_differ(encoded):
        return encoded
    # Validated float lists hold floats only: repr is exactly what json writes.
    return ("[" + ",".join(map(repr, value)) + "]").encode()


def encode_group(group: dict[str, Any]) -> bytes:
    """A group as Atropos' `/batch` writes it inside the batch, byte for byte (compact
    JSON, UTF-8 unescaped)."""
    try:
        # tokens and masks come first and are integers: only the rest can hold a
        # float that needs fixing, so only the rest is searched.
        head = orjson.dumps({"tokens": group["tokens"], "masks": group["masks"]})
        rest = {key: value for key, value in group.items() if key != "tokens" and key != "masks"}
        tail = orjson.dumps(rest)
    except TypeError:  # an integer beyond 64 bits in a free-form field
        return json.dumps(group, ensure_ascii=False, separators=(",", ":")).encode()
    if _may_differ(tail):
        for key, depth in _FLOAT_FIELDS.items():
            if rest.get(key) is not None:
                rest[key] = orjson.Fragment(_floats_json(rest[key], depth))
        for key in _FREE_FORM_FIELDS:
            if rest.get(key) is not None and _may_differ(orjson.dumps(rest[key])):
                rest[key] = orjson.Fragment(json.dumps(rest[key], ensure_ascii=False, separators=(",", ":")).encode())
        tail = orjson.dumps(rest)
    return b"".join((head[:-1], b",", tail[1:])) if len(tail) > 2 else head


def group_problems(group: dict[str, Any], prefix: str = "", optional: bool = True) -> list[str]:
    """Everything wrong with a group dict whose fields already have the right types.
    With optional=False, only what `run-api` refuses too or what decides training
    (masks and scores per sequence, messages' role and content, Clotho's
    policy_versions): the optional fields' lengths are not checked."""
    p = prefix
    problems: list[str] = []
    tokens = group["tokens"]
    n = len(tokens)
    if n == 0:
        problems.append(f"{p}tokens: a group needs at least one sequence")

    def per_sequence(name: str, optional: bool = True) -> list | None:
        value = group.get(name)
        if optional and value is not None and len(value) == 0 and n > 0:
            # An empty list means none given: Atropos' BaseEnv.collect_trajectories
            # starts advantages, ref_logprobs, messages and overrides as [] and appends
            # only what the rollouts returned. Kept as sent; absent for trainers.
            return None
        if value is not None and len(value) != n:
            problems.append(f"{p}{name} has {len(value)} entries but tokens has {n} (one per sequence)")
            return None
        return value

    masks = per_sequence("masks", optional=False)
    if masks is not None:
        for i, (toks, mask) in enumerate(zip(tokens, masks)):
            if len(mask) != len(toks):
                problems.append(f"{p}masks[{i}] has {len(mask)} entries but tokens[{i}] has {len(toks)}")
    per_sequence("scores", optional=False)
    for name in PER_TOKEN_FIELDS:
        values = per_sequence(name) if optional else None
        if values is None:
            continue
        for i, (toks, row) in enumerate(zip(tokens, values)):
            if len(row) != len(toks):
                problems.append(f"{p}{name}[{i}] has {len(row)} entries but tokens[{i}] has {len(toks)}")
    messages = per_sequence("messages") if optional else group.get("messages")
    if messages is not None:
        for i, chat in enumerate(messages):
            for j, message in enumerate(chat):
                if "role" not in message or "content" not in message:
                    problems.append(f"{p}messages[{i}][{j}] must have 'role' and 'content' fields")
    per_sequence(POLICY_VERSIONS)
    if not optional:
        return problems
    per_sequence("overrides")
    ids = per_sequence("distill_token_ids")
    logprobs = per_sequence("distill_logprobs")
    if ids is not None and logprobs is not None:
        for i, (id_rows, lp_rows) in enumerate(zip(ids, logprobs)):
            if len(id_rows) != len(lp_rows):
                problems.append(
                    f"{p}distill_logprobs[{i}] has {len(lp_rows)} positions but "
                    f"distill_token_ids[{i}] has {len(id_rows)}"
                )
                continue
            for k, (id_row, lp_row) in enumerate(zip(id_rows, lp_rows)):
                if len(id_row) != len(lp_row):
                    problems.append(
                        f"{p}distill_logprobs[{i}][{k}] has {len(lp_row)} entries but "
                        f"distill_token_ids[{i}][{k}] has {len(id_row)}"
                    )
    return problems


def check_group(group: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Return `group` unchanged, or raise ScoredDataInvalid naming what is wrong."""
    problems = group_problems(group, prefix)
    if problems:
        raise ScoredDataInvalid(problems)
    return group


def parse_scored_data(body: bytes) -> dict[str, Any]:
    """One group from a `/scored_data` JSON body."""
    try:
        data = _ONE.validate_json(body)
    except ValidationError as exc:
        raise ScoredDataInvalid(_pydantic_problems(exc)) from None
    return check_group(to_group(data))


def parse_scored_data_list(body: bytes) -> list[dict[str, Any]]:
    """Every group of a `/scored_data_list` JSON body; one bad group rejects them all."""
    try:
        items = _MANY.validate_json(body)
    except ValidationError as exc:
        raise ScoredDataInvalid(_pydantic_problems(exc)) from None
    groups = [to_group(item) for item in items]
    problems = [msg for i, g in enumerate(groups) for msg in group_problems(g, prefix=f"[{i}].")]
    if problems:
        raise ScoredDataInvalid(problems)
    return groups


# -- the door: what the ingest routes and SubmitScoredData take ----------------------


def admission_problems(group: dict[str, Any], limits: DoorLimits, prefix: str = "") -> list[str]:
    """What the door refuses in a group dict whose fields have the right types: the
    required fields' shape and what would poison training (module docstring)."""
    problems = group_problems(group, prefix, optional=False)
    poison = door_problems(group, limits, prefix) if group["tokens"] else []
    if problems or poison:
        # Refused anyway: name everything wrong, the optional fields' lengths too.
        return group_problems(group, prefix) + poison
    return problems


def admit_group(group: dict[str, Any], limits: DoorLimits, prefix: str = "") -> dict[str, Any]:
    """Return `group` unchanged, or raise ScoredDataInvalid naming what the door refuses."""
    problems = admission_problems(group, limits, prefix)
    if problems:
        raise ScoredDataInvalid(problems)
    return group


def admit_scored_data(body: bytes, limits: DoorLimits) -> dict[str, Any]:
    """One group from a `/scored_data` JSON body, as the door takes it."""
    try:
        data = _ONE.validate_json(body)
    except ValidationError as exc:
        raise ScoredDataInvalid(_pydantic_problems(exc)) from None
    return admit_group(to_group(data), limits)


def admit_scored_data_list(body: bytes, limits: DoorLimits) -> list[dict[str, Any]]:
    """Every group of a `/scored_data_list` JSON body, as the door takes them; one
    refused group refuses them all."""
    try:
        items = _MANY.validate_json(body)
    except ValidationError as exc:
        raise ScoredDataInvalid(_pydantic_problems(exc)) from None
    groups = [to_group(item) for item in items]
    problems = [msg for i, g in enumerate(groups) for msg in admission_problems(g, limits, prefix=f"[{i}].")]
    if problems:
        raise ScoredDataInvalid(problems)
    return groups


# -- what the trajectory state takes in ------------------------------------------


@dataclass(slots=True)
class Incoming:
    """A validated group, ready to be held: its bytes as `/batch` writes them and what
    the state needs to know without parsing them again."""

    body: bytes
    size: int
    env_id: int | None
    # The client's explicit version per sequence (None entries: unknown), if sent.
    policy_versions: Sequence[int | None] | None
    # Per sequence, the token ids the policy generated (mask != -100), for receipts;
    # None when the caller did not need them.
    completions: Sequence[tuple[int, ...]] | None


def incoming(group: dict[str, Any], want_completions: bool) -> Incoming:
    """An Incoming from a validated group dict (the pydantic and gRPC paths)."""
    completions = None
    if want_completions:
        completions = [completion_tokens(t, m) for t, m in zip(group["tokens"], group["masks"])]
    return Incoming(
        body=encode_group(group),
        size=len(group["tokens"]),
        env_id=group.get("env_id"),
        # [] means none given, as for every per-sequence field (group_problems).
        policy_versions=group.get(POLICY_VERSIONS) or None,
        completions=completions,
    )


def fast_path_available() -> bool:
    return _scored_fast is not None


def _size_checked(items: list[Incoming], limits: DoorLimits, many: bool) -> list[Incoming]:
    # What the C fast path leaves to its caller: the group's size against the batch.
    problems = [
        msg
        for i, item in enumerate(items)
        for msg in size_problems(item.size, limits, f"[{i}]." if many else "")
        + env_id_problems(item.env_id, f"[{i}]." if many else "")
    ]
    if problems:
        raise ScoredDataInvalid(problems)
    return items


def read_group(body: bytes, want_completions: bool, limits: DoorLimits | None = None) -> Incoming:
    """One `/scored_data` body as an Incoming, or ScoredDataInvalid naming what the
    door refuses. The C fast path takes what it can in one pass over the bytes (only
    well-formed groups that pass the door); whatever it declines (free-form fields,
    lax types, lengths run-api lets through, anything refused) goes through pydantic,
    which gives the same result or the error."""
    limits = limits if limits is not None else DoorLimits()
    if _scored_fast is not None:
        fast = _scored_fast.canonical_group(body, want_completions, limits.token_limit)
        if fast is not None:
            return _size_checked([Incoming(*fast)], limits, False)[0]
    return incoming(admit_scored_data(body, limits), want_completions)


def read_group_list(body: bytes, want_completions: bool, limits: DoorLimits | None = None) -> list[Incoming]:
    """Every group of a `/scored_data_list` body (one refused group refuses them all)."""
    limits = limits if limits is not None else DoorLimits()
    if _scored_fast is not None:
        fast = _scored_fast.canonical_groups(body, want_completions, limits.token_limit)
        if fast is not None:
            return _size_checked([Incoming(*item) for item in fast], limits, True)
    return [incoming(group, want_completions) for group in admit_scored_data_list(body, limits)]
