"""One weight update as the shard receives it (UpdateRequest: what Prepare carries), the
checks every shard applies to it, and what a finished transfer reports."""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from clotho.v1 import inference_service_pb2 as pb
from services.common.errors import InvalidArgument
from services.common.weight_wire import BACKEND_NAMES, Manifest


@dataclass(frozen=True)
class UpdateRequest:
    """A PrepareWeightUpdate: `version` (any version when `resync`: the trainer
    restarted or found the shard off its version), the manifest, where to join the
    group, the deadline (0: the shard's default) and the trainer's step."""

    version: int
    manifest: pb.WeightManifest
    rendezvous: pb.Rendezvous
    deadline_seconds: float
    step: int
    resync: bool = False

    @classmethod
    def from_proto(cls, msg: pb.PrepareWeightUpdateRequest) -> UpdateRequest:
        return cls(msg.version, msg.manifest, msg.rendezvous, msg.deadline_seconds, msg.step, msg.resync)

    def for_rank(self, shift: int) -> UpdateRequest:
        """The same update for the shard `shift` ranks after the rendezvous' rank_offset."""
        rendezvous = pb.Rendezvous()
        rendezvous.CopyFrom(self.rendezvous)
        rendezvous.rank_offset = self.rendezvous.rank_offset + shift
        return replace(self, rendezvous=rendezvous)


class PreparesByFields(abc.ABC):
    """`prepare(...)` with a PrepareWeightUpdateRequest's fields spelt out, for whatever
    takes an UpdateRequest in `begin` (the state machine, a shard, the shard set)."""

    @abc.abstractmethod
    async def begin(self, request: UpdateRequest) -> bool: ...

    async def prepare(
        self,
        version: int,
        manifest: pb.WeightManifest,
        rendezvous: pb.Rendezvous,
        deadline_seconds: float,
        step: int,
        resync: bool = False,
    ) -> bool:
        """`begin` with the fields of a PrepareWeightUpdateRequest."""
        return await self.begin(UpdateRequest(version, manifest, rendezvous, deadline_seconds, step, resync))


@dataclass(frozen=True)
class SegmentKey:
    """A checked shared-memory rendezvous: the segment, and where in it this update is."""

    segment: str
    segment_bytes: int
    buffer_set: int
    update_id: int
    # The trainer's device sets (CUDA IPC), or empty when the sets are in the segment.
    cuda_sets: tuple[pb.CudaIpcHandle, ...] = ()


@dataclass(frozen=True)
class GroupKey:
    """A checked rendezvous: the group a shard joins, as which rank. For the same-host
    transport `backend` is "shm", `group_name` the segment, `rank` - 1 the reader index,
    and `segment` says where the update lies."""

    backend: str
    address: str
    port: int
    world_size: int
    rank: int
    group_name: str
    segment: SegmentKey | None = None


class TransferResult(NamedTuple):
    bytes_received: int
    seconds: float


class Received(NamedTuple):
    """What a loader's transfer resolves to: the CRC-32 of each bucket as it arrived
    (None where the engine received the bytes itself and cannot checksum them), and
    the seconds since prepare."""

    crcs: list[int] | None
    seconds: float


def check_rendezvous(r: pb.Rendezvous) -> GroupKey:
    if r.HasField("shared_memory"):
        return _check_shared_memory(r)
    backend = BACKEND_NAMES.get(r.backend)
    if backend is None:
        raise InvalidArgument(f"rendezvous: backend must be GLOO or NCCL, got {r.backend}")
    if not r.address or not 0 < r.port < 65536:
        raise InvalidArgument(f"rendezvous: bad store address {r.address!r}:{r.port}")
    if not r.group_name:
        raise InvalidArgument("rendezvous: group_name is empty")
    if not 1 <= r.rank_offset < r.world_size:
        raise InvalidArgument(
            f"rendezvous: rank_offset {r.rank_offset} must be in [1, world_size {r.world_size}) (rank 0 is the trainer)"
        )
    return GroupKey(backend, r.address, int(r.port), int(r.world_size), int(r.rank_offset), r.group_name)


def _check_shared_memory(r: pb.Rendezvous) -> GroupKey:
    m = r.shared_memory
    if not m.segment or "/" in m.segment or m.segment != r.group_name:
        raise InvalidArgument(f"rendezvous: bad shared-memory segment {m.segment!r}")
    if m.buffer_set not in (0, 1):
        raise InvalidArgument(f"rendezvous: buffer_set must be 0 or 1, got {m.buffer_set}")
    if not 1 <= r.rank_offset < r.world_size:
        raise InvalidArgument(
            f"rendezvous: rank_offset {r.rank_offset} must be in [1, world_size {r.world_size}) (readers count from 1)"
        )
    if m.cuda_sets and len(m.cuda_sets) != 2:
        raise InvalidArgument(f"rendezvous: cuda_sets must hold 2 handles, got {len(m.cuda_sets)}")
    segment = SegmentKey(m.segment, int(m.segment_bytes), int(m.buffer_set), int(m.update_id), tuple(m.cuda_sets))
    return GroupKey("shm", "", 0, int(r.world_size), int(r.rank_offset), m.segment, segment)


def check_deadline(deadline_seconds: float) -> None:
    if math.isnan(deadline_seconds) or deadline_seconds < 0:
        raise InvalidArgument(f"deadline_seconds must be >= 0, got {deadline_seconds}")


def check_manifest(msg: pb.WeightManifest, param_specs: Mapping[str, tuple[Any, ...]]) -> Manifest:
    """Parse a weight-update manifest and check it names every parameter of the served
    model (`param_specs`: name -> (shape, ...)) exactly once, with the model's shapes."""
    try:
        manifest = Manifest.from_proto(msg)
    except ValueError as exc:
        raise InvalidArgument(f"manifest: {exc}") from exc
    seen: set[str] = set()
    for t in manifest.tensors:
        if t.name in seen:
            raise InvalidArgument(f"manifest: tensor {t.name!r} appears twice")
        seen.add(t.name)
        spec = param_specs.get(t.name)
        if spec is None:
            raise InvalidArgument(f"manifest: tensor {t.name!r} is not a parameter of the served model")
        if t.shape != tuple(spec[0]):
            raise InvalidArgument(
                f"manifest: tensor {t.name!r} has shape {list(t.shape)}, the model's is {list(spec[0])}"
            )
    missing = sorted(set(param_specs) - seen)
    if missing:
        raise InvalidArgument(f"manifest: parameter {missing[0]!r} is missing ({len(missing)} in all)")
    return manifest
