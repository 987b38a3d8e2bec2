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

try:
    # ISA-L computes the same CRC-32 as zlib ten times faster (carry-less multiply), so
    # checksumming a bucket costs a fraction of sending it; zlib is the fallback.
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # pragma: no cover - isal ships wheels for the usual platforms
    _crc32 = zlib.crc32

DTYPES: dict[torch.dtype, int] = {
    torch.float32: pb.D_TYPE_FLOAT32,
    torch.bfloat16: pb.D_TYPE_BFLOAT16,
    torch.float16: pb.D_TYPE_FLOAT16,
}
TORCH_DTYPES = {v: k for k, v in DTYPES.items()}
# Collective backends by name, as CollectiveGroup takes them, and by wire enum.
BACKENDS: dict[str, int] = {"gloo": pb.COLLECTIVE_BACKEND_GLOO, "nccl": pb.COLLECTIVE_BACKEND_NCCL}
BACKEND_NAMES = {v: k for k, v in BACKENDS.items()}
# Small enough that the unpipelined ends (packing the first bucket, checksumming the
# last) cost little; large enough that per-collective overhead is noise.
DEFAULT_BUCKET_BYTES = 64 * 1024 * 1024
# Collectives queued at once on each side: the next buckets' broadcasts wait behind the
# current one, so the link never idles for a round trip between buckets (stop-and-wait
# per bucket cost ~25% with 16 MiB buckets over gloo on the 2-core development machine).
BROADCASTS_IN_FLIGHT = 3


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
        if wire not in DTYPES:
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


# Packing copies this much at a time and checksums it while it is still in the CPU's
# cache: the checksum then costs no second pass over memory.
PACK_CHUNK_BYTES = 1 << 20


def pack_bucket_crc32(
    manifest: Manifest, index: int, tensors: Mapping[str, torch.Tensor], out: torch.Tensor
) -> int:
    """pack_bucket into `out` (a CPU tensor of the bucket's size and dtype) and return
    the CRC-32 of the packed bytes, computed chunk by chunk as they are written."""
    bucket = manifest.buckets[index]
    if out.numel() != bucket.numel or out.dtype != bucket.dtype or out.device.type != "cpu":
        raise ValueError("out must be a CPU tensor of the bucket's size and dtype")
    step = max(PACK_CHUNK_BYTES // out.element_size(), 1)
    raw = out.view(torch.uint8).numpy()
    size = out.element_size()
    crc = 0
    cursor = 0  # elements of `out` checksummed so far
    for t in manifest.tensors_in(index):
        if t.offset != cursor:  # a gap the manifest leaves: checksum it as it is
            out[cursor : t.offset].zero_()
            crc = _crc32(memoryview(raw[cursor * size : t.offset * size]), crc)
        src = tensors[t.name].detach().reshape(-1)
        for start in range(0, t.numel, step):
            stop = min(start + step, t.numel)
            out[t.offset + start : t.offset + stop].copy_(src[start:stop])
            crc = _crc32(memoryview(raw[(t.offset + start) * size : (t.offset + stop) * size]), crc)
        cursor = t.offset + t.numel
    if cursor != bucket.numel:
        out[cursor:].zero_()
        crc = _crc32(memoryview(raw[cursor * size :]), crc)
    return crc & 0xFFFFFFFF


def bucket_view(manifest: Manifest, index: int, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """The bucket as a flat view of memory the tensors already share, when they lie in one
    storage exactly as the manifest lays them out (same dtype, contiguous, in order):
    then it can be sent without packing. None otherwise."""
    entries = manifest.tensors_in(index)
    bucket = manifest.buckets[index]
    if not entries:
        return None
    first = tensors[entries[0].name]
    storage = first.untyped_storage()
    base = first.data_ptr() - entries[0].offset * first.element_size()
    for t in entries:
        src = tensors[t.name]
        if (
            src.dtype != bucket.dtype
            or not src.is_contiguous()
            or src.untyped_storage().data_ptr() != storage.data_ptr()
            or src.data_ptr() != base + t.offset * src.element_size()
        ):
            return None
    start = (base - storage.data_ptr()) // first.element_size()
    if start < 0 or (start + bucket.numel) * first.element_size() > storage.nbytes():
        return None
    flat = torch.empty(0, dtype=bucket.dtype, device=first.device)
    flat.set_(storage, start, (bucket.numel,))
    return flat


def flat_buckets(manifest: Manifest, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """One empty flat tensor per bucket of the manifest."""
    return [torch.empty(b.numel, dtype=b.dtype, device=device) for b in manifest.buckets]


def lay_out_parameters(model: torch.nn.Module, manifest: Manifest) -> list[torch.Tensor]:
    """Move the model's parameters into the manifest's buckets: each parameter becomes a
    view of its bucket's flat buffer (values unchanged), so `bucket_view` finds every
    bucket already packed and a sender sends straight from the parameters. Returns the
    buffers. Only for a manifest whose dtypes are the parameters' own."""
    params = dict(model.named_parameters())
    device = next(iter(params.values())).device
    flats = flat_buckets(manifest, device)
    with torch.no_grad():
        for i, flat in enumerate(flats):
            for name, view in unpack_bucket(manifest, i, flat):
                p = params[name]
                if p.dtype != view.dtype:
                    raise ValueError(f"{name}: parameter dtype {p.dtype} is not the manifest's {view.dtype}")
                view.copy_(p)
                p.data = view
    return flats


def unpack_bucket(manifest: Manifest, index: int, flat: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """Views of the bucket's tensors inside `flat` (no copy)."""
    for t in manifest.tensors_in(index):
        yield t.name, flat[t.offset : t.offset + t.numel].view(t.shape)


def crc32(flat: torch.Tensor) -> int:
    """CRC-32 (zlib's polynomial) of a tensor's bytes; releases the GIL, so it overlaps
    with a collective running in another thread."""
    data = flat.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return _crc32(memoryview(data)) & 0xFFFFFFFF


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
        # The same keys SGLang's init_custom_process_group meets: it prefixes the store
        # with the group name, then torch's group helper adds "<name>/" and "<device>/".
        device = "cuda" if self.backend == "nccl" else "cpu"
        prefix = dist.PrefixStore(
            f"{device}/",
            dist.PrefixStore(f"{self.group_name}/", dist.PrefixStore(self.group_name, self.store)),
        )
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
        self.wait(self.broadcast_async(tensor, root))

    def broadcast_async(self, tensor: torch.Tensor, root: int = 0) -> dist.Work:
        """Start one collective and return at once; `wait` for it. Keeping the next
        bucket's broadcast queued behind the current one keeps the link busy between
        buckets (a stop-and-wait per bucket leaves it idle for a round trip each time)."""
        if self._pg is None:
            raise RuntimeError("collective group is not connected")
        return self._pg.broadcast(tensor, root, self.timeout)

    def wait(self, work: dist.Work) -> None:
        """Wait for a started collective; raises (never hangs) past the group's timeout."""
        work.wait(self.timeout)

    def close(self) -> None:
        pg, self._pg = self._pg, None
        if pg is not None:
            shutdown = getattr(pg, "shutdown", None) or getattr(pg, "abort", None)
            if shutdown is not None:
                try:
                    shutdown()
                except Exception:  # noqa: BLE001 - a broken group may fail to shut down; we drop it anyway
                    pass
