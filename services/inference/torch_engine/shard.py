"""The embedded torch engine as a shard: generation on the engine's worker thread,
health from the engine, weight updates through the shard's WeightReceiver.

The shard stops serving when a commit failed part-way (for good) and, through a
watchdog on the event loop, while the engine is wedged: work waiting and no progress
for `stall_seconds` (a step that never returns, a device that hangs). The watchdog
reads one timestamp, so health stays prompt however busy the engine thread is; the
shard serves again as soon as the engine moves.
"""

from __future__ import annotations

import asyncio
import logging

from services.common.weight_wire import cuda_ipc
from services.inference.generation_types import GenerationRequest
from services.inference.memory import MemoryReport
from services.inference.shard import ResultStream, Shard
from services.inference.torch_engine.engine import GenerationEngine
from services.inference.torch_engine.loader import WeightReceiver

log = logging.getLogger(__name__)


class TorchShard(Shard):
    kind = "torch"
    accepts_shared_memory = True

    def __init__(
        self,
        engine: GenerationEngine,
        receiver: WeightReceiver,
        name: str = "torch-0",
        stall_seconds: float = 60.0,
        watchdog_seconds: float = 1.0,
    ) -> None:
        self.engine = engine
        self.updates = receiver
        self.name = name
        engine.name = name
        self.stall_seconds = stall_seconds
        self.watchdog_seconds = watchdog_seconds
        self._reported_serving = True
        self._stalled: str = ""
        self._watchdog: asyncio.Task | None = None
        receiver.loader.after_commit = self._report_health

    @property
    def device_uuid(self) -> str:  # type: ignore[override]
        return cuda_ipc.device_uuid(self.engine.device)

    @property
    def load(self) -> int:
        return self.engine.load

    @property
    def serving(self) -> bool:
        return self.engine.broken is None and not self._stalled

    @property
    def max_context_len(self) -> int:
        return self.engine.max_context_len

    @property
    def vocab_size(self) -> int:
        return int(self.engine.vocab_size)

    async def start(self) -> None:
        if self.stall_seconds > 0 and self._watchdog is None:
            self._watchdog = asyncio.create_task(self._watch(), name=f"watchdog {self.name}")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.watchdog_seconds)
            self.check_progress()

    def check_progress(self) -> None:
        """Mark the shard wedged (NOT_SERVING) or moving again from the engine's progress."""
        stalled = self.engine.stalled_seconds()
        if stalled >= self.stall_seconds:
            self._stalled = f"engine made no progress for {stalled:.0f}s with work waiting"
        else:
            self._stalled = ""
        self._report_health()

    def submit(self, request: GenerationRequest) -> ResultStream:
        return self.engine.submit(request)

    async def release_memory(self) -> MemoryReport:
        return await asyncio.wrap_future(self.engine.release_memory())

    async def resume_memory(self) -> MemoryReport:
        return await asyncio.wrap_future(self.engine.resume_memory())

    async def close(self) -> None:
        """Drop any update in flight and stop the engine's worker."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        await self.updates.close()
        await asyncio.to_thread(self.engine.close)

    def _report_health(self) -> None:
        serving = self.serving
        if serving != self._reported_serving:
            self._reported_serving = serving
            self._tell_listener(serving, self.engine.broken or self._stalled)
