"""The embedded torch engine as a shard: generation on the engine's worker thread,
health from the engine (it stops serving only when a commit failed part-way), weight
updates through the shard's WeightReceiver."""

from __future__ import annotations

import asyncio
import logging

from services.common.weight_wire import cuda_ipc
from services.inference.generation_types import GenerationRequest
from services.inference.memory import MemoryReport
from services.inference.shard import HealthListener, ResultStream, Shard
from services.inference.torch_engine.engine import GenerationEngine
from services.inference.torch_engine.loader import WeightReceiver

log = logging.getLogger(__name__)


class TorchShard(Shard):
    kind = "torch"
    accepts_shared_memory = True

    def __init__(self, engine: GenerationEngine, receiver: WeightReceiver, name: str = "torch-0") -> None:
        self.engine = engine
        self.updates = receiver
        self.name = name
        self._listener: HealthListener | None = None
        self._reported_serving = True
        receiver.loader.after_commit = self._report_health

    @property
    def device_uuid(self) -> str:  # type: ignore[override]
        return cuda_ipc.device_uuid(self.engine.device)

    @property
    def load(self) -> int:
        return self.engine.load

    @property
    def serving(self) -> bool:
        return self.engine.broken is None

    @property
    def max_context_len(self) -> int:
        return self.engine.max_context_len

    def set_health_listener(self, listener: HealthListener) -> None:
        self._listener = listener

    async def start(self) -> None:
        pass

    def submit(self, request: GenerationRequest) -> ResultStream:
        return self.engine.submit(request)

    async def release_memory(self) -> MemoryReport:
        return await asyncio.wrap_future(self.engine.release_memory())

    async def resume_memory(self) -> MemoryReport:
        return await asyncio.wrap_future(self.engine.resume_memory())

    async def close(self) -> None:
        """Drop any update in flight and stop the engine's worker."""
        await self.updates.close()
        await asyncio.to_thread(self.engine.close)

    def _report_health(self) -> None:
        serving = self.serving
        if serving != self._reported_serving:
            self._reported_serving = serving
            if self._listener is not None:
                self._listener(serving, self.engine.broken or "")
