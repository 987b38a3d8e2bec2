"""The same-host weight transport: buckets in a shared-memory segment instead of a
collective.

A segment is a file in /dev/shm (POSIX shared memory) mapped by the trainer and by
every shard on its host:

    header (one page)  magic, segment bytes, update id, the set being written, buckets
                       written so far, and per reader the set it serves (-1: none)
    set 0, set 1       each the manifest's buckets, every bucket page-aligned

The trainer packs each bucket straight into its place in the set the update uses, a
few MiB at a time, bumping `written` (bytes, in manifest order) after each piece and
checksumming the piece in a second thread; a shard's reader thread checksums the bytes
in place as soon as they are published, so it trails the writer by one piece. No socket carries data. At commit the engine takes the set's
bucket views over as its parameters (no copy) and records the set it serves in the
header; the next update goes into the other set, so the trainer never writes memory a
shard serves from, and a shard never serves a mix of two updates' bytes. The CRC-32 of
every bucket still travels in AwaitWeightTransfer, so a bucket damaged in the segment
(or read torn) fails the update, which then keeps the old weights.

Lifetime: the trainer creates the segment, and unlinks its name as soon as every reader
has opened it (Prepare answered), so from then on the memory lives exactly as long as
some process maps it: a SIGKILLed trainer or shard leaves no name behind. Names carry
the trainer's run id and pid (`clotho-wt-<run>-<pid>-<nonce>`); a trainer removes the
names of segments its own run or a dead process left (a crash between creating and
unlinking) before it creates one. On any failure the trainer drops the segment and the
next update uses a new one (as a collective group is re-formed under a new name).

On one GPU (the trainer's weights on the shard's device) the two sets are the trainer's
device allocations shared by CUDA IPC handles (cuda_ipc.py) and the segment is only the
header; the shard then copies each piece into its own buffers and checksums the copy.

Ordering: the header words are 8-byte aligned stores, and a reader loads `written`
before the bucket's bytes; on x86 (TSO) that orders them. Elsewhere a torn read can only
fail the checksum, never pass unnoticed.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import queue
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from clotho.v1 import inference_service_pb2 as pb
from services.common.weight_wire import cuda_ipc
from services.common.weight_wire.manifest import Manifest
from services.common.weight_wire.packing import crc32_extend

SEGMENT_DIR = Path("/dev/shm")
SEGMENT_PREFIX = "clotho-wt-"
HEADER_BYTES = 4096
ALIGN = 4096
MAGIC = 0x434C4F54484F5745  # "CLOTHOWE"
MAX_READERS = 256
SETS = 2

# Header words (int64).
_MAGIC, _BYTES, _UPDATE, _SET, _WRITTEN = 0, 1, 2, 3, 4
_SERVING = 16  # _SERVING + reader: the set that reader serves, -1 for none

# How long a waiting side sleeps between looks at the header: first short sleeps (a
# bucket takes milliseconds to pack), then at most this long.
POLL_MAX_SECONDS = 0.002


def host_id() -> str:
    """This machine: its kernel boot id and hostname (two processes with the same id
    share /dev/shm, unless one runs in a container with its own)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "no-boot-id"
    return f"{boot}/{socket.gethostname()}"


def available() -> bool:
    """Whether this machine has POSIX shared memory where this module looks for it."""
    return SEGMENT_DIR.is_dir() and os.access(SEGMENT_DIR, os.W_OK)


