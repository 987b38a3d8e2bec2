"""The manifest of a weight update: tensors (Hugging Face names, shapes, wire dtypes)
laid out in flat, single-dtype buckets, and its proto form, checked on parsing."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from clotho.v1 import inference_service_pb2 as pb
from services.common.weight_wire.dtypes import from_proto, proto_of, transferable

# Small enough that the unpipelined ends (packing the first bucket, checksumming the
# last) cost little; large enough that per-collective overhead is noise.
DEFAULT_BUCKET_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    bucket: int
    offset: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class BucketEntry:
    dtype: torch.dtype
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class Manifest:
    tensors: tuple[TensorEntry, ...]
    buckets: tuple[BucketEntry, ...]

    @property
    def total_bytes(self) -> int:
        return sum(b.nbytes for b in self.buckets)

    def tensors_in(self, bucket: int) -> list[TensorEntry]:
        return [t for t in self.tensors if t.bucket == bucket]

    def to_proto(self) -> pb.WeightManifest:
        return pb.WeightManifest(
            tensors=[
                pb.TensorSpec(
                    name=t.name,
                    shape=list(t.shape),
                    dtype=proto_of(t.dtype),
                    bucket=t.bucket,
                    offset=t.offset,
                )
                for t in self.tensors
            ],
            buckets=[pb.BucketSpec(dtype=proto_of(b.dtype), numel=b.numel) for b in self.buckets],
        )

    @classmethod
    def from_proto(cls, msg: pb.WeightManifest) -> Manifest:
        """Parse and validate a manifest; raises ValueError naming what is wrong."""
        buckets = []
        for i, b in enumerate(msg.buckets):
            dtype = from_proto(b.dtype)
            if dtype is None:
                raise ValueError(f"bucket {i}: unsupported dtype {b.dtype}")
            buckets.append(BucketEntry(dtype, int(b.numel)))
        tensors = []
        for t in msg.tensors:
            if t.bucket >= len(buckets):
                raise ValueError(f"tensor {t.name}: bucket {t.bucket} does not exist")
            bucket = buckets[t.bucket]
            if from_proto(t.dtype) != bucket.dtype:
                raise ValueError(f"tensor {t.name}: dtype differs from its bucket's")
            entry = TensorEntry(t.name, tuple(int(d) for d in t.shape), bucket.dtype, t.bucket, int(t.offset))
            if entry.offset + entry.numel > bucket.numel:
                raise ValueError(f"tensor {t.name}: runs past the end of bucket {t.bucket}")
            tensors.append(entry)
        return cls(tuple(tensors), tuple(buckets))


def build_manifest(
    named: Iterable[tuple[str, torch.Tensor]],
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    dtype: torch.dtype | None = None,
) -> Manifest:
    """Lay tensors out in buckets of at most `bucket_bytes` (a larger tensor gets a bucket
    of its own). A bucket holds one dtype; tensors keep their order. With `dtype`, every
    tensor travels in that dtype (pack_bucket casts), e.g. float32 master weights sent
    as bfloat16 to bfloat16 shards."""
    tensors: list[TensorEntry] = []
    buckets: list[BucketEntry] = []
    cur_dtype: torch.dtype | None = None
    cur_numel = 0
    for name, t in named:
        wire = dtype or t.dtype
        if not transferable(wire):
            raise ValueError(f"{name}: dtype {wire} cannot be transferred")
        size = torch.empty((), dtype=wire).element_size()
        nbytes = t.numel() * size
        cur_bytes = cur_numel * size
        if cur_dtype is not None and (cur_dtype != wire or cur_bytes + nbytes > bucket_bytes):
            buckets.append(BucketEntry(cur_dtype, cur_numel))
            cur_dtype, cur_numel = None, 0
        if cur_dtype is None:
            cur_dtype = wire
        tensors.append(TensorEntry(name, tuple(t.shape), wire, len(buckets), cur_numel))
        cur_numel += t.numel()
    if cur_dtype is not None:
        buckets.append(BucketEntry(cur_dtype, cur_numel))
    return Manifest(tuple(tensors), tuple(buckets))
