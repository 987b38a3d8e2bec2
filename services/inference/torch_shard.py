"""A shard backed by the embedded torch engine and its weight receiver."""

from __future__ import annotations

import asyncio
import logging

from clotho.v1 import inference_service_pb2 as pb
from services.inference.api import GenerationRequest, PolicyState
from services.inference.engine import GenerationEngine
from services.inference.shard import HealthListener, ResultStream
from services.inference.weight_receiver import WeightReceiver

log = logging.getLogger(__name__)


class TorchShard:
    kind = "torch"

    def __init__(self, engine: GenerationEngine, receiver: WeightReceiver, name: str = "torch-0") -> None:
        self.engine = engine
        self.receiver = receiver
        self.name = name
        self._listener: HealthListener | None = None
        self._reported_serving = True

    @property
    def policy(self) -> PolicyState:
        return self.engine.policy

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

    async def prepare(
        self,
        version: int,
        manifest: pb.WeightManifest,
        rendezvous: pb.Rendezvous,
        deadline_seconds: float,
        step: int,
        resync: bool = False,
    ) -> bool:
        return await self.receiver.prepare(version, manifest, rendezvous, deadline_seconds, step, resync=resync)

    async def await_transfer(self, version: int, bucket_crc32s: list[int]) -> tuple[int, float]:
        result = await self.receiver.await_transfer(version, bucket_crc32s)
        return result.bytes_received, result.seconds

    async def commit(self, version: int) -> PolicyState:
        try:
            return await self.receiver.commit(version)
        finally:
            self._report_health()

    async def abort(self, version: int, reason: str) -> PolicyState:
        return await self.receiver.abort(version, reason)

    async def close(self) -> None:
        """Drop any update in flight and stop the engine's worker."""
        await self.receiver.close()
        await asyncio.to_thread(self.engine.close)

    def _report_health(self) -> None:
        # The engine stops serving only when a commit failed part-way.
        serving = self.serving
        if serving != self._reported_serving:
            self._reported_serving = serving
            if self._listener is not None:
                self._listener(serving, self.engine.broken or "")

