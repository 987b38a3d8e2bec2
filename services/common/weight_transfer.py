"""Weight-transfer wire format shared by the trainer (sender) and inference (receiver).

An update is a manifest of tensors packed into flat, single-dtype buckets. The sender
packs each bucket, checksums it and broadcasts it as one collective; the receiver
receives into a staging buffer of the same size and checks the CRC32 the sender
reports afterwards. Tensors keep their Hugging Face names.
"""

from __future__ import annotations

import datetime
import zlib
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping

import torch
import torch.distributed as dist

from clotho.v1 import inference_service_pb2 as pb

DTYPES: dict[torch.dtype, int] = {
    torch.float32: pb.D_TYPE_FLOAT32,
    torch.bfloat16: pb.D_TYPE_BFLOAT16,
    torch.float16: pb.D_TYPE_FLOAT16,
}
TORCH_DTYPES = {v: k for k, v in DTYPES.items()}
DEFAULT_BUCKET_BYTES = 256 * 1024 * 1024


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
                    dtype=DTYPES[t.dtype],
                    bucket=t.bucket,
                    offset=t.offset,
                )
                for t in self.tensors
            ],
            buckets=[pb.BucketSpec(dtype=DTYPES[b.dtype], numel=b.numel) for b in self.buckets],
        )

    @classmethod
    def from_proto(cls, msg: pb.WeightManifest) -> "Manifest":
        """Parse and validate a manifest; raises ValueError naming what is wrong."""
        buckets = []
        for i, b in enumerate(msg.buckets):
            if b.dtype not in TORCH_DTYPES:
                raise ValueError(f"bucket {i}: unsupported dtype {b.dtype}")
            buckets.append(BucketEntry(TORCH_DTYPES[b.dtype], int(b.numel)))
        tensors = []
        for t in msg.tensors:
            if t.bucket >= len(buckets):
                raise ValueError(f"tensor {t.name}: bucket {t.bucket} does not exist")
            bucket = buckets[t.bucket]
            if TORCH_DTYPES.get(t.dtype) != bucket.dtype:
                raise ValueError(f"tensor {t.name}: dtype differs from its bucket's")
            entry = TensorEntry(t.name, tuple(int(d) for d in t.shape), bucket.dtype, t.bucket, int(t.offset))
            if entry.offset + entry.numel > bucket.numel:
                raise ValueError(f"tensor {t.name}: runs past the end of bucket {t.bucket}")
            tensors.append(entry)
        return cls(tuple(tensors), tuple(buckets))


def build_manifest(
    named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int = DEFAULT_BUCKET_BYTES
) -> Manifest:
    """Lay tensors out in buckets of at most `bucket_bytes` (a larger tensor gets a bucket
    of its own). A bucket holds one dtype; tensors keep their order."""
    tensors: list[TensorEntry] = []
    buckets: list[BucketEntry] = []
    cur_dtype: torch.dtype | None = None
    cur_numel = 0
    for name, t in named:
        if t.dtype not in DTYPES:
            raise ValueError(f"{name}: dtype {t.dtype} cannot be transferred")
        nbytes = t.numel() * t.element_size()
        cur_bytes = cur_numel * t.element_size()
        if cur_dtype is not None and (cur_dtype != t.dtype or cur_bytes + nbytes > bucket_bytes):
            buckets.append(BucketEntry(cur_dtype, cur_numel))
            cur_dtype, cur_numel = None, 0
        if cur_dtype is None:
            cur_dtype = t.dtype
        tensors.append(TensorEntry(name, tuple(t.shape), t.dtype, len(buckets), cur_numel))
        cur_numel += t.numel()
    if cur_dtype is not None:
        buckets.append(BucketEntry(cur_dtype, cur_numel))
    return Manifest(tuple(tensors), tuple(buckets))