def bucket_offsets(manifest: Manifest) -> tuple[list[int], int]:
    """Each bucket's byte offset within a set (page-aligned), and the set's size."""
    offsets, cursor = [], 0
    for b in manifest.buckets:
        offsets.append(cursor)
        cursor += -(-b.nbytes // ALIGN) * ALIGN
    return offsets, max(cursor, ALIGN)


def segment_bytes(manifest: Manifest) -> int:
    return HEADER_BYTES + SETS * bucket_offsets(manifest)[1]


def _safe_run_id(run_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", run_id)[:32] or "run"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def segment_names() -> list[str]:
    """Names of every Clotho weight segment in /dev/shm now."""
    if not SEGMENT_DIR.is_dir():
        return []
    return sorted(p.name for p in SEGMENT_DIR.iterdir() if p.name.startswith(SEGMENT_PREFIX))


def clean_stale_segments(run_id: str) -> list[str]:
    """Unlink segments left by this run (an earlier incarnation of this trainer) or by a
    process that no longer exists; returns their names."""
    removed = []
    mine = f"{SEGMENT_PREFIX}{_safe_run_id(run_id)}-"
    for name in segment_names():
        parts = name[len(SEGMENT_PREFIX) :].rsplit("-", 2)
        pid = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None
        stale = (name.startswith(mine) and pid != os.getpid()) or (pid is not None and not _pid_alive(pid))
        if stale:
            with contextlib.suppress(FileNotFoundError):
                (SEGMENT_DIR / name).unlink()
            removed.append(name)
    return removed


def _view(storage: Any, nbytes: int) -> torch.Tensor:
    """A flat uint8 tensor over the whole mapping."""
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, (nbytes,), (1,))


def _bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU uint8 tensor, without a copy."""
    return memoryview(t.numpy())  # type: ignore[arg-type]


class _Mapped:
    """A mapped segment: the header words and the bucket views of each set."""

    def __init__(self, path: Path, nbytes: int, manifest: Manifest, sets: list[torch.Tensor] | None = None) -> None:
        self.name = path.name
        # Device buffers holding the sets (CUDA IPC); None: the sets follow the header.
        self.sets = sets
        self.nbytes = nbytes
        self.manifest = manifest
        self.offsets, self.set_bytes = bucket_offsets(manifest)
        self.storage = torch.UntypedStorage.from_file(str(path), shared=True, nbytes=nbytes)
        raw = _view(self.storage, nbytes)
        self.header = raw[:HEADER_BYTES].view(torch.int64)
        self._raw = raw

    def bucket(self, buffer_set: int, index: int) -> torch.Tensor:
        """Bucket `index` of set `buffer_set`, as a flat tensor of the bucket's dtype."""
        b = self.manifest.buckets[index]
        if self.sets is not None:
            start = self.offsets[index]
            on_device: torch.Tensor = self.sets[buffer_set][start : start + b.nbytes].view(b.dtype)
            return on_device
        start = HEADER_BYTES + buffer_set * self.set_bytes + self.offsets[index]
        flat: torch.Tensor = self._raw[start : start + b.nbytes].view(b.dtype)
        return flat

    def word(self, index: int) -> int:
        return int(self.header[index].item())

    def set_word(self, index: int, value: int) -> None:
        self.header[index] = value


class SharedSegment(_Mapped):
    """The trainer's side: creates the segment, writes updates into it, unlinks it."""

    def __init__(
        self,
        path: Path,
        nbytes: int,
        manifest: Manifest,
        readers: int,
        sets: list[torch.Tensor] | None = None,
        cuda_handles: list[pb.CudaIpcHandle] | None = None,
    ) -> None:
        super().__init__(path, nbytes, manifest, sets)
        self.path = path
        self.cuda_handles = cuda_handles or []
        self.readers = readers
        self.set_word(_MAGIC, MAGIC)
        self.set_word(_BYTES, nbytes)
        for r in range(readers):
            self.set_word(_SERVING + r, -1)
        self.set_word(_SET, -1)

    @classmethod
    def create(cls, manifest: Manifest, readers: int, run_id: str, device: torch.device | None = None) -> SharedSegment:
        """A new segment; with a CUDA `device` its sets are device memory shared by IPC."""
        if not 1 <= readers <= MAX_READERS:
            raise ValueError(f"a segment has 1 to {MAX_READERS} readers, not {readers}")
        clean_stale_segments(run_id)
        sets: list[torch.Tensor] | None = None
        handles: list[pb.CudaIpcHandle] | None = None
        if device is not None and device.type == "cuda":
            sets, handles = cuda_ipc.export_sets(bucket_offsets(manifest)[1], SETS, device)
        nbytes = HEADER_BYTES if sets is not None else segment_bytes(manifest)
        name = f"{SEGMENT_PREFIX}{_safe_run_id(run_id)}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        path = SEGMENT_DIR / name
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, nbytes)
        except BaseException:
            os.close(fd)
            path.unlink()
            raise
        os.close(fd)
        try:
            return cls(path, nbytes, manifest, readers, sets, handles)
        except BaseException:
            path.unlink()
            raise

    def begin(self, update_id: int) -> int:
        """Start writing an update: pick the set no reader serves and reset `written`.
        Returns the set. Raises RuntimeError when every set is served by some reader
        (readers that disagree: the caller starts a new segment)."""
        serving = {self.word(_SERVING + r) for r in range(self.readers)}
        free = [s for s in range(SETS) if s not in serving]
        if not free:
            raise RuntimeError(f"segment {self.name}: readers serve from both sets")
        self.set_word(_SET, -1)
        self.set_word(_WRITTEN, 0)
        self.set_word(_UPDATE, update_id)
        self.set_word(_SET, free[0])
        return free[0]

    def publish(self, written: int) -> None:
        """The first `written` bytes of the update (its buckets' bytes in manifest order,
        alignment padding not counted) are final."""
        self.set_word(_WRITTEN, written)

    def unlink(self) -> None:
        """Remove the name (mappings stay valid)."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    @property
    def linked(self) -> bool:
        return self.path.exists()


class SegmentReader(_Mapped):
    """A shard's side: maps a segment by name (while it is still linked)."""

    @classmethod
    def open(
        cls,
        name: str,
        nbytes: int,
        manifest: Manifest,
        cuda_sets: list[pb.CudaIpcHandle] | None = None,
        device: torch.device | None = None,
    ) -> SegmentReader:
        """Map a segment; with `cuda_sets`, open the trainer's device sets on `device`."""
        if "/" in name or not name.startswith(SEGMENT_PREFIX):
            raise ValueError(f"not a weight segment name: {name!r}")
        path = SEGMENT_DIR / name
        size = path.stat().st_size  # FileNotFoundError once the trainer unlinked it
        need = HEADER_BYTES if cuda_sets else segment_bytes(manifest)
        if size != nbytes or nbytes < need:
            raise ValueError(f"segment {name} has {size} bytes; the update needs {need}")
        sets = None
        if cuda_sets:
            if device is None or device.type != "cuda" or len(cuda_sets) != SETS:
                raise ValueError(f"segment {name}: CUDA sets need {SETS} handles and a CUDA device")
            sets = [cuda_ipc.open_set(h, device) for h in cuda_sets]
            if any(s.numel() < bucket_offsets(manifest)[1] for s in sets):
                raise ValueError(f"segment {name}: a CUDA set is smaller than the manifest's buckets")
        reader = cls(path, nbytes, manifest, sets)
        if reader.word(_MAGIC) != MAGIC:
            raise ValueError(f"segment {name} has no weight-segment header")
        return reader

    def check_update(self, update_id: int, buffer_set: int) -> None:
        if self.word(_UPDATE) != update_id or self.word(_SET) != buffer_set:
            raise ValueError(
                f"segment {self.name} holds update {self.word(_UPDATE):#x} in set {self.word(_SET)}, "
                f"not update {update_id:#x} in set {buffer_set}"
            )

    def serve(self, reader: int, buffer_set: int) -> None:
        """Record which set this reader's engine now serves from (-1: none)."""
        self.set_word(_SERVING + reader, buffer_set)


