"""The trainer's end of the same-host transport (services.common.weight_wire.shm): which
shards take it, the segment they share, and the thread that writes an update into it.

Choice, per inference service, from its GetModelInfo: `shm` when the setting is `shm`,
or when it is `auto`, the service reports the trainer's own host id, accepts shared
memory, and either the weights are on the CPU or they are on the GPU the service reports
(its device UUID: then the sets are shared by CUDA IPC); otherwise the collective.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from clotho.v1 import inference_service_pb2 as pb
from services.common.weight_wire import Manifest, in_daemon_thread, shm

Transport = Literal["auto", "collective", "shm"]
TRANSPORTS: tuple[str, ...] = ("auto", "collective", "shm")


def uses_shared_memory(
    setting: str, info: pb.GetModelInfoResponse, on_cpu: bool, here: str | None = None, device_uuid: str = ""
) -> bool:
    """Whether weights go to this service through shared memory. `here` is the trainer's
    host id (default: this machine's), `device_uuid` the UUID of the GPU its weights are
    on (when not `on_cpu`). Raises ValueError when `shm` is forced on a service that
    cannot take it."""
    if setting not in TRANSPORTS:
        raise ValueError(f"weight transport must be one of {', '.join(TRANSPORTS)}, not {setting!r}")
    if setting == "collective":
        return False
    same_host = bool(info.host_id) and info.host_id == (here if here is not None else shm.host_id())
    same_device = on_cpu or (bool(device_uuid) and info.device_uuid == device_uuid)
    able = same_host and info.accepts_shared_memory and same_device and shm.available()
    if setting == "shm" and not able:
        why = (
            "runs on another host"
            if not same_host
            else "does not accept shared memory"
            if not info.accepts_shared_memory
            else "the weights are on another device than the service's"
            if not same_device
            else "this machine has no /dev/shm"
        )
        raise ValueError(f"weight_transport is shm but the service {why}")
    return able


@dataclass
class SegmentLink:
    """A segment shared by every same-host shard, and the threads writing into it."""

    segment: shm.SharedSegment
    abandoned: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    buffer_set: int = -1
    update_id: int = 0

    @classmethod
    def create(cls, manifest: Manifest, readers: int, run_id: str, device: torch.device | None = None) -> SegmentLink:
        """A segment for `readers`; with a CUDA `device`, its sets live there (CUDA IPC)."""
        return cls(shm.SharedSegment.create(manifest, readers, run_id, device))

    @property
    def name(self) -> str:
        return self.segment.name

    def begin(self) -> None:
        """Start an update: a fresh id, the set no reader serves."""
        self.update_id = secrets.randbits(62)
        self.buffer_set = self.segment.begin(self.update_id)

    def rendezvous(self, reader_offset: int, readers: int) -> pb.Rendezvous:
        """What a shard whose first reader index is `reader_offset - 1` joins with."""
        return pb.Rendezvous(
            world_size=readers + 1,
            rank_offset=reader_offset,
            group_name=self.segment.name,
            shared_memory=pb.SharedMemoryTransport(
                segment=self.segment.name,
                segment_bytes=self.segment.nbytes,
                buffer_set=self.buffer_set,
                update_id=self.update_id,
                cuda_sets=self.segment.cuda_handles,
            ),
        )

    def send(
        self,
        manifest: Manifest,
        tensors: Mapping[str, torch.Tensor],
        on_sent: Callable[[int], None] | None = None,
    ) -> asyncio.Future[list[int]]:
        return in_daemon_thread(
            shm.write_buckets,
            self.segment,
            manifest,
            tensors,
            self.buffer_set,
            self.abandoned,
            on_sent,
            name="clotho-sync-shm",
            track=self.threads,
        )

    def opened(self) -> None:
        """Every reader has mapped the segment: remove its name."""
        self.segment.unlink()

    def drop(self) -> None:
        """Give the segment up: its writer stops at the next bucket; the name goes now,
        the memory when the last mapping does."""
        self.abandoned.set()
        self.segment.unlink()

    @property
    def busy(self) -> bool:
        return any(t.is_alive() for t in self.threads)


def reader_layout(counts: Sequence[int]) -> list[int]:
    """Each same-host service's first reader, numbered from 1 as ranks are."""
    offsets, offset = [], 1
    for n in counts:
        offsets.append(offset)
        offset += n
    return offsets
