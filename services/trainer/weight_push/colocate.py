"""Colocated mode: trainer and inference engines share one device. Around each trainer
step every inference service frees its KV cache (ReleaseMemory) and takes it back after
the new weights are committed (ResumeMemory); each phase's memory is reported: the
shards' (what their cache holds and freed, their own peak during the phase that ended,
the whole device's use) and the trainer's own peak during the step."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from typing import Any

import torch
from google.protobuf.json_format import MessageToDict

from clotho.v1 import inference_service_pb2 as pb
from clotho.v1 import inference_service_pb2_grpc as pb_grpc


def trainer_memory(device: torch.device) -> dict[str, int]:
    """The trainer's own memory now: device bytes allocated and the peak since the last
    call (which restarts the count) on CUDA, resident bytes on the CPU."""
    if device.type == "cuda":
        out = {
            "allocated_bytes": torch.cuda.memory_allocated(device),
            "peak_allocated_bytes": torch.cuda.max_memory_allocated(device),
        }
        torch.cuda.reset_peak_memory_stats(device)
        return out
    try:
        with open("/proc/self/statm") as f:
            return {"rss_bytes": int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")}
    except (OSError, ValueError, IndexError):
        return {}


class Colocation:
    """Releases and resumes the memory of every inference service (`stubs`, named by
    `names`) around the trainer's steps on `device`."""

    def __init__(
        self,
        stubs: Sequence[pb_grpc.InferenceServiceStub],
        names: Sequence[str],
        device: torch.device,
        timeout_seconds: float = 120.0,
    ) -> None:
        self._stubs = list(stubs)
        self._names = list(names)
        self.device = device
        self.timeout_seconds = timeout_seconds

    async def release(self) -> dict[str, Any]:
        """Every service frees its KV cache; returns the memory at the start of the step."""
        replies = await asyncio.gather(
            *(s.ReleaseMemory(pb.ReleaseMemoryRequest(), timeout=self.timeout_seconds) for s in self._stubs)
        )
        return self._report(replies)

    async def resume(self) -> dict[str, Any]:
        """Every service takes its KV cache back; returns the memory after the step (the
        trainer's peak covers the step and the weight push)."""
        replies = await asyncio.gather(
            *(s.ResumeMemory(pb.ResumeMemoryRequest(), timeout=self.timeout_seconds) for s in self._stubs)
        )
        return self._report(replies)

    def _report(self, replies: Sequence[pb.ReleaseMemoryResponse | pb.ResumeMemoryResponse]) -> dict[str, Any]:
        return {
            "trainer": trainer_memory(self.device),
            "shards": {
                f"{name}/{m.shard}": MessageToDict(m, preserving_proto_field_name=True)
                for name, reply in zip(self._names, replies)
                for m in reply.shards
            },
        }