# The writer publishes progress (and the reader checksums) this many bytes at a time:
# the reader's checksum then trails the writer by one chunk, not by one bucket.
CHUNK_BYTES = 4 << 20


def _pieces(manifest: Manifest, index: int) -> list[tuple[int, int, str | None, int]]:
    """The bucket in writing order: (start element, stop element, tensor name or None for
    a gap to zero, the tensor's first element), cut into CHUNK_BYTES pieces."""
    bucket = manifest.buckets[index]
    step = max(CHUNK_BYTES // torch.empty((), dtype=bucket.dtype).element_size(), 1)
    spans: list[tuple[int, int, str | None, int]] = []
    cursor = 0
    for t in sorted(manifest.tensors_in(index), key=lambda t: t.offset):
        if t.offset > cursor:
            spans.append((cursor, t.offset, None, 0))
        spans.append((t.offset, t.offset + t.numel, t.name, 0))
        cursor = max(cursor, t.offset + t.numel)
    if cursor < bucket.numel:
        spans.append((cursor, bucket.numel, None, 0))
    pieces = []
    for lo, hi, name, _ in spans:
        for a in range(lo, hi, step):
            pieces.append((a, min(a + step, hi), name, a - lo))
    return pieces


def write_buckets(
    segment: SharedSegment,
    manifest: Manifest,
    tensors: Mapping[str, torch.Tensor],
    buffer_set: int,
    abandoned: threading.Event,
    on_sent: Callable[[int], None] | None = None,
) -> list[int]:
    """Worker thread (trainer): copy each bucket into its place in `buffer_set` piece by
    piece, publishing the bytes written after every piece, while a second thread
    checksums the pieces just written (so the checksum costs no time on the copying
    thread). `on_sent(i)` is called once bucket i is published whole (as the collective
    send loop does). Returns the buckets' CRCs."""
    crcs = [0] * len(manifest.buckets)
    written: queue.SimpleQueue[tuple[int, torch.Tensor] | None] = queue.SimpleQueue()
    failed: list[BaseException] = []

    def checksum() -> None:
        try:
            while (item := written.get()) is not None:
                i, piece = item
                crcs[i] = crc32_extend(_bytes(piece.cpu()), crcs[i])
        except BaseException as exc:  # noqa: BLE001 - re-raised by the writer
            failed.append(exc)

    checksummer = threading.Thread(target=checksum, name="clotho-sync-shm-crc", daemon=True)
    checksummer.start()
    total = 0
    try:
        for i, bucket in enumerate(manifest.buckets):
            out = segment.bucket(buffer_set, i)
            raw = out.view(torch.uint8)
            size = out.element_size()
            for lo, hi, name, at in _pieces(manifest, i):
                if abandoned.is_set() or failed:
                    raise RuntimeError("weight update abandoned")
                if name is None:
                    out[lo:hi].zero_()
                else:
                    out[lo:hi].copy_(tensors[name].detach().reshape(-1)[at : at + hi - lo])
                if out.is_cuda:  # published only once the copy has landed
                    torch.cuda.current_stream(out.device).synchronize()
                written.put((i, raw[lo * size : hi * size]))
                segment.publish(total + hi * size)
            total += bucket.nbytes
            if on_sent is not None:
                on_sent(i)
    finally:
        written.put(None)
        checksummer.join()
    if failed:
        raise RuntimeError(f"checksumming failed: {failed[0]}") from failed[0]
    return crcs


def start_reading(
    reader: SegmentReader,
    buffer_set: int,
    update_id: int,
    started: float,
    stop: threading.Event,
    timeout_seconds: float,
    name: str,
    copy_into: list[torch.Tensor] | None = None,
) -> concurrent.futures.Future[tuple[list[int], float]]:
    """Checksum every bucket of the update in place as the trainer publishes it, in a
    thread of its own; the future resolves to (the CRCs, seconds since `started`) or
    fails with a RuntimeError naming the bucket. Stops at `stop`, at `timeout_seconds`
    without progress, or when the segment's header moves to another update. With
    `copy_into` (one flat buffer per bucket) each piece is first copied there and the
    copy is checksummed: what is verified is what the shard keeps."""
    done: concurrent.futures.Future[tuple[list[int], float]] = concurrent.futures.Future()
    buckets = reader.manifest.buckets

    def body() -> None:
        crcs: list[int] = []
        crc = 0
        done_bytes = 0  # of the current bucket
        before = 0  # bytes of the buckets already checksummed
        try:
            last_progress = time.monotonic()
            pause = 0.0001
            while len(crcs) < len(buckets):
                if stop.is_set():
                    raise RuntimeError("the update was dropped")
                if reader.word(_UPDATE) != update_id or reader.word(_SET) != buffer_set:
                    raise RuntimeError("the segment moved on to another update")
                available = min(reader.word(_WRITTEN) - before, buckets[len(crcs)].nbytes)
                if available > done_bytes:
                    piece = reader.bucket(buffer_set, len(crcs)).view(torch.uint8)[done_bytes:available]
                    if copy_into is not None:
                        kept = copy_into[len(crcs)].view(torch.uint8)[done_bytes:available]
                        kept.copy_(piece)
                        piece = kept
                    crc = crc32_extend(_bytes(piece.cpu()), crc)
                    done_bytes = available
                    if done_bytes == buckets[len(crcs)].nbytes:
                        crcs.append(crc)
                        before += done_bytes
                        crc = done_bytes = 0
                    last_progress, pause = time.monotonic(), 0.0001
                    continue
                if time.monotonic() - last_progress > timeout_seconds:
                    raise RuntimeError(f"no bytes written for {timeout_seconds:.1f}s (is the trainer alive?)")
                time.sleep(pause)
                pause = min(pause * 2, POLL_MAX_SECONDS)
        except Exception as exc:  # noqa: BLE001 - reported through the future
            done.set_exception(RuntimeError(f"bucket {len(crcs)} of {len(buckets)}: {exc}"))
            return
        done.set_result((crcs, time.monotonic() - started))

    threading.Thread(target=body, name=name, daemon=True).start()
    return done
