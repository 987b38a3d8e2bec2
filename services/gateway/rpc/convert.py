"""Atropos group dicts <-> clotho.v1.ScoredGroup.

Atropos marks an optional per-sequence field absent with None for the whole group;
ScoredSequence has no presence for repeated fields, so `present_fields` on every
sequence names the ones that were sent, and an empty list round-trips as an empty
list. Struct and Value carry JSON; their numbers are doubles, so an integral number
comes back as an int. Per-token floats are float32 on the wire.

A group the door took with an optional field whose length disagrees with tokens
(as run-api takes it, scored_data.py) travels as far as it goes: sequence i carries
entry i where there is one, and the field is named present on every sequence; the
trainer decides per sequence what it can use (services/trainer/batching.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import orjson
from google.protobuf import struct_pb2

from clotho.v1 import scored_data_pb2 as pb
from services.common.errors import InvalidArgument
from services.gateway.trajectory.scored_data import PER_SEQUENCE_FIELDS, POLICY_VERSIONS

if TYPE_CHECKING:
    from services.gateway.trajectory.queue_index import Group
    from services.gateway.trajectory.records import EnvRecord

_KNOWN_PRESENT = frozenset(PER_SEQUENCE_FIELDS)
# Doubles hold every integer up to 2**53 exactly; beyond that a number stays a float.
_EXACT_INT = 2**53


def _struct(value: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(value)
    return out


def _json_number(x: float) -> int | float:
    if x.is_integer() and abs(x) <= _EXACT_INT:
        return int(x)
    return x


def value_to_json(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return struct_to_json(value.struct_value)
    if kind == "list_value":
        return [value_to_json(v) for v in value.list_value.values]
    if kind == "number_value":
        return _json_number(value.number_value)
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    return None


def struct_to_json(struct: struct_pb2.Struct) -> dict[str, Any]:
    return {key: value_to_json(v) for key, v in struct.fields.items()}


def json_to_value(obj: Any) -> struct_pb2.Value:
    value = struct_pb2.Value()
    if obj is None:
        value.null_value = struct_pb2.NULL_VALUE
    elif isinstance(obj, bool):
        value.bool_value = obj
    elif isinstance(obj, (int, float)):
        value.number_value = obj
    elif isinstance(obj, str):
        value.string_value = obj
    elif isinstance(obj, dict):
        value.struct_value.SetInParent()  # so that {} is a struct, not an unset value
        value.struct_value.update(obj)
    elif isinstance(obj, (list, tuple)):
        value.list_value.SetInParent()
        value.list_value.extend(obj)
    else:
        raise TypeError(f"{type(obj).__name__} is not JSON")
    return value


def group_to_proto(group: dict[str, Any]) -> pb.ScoredGroup:
    """A validated Atropos group dict as a ScoredGroup."""
    # An empty per-sequence list is "none given" (scored_data.group_problems): absent.
    given = {name: group.get(name) or None for name in PER_SEQUENCE_FIELDS}
    present = [name for name, value in given.items() if value is not None]
    advantages = given["advantages"]
    ref_logprobs = given["ref_logprobs"]
    inference_logprobs = given["inference_logprobs"]
    messages = given["messages"]
    overrides = given["overrides"]
    distill_ids = given["distill_token_ids"]
    distill_lps = given["distill_logprobs"]
    versions = group.get(POLICY_VERSIONS) or None

    def entry(values: list | None, i: int) -> Any:
        return values[i] if values is not None and i < len(values) else None

    sequences = []
    for i, tokens in enumerate(group["tokens"]):
        seq = pb.ScoredSequence(
            tokens=tokens,
            masks=group["masks"][i],
            score=group["scores"][i],
            present_fields=present,
        )
        if (row := entry(advantages, i)) is not None:
            seq.advantages.extend(row)
        if (row := entry(ref_logprobs, i)) is not None:
            seq.ref_logprobs.extend(row)
        if (row := entry(inference_logprobs, i)) is not None:
            seq.inference_logprobs.extend(row)
        if (chat := entry(messages, i)) is not None:
            for message in chat:
                seq.messages.add().update(message)
        if (override := entry(overrides, i)) is not None:
            seq.overrides.SetInParent()
            seq.overrides.update(override)
        ids, lps = entry(distill_ids, i) or [], entry(distill_lps, i) or []
        for k in range(max(len(ids), len(lps))):
            seq.distill.add(token_ids=ids[k] if k < len(ids) else (), logprobs=lps[k] if k < len(lps) else ())
        if versions is not None and versions[i] is not None:
            seq.policy_version = versions[i]
        sequences.append(seq)

    out = pb.ScoredGroup(sequences=sequences)
    if group.get("env_id") is not None:
        out.env_id = group["env_id"]
    if group.get("generation_params") is not None:
        out.generation_params.CopyFrom(_struct(group["generation_params"]))
    if group.get("group_overrides") is not None:
        out.group_overrides.CopyFrom(_struct(group["group_overrides"]))
    if group.get("images") is not None:
        out.images.CopyFrom(json_to_value(group["images"]))
    return out


def group_from_proto(msg: pb.ScoredGroup) -> dict[str, Any]:
    """A ScoredGroup as the Atropos group dict (field types as the proto gives them;
    callers check it with scored_data.admit_group)."""
    sequences = list(msg.sequences)
    present: set[str] = set()
    for i, seq in enumerate(sequences):
        unknown = set(seq.present_fields) - _KNOWN_PRESENT
        if unknown:
            raise InvalidArgument(
                f"sequences[{i}].present_fields names unknown field(s) {sorted(unknown)}; "
                f"known: {sorted(_KNOWN_PRESENT)}"
            )
        present.update(seq.present_fields)
        # A client that fills a list but forgets present_fields still means it.
        if seq.advantages:
            present.add("advantages")
        if seq.ref_logprobs:
            present.add("ref_logprobs")
        if seq.inference_logprobs:
            present.add("inference_logprobs")
        if seq.messages:
            present.add("messages")
        if seq.HasField("overrides"):
            present.add("overrides")
        if any(d.token_ids for d in seq.distill):
            present.add("distill_token_ids")
        if any(d.logprobs for d in seq.distill):
            present.add("distill_logprobs")

    def column(name: str, get) -> list | None:
        return [get(seq) for seq in sequences] if name in present else None

    group: dict[str, Any] = {
        "tokens": [list(seq.tokens) for seq in sequences],
        "masks": [list(seq.masks) for seq in sequences],
        "scores": [seq.score for seq in sequences],
        "advantages": column("advantages", lambda s: list(s.advantages)),
        "ref_logprobs": column("ref_logprobs", lambda s: list(s.ref_logprobs)),
        "messages": column("messages", lambda s: [struct_to_json(m) for m in s.messages]),
        "generation_params": struct_to_json(msg.generation_params) if msg.HasField("generation_params") else None,
        "inference_logprobs": column("inference_logprobs", lambda s: list(s.inference_logprobs)),
        "overrides": column("overrides", lambda s: struct_to_json(s.overrides)),
        "group_overrides": struct_to_json(msg.group_overrides) if msg.HasField("group_overrides") else None,
        "images": value_to_json(msg.images) if msg.HasField("images") else None,
        "env_id": msg.env_id if msg.HasField("env_id") else None,
        "distill_token_ids": column("distill_token_ids", lambda s: [list(d.token_ids) for d in s.distill]),
        "distill_logprobs": column("distill_logprobs", lambda s: [list(d.logprobs) for d in s.distill]),
    }
    if any(seq.HasField("policy_version") for seq in sequences):
        group[POLICY_VERSIONS] = [seq.policy_version if seq.HasField("policy_version") else None for seq in sequences]
    return group


def env_names(batch: list[Group], envs: Sequence[EnvRecord]) -> dict[int, str]:
    """The registered name of each environment in `batch`, by env_id (the trainer
    reports per-environment metrics under these names)."""
    names: dict[int, str] = {}
    for group in batch:
        env_id = group.env_id
        if env_id is not None and env_id not in names and 0 <= env_id < len(envs):
            names[env_id] = envs[env_id].real_name
    return names


def batch_to_proto(batch: list[Group]) -> list[pb.ScoredGroup]:
    """Held groups as ScoredGroups, every sequence tagged with its policy version
    (the client's, or the one the gateway attributed)."""
    out = []
    for group in batch:
        msg = group_to_proto(orjson.loads(group.body))
        for seq, version in zip(msg.sequences, group.versions):
            seq.policy_version = version
        out.append(msg)
    return out
