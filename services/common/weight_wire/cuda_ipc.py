"""CUDA IPC for the same-host transport (shm.py) when trainer and shard share a GPU: the
bucket sets are device allocations of the trainer, shared by handle (what torch's own
storage sharing, SGLang's `update_weights_from_tensor` and verl's colocated sync use);
the segment in /dev/shm keeps only the header.

The shard never serves the trainer's memory: it copies each published piece into its
own buffers and checksums the copy (an exporter that dies takes its allocation with it).
"""

from __future__ import annotations

from typing import Any

import torch

from clotho.v1 import inference_service_pb2 as pb


def device_uuid(device: torch.device) -> str:
    """The CUDA device's UUID ("" for a CPU device or where CUDA is missing)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return ""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return str(torch.cuda.get_device_properties(index).uuid)


def export_sets(set_bytes: int, count: int, device: torch.device) -> tuple[list[torch.Tensor], list[pb.CudaIpcHandle]]:
    """`count` flat uint8 device buffers of `set_bytes` each, and their IPC handles."""
    sets, handles = [], []
    for _ in range(count):
        buf = torch.zeros(set_bytes, dtype=torch.uint8, device=device)
        sets.append(buf)
        handles.append(to_proto(buf.untyped_storage()._share_cuda_()))  # type: ignore[no-untyped-call]
    torch.cuda.synchronize(device)
    return sets, handles


def to_proto(shared: tuple[Any, ...]) -> pb.CudaIpcHandle:
    """torch's `_share_cuda_()` tuple as a message."""
    device, handle, size, offset, ref_handle, ref_offset, event, event_sync = shared
    return pb.CudaIpcHandle(
        device=int(device),
        handle=bytes(handle),
        size_bytes=int(size),
        offset_bytes=int(offset),
        ref_counter_handle=bytes(ref_handle),
        ref_counter_offset=int(ref_offset),
        event_handle=bytes(event or b""),
        event_sync_required=bool(event_sync),
    )


def from_proto(msg: pb.CudaIpcHandle) -> tuple[Any, ...]:
    """The arguments of torch's `UntypedStorage._new_shared_cuda`."""
    return (
        int(msg.device),
        msg.handle,
        int(msg.size_bytes),
        int(msg.offset_bytes),
        msg.ref_counter_handle,
        int(msg.ref_counter_offset),
        msg.event_handle,
        bool(msg.event_sync_required),
    )


def open_set(msg: pb.CudaIpcHandle, device: torch.device) -> torch.Tensor:
    """Map a set the trainer exported, as a flat uint8 tensor on `device` (the same GPU)."""
    with torch.cuda.device(device):
        storage = torch.UntypedStorage._new_shared_cuda(*from_proto(msg))
    return torch.empty(0, dtype=torch.uint8, device=device).set_(storage, 0, (int(msg.size_bytes),), (1,))