def pack_bucket(
    manifest: Manifest, index: int, tensors: Mapping[str, torch.Tensor], out: torch.Tensor | None = None
) -> torch.Tensor:
    """Copy the bucket's tensors into one flat buffer (reusing `out` when given)."""
    bucket = manifest.buckets[index]
    if out is None or out.numel() != bucket.numel or out.dtype != bucket.dtype:
        device = next(iter(tensors.values())).device if tensors else None
        out = torch.empty(bucket.numel, dtype=bucket.dtype, device=device)
    for t in manifest.tensors_in(index):
        src = tensors[t.name].detach()
        out[t.offset : t.offset + t.numel].copy_(src.reshape(-1))
    return out


def unpack_bucket(manifest: Manifest, index: int, flat: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """Views of the bucket's tensors inside `flat` (no copy)."""
    for t in manifest.tensors_in(index):
        yield t.name, flat[t.offset : t.offset + t.numel].view(t.shape)


def crc32(flat: torch.Tensor) -> int:
    """CRC32 of a tensor's bytes (zlib releases the GIL on large buffers)."""
    data = flat.detach().contiguous().cpu().view(torch.uint8).numpy()
    return zlib.crc32(memoryview(data)) & 0xFFFFFFFF


class CollectiveGroup:
    """A process group for weight transfer, independent of any default group (so a
    trainer under torchrun can own it next to its data-parallel group).

    The trainer's rank 0 hosts the rendezvous store; shards connect to it. The store is
    prefixed by the group name, as torch's own `new_group` does, so peers that form
    their group with `init_process_group`-style helpers (SGLang) meet the same keys.
    """

    def __init__(
        self,
        backend: str,
        address: str,
        port: int,
        world_size: int,
        rank: int,
        group_name: str,
        timeout_seconds: float,
        store: dist.TCPStore | None = None,
    ) -> None:
        self.backend = backend
        self.address = address
        self.world_size = world_size
        self.rank = rank
        self.group_name = group_name
        self.timeout = datetime.timedelta(seconds=timeout_seconds)
        if store is None:
            store = dist.TCPStore(
                address, port, world_size, is_master=(rank == 0), timeout=self.timeout,
                wait_for_workers=False,
            )
        self.store = store
        self.port = store.port
        self._pg: dist.ProcessGroup | None = None

    @classmethod
    def host(cls, backend: str, address: str, world_size: int, group_name: str, timeout_seconds: float) -> "CollectiveGroup":
        """The rank-0 side: start the store on a free port (its port is `.port`)."""
        store = dist.TCPStore(
            address, 0, world_size, is_master=True,
            timeout=datetime.timedelta(seconds=timeout_seconds), wait_for_workers=False,
        )
        return cls(backend, address, store.port, world_size, 0, group_name, timeout_seconds, store=store)

    def connect(self) -> None:
        """Form the group; blocks until every rank has joined or the timeout passes."""
        prefix = dist.PrefixStore(f"{self.group_name}/", self.store)
        if self.backend == "gloo":
            self._pg = dist.ProcessGroupGloo(prefix, self.rank, self.world_size, self.timeout)
        elif self.backend == "nccl":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = self.timeout
            self._pg = dist.ProcessGroupNCCL(prefix, self.rank, self.world_size, opts)
        else:
            raise ValueError(f"unknown backend {self.backend!r}")

    @property
    def connected(self) -> bool:
        return self._pg is not None

    def broadcast(self, tensor: torch.Tensor, root: int = 0) -> None:
        """One collective; raises (never hangs) past the group's timeout."""
        if self._pg is None:
            raise RuntimeError("collective group is not connected")
        self._pg.broadcast(tensor, root, self.timeout).wait(self.timeout)

    def close(self) -> None:
        pg, self._pg = self._pg, None
        if pg is not None:
            shutdown = getattr(pg, "shutdown", None) or getattr(pg, "abort", None)
            if shutdown is not None:
                try:
                    shutdown()
                except Exception:  # noqa: BLE001 - a broken group may fail to shut down; we drop it anyway
                    pass
