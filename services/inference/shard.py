"""What the service needs from one engine instance (a shard): generate, its load and
health, and the shard side of the weight-update protocol.

A shard is one rank of the weight-update group. The torch engine
(torch_engine/shard.py) and an SGLang server (sglang_server/shard.py) are shards;
ShardSet (shard_set.py) fronts several. Every shard receives weight updates with the
same state machine (weight_update/), `updates`, over a loader for its engine; the
served policy is the one that state machine reads from the loader.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from services.common.errors import FailedPrecondition
from services.inference.generation_types import Completion, GenerationRequest, ServedPolicy, TokenChunk
from services.inference.memory import MemoryReport
from services.inference.weight_update import PreparesByFields, TransferResult, UpdateRequest, WeightUpdater

# Called with (serving, reason) whenever a shard's health flips.
HealthListener = Callable[[bool, str], None]


class ResultStream(Protocol):
    """The events of one submitted request: TokenChunk (streaming requests) and one
    Completion per sample. An engine failure is raised from the iteration."""

    def __aiter__(self) -> AsyncIterator[TokenChunk | Completion]: ...

    def cancel(self) -> None:
        """Stop the request's samples (a no-op once they finished)."""


class Shard(PreparesByFields):
    kind: str
    name: str
    updates: WeightUpdater
    # Whether the shard receives weights through the same-host shared-memory transport.
    accepts_shared_memory: bool = False
    # UUID of the CUDA device the shard runs on ("" on CPU or when unknown).
    device_uuid: str = ""

    @property
    def policy(self) -> ServedPolicy:
        """The version every token generated from now on is stamped with."""
        return self.updates.policy

    @property
    @abc.abstractmethod
    def load(self) -> int:
        """Samples running or waiting on this shard."""

    @property
    @abc.abstractmethod
    def serving(self) -> bool:
        """Whether the shard may take requests (gRPC health SERVING)."""

    @property
    @abc.abstractmethod
    def max_context_len(self) -> int: ...

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary size (0: unknown)."""
        return 0

    # Told (serving, reason) whenever the shard's health changes (gRPC health per shard).
    _listener: HealthListener | None = None

    def set_health_listener(self, listener: HealthListener) -> None:
        self._listener = listener

    def _tell_listener(self, serving: bool, reason: str) -> None:
        if self._listener is not None:
            self._listener(serving, reason)

    async def release_memory(self) -> MemoryReport:
        """Colocated mode: pause generation and free the KV cache."""
        raise FailedPrecondition(f"a {self.kind} shard cannot release its memory")

    async def resume_memory(self) -> MemoryReport:
        """Colocated mode: take the KV cache back and resume generation."""
        raise FailedPrecondition(f"a {self.kind} shard cannot resume its memory")

    @abc.abstractmethod
    async def start(self) -> None:
        """Become ready to serve (launch or attach a server, start health checks)."""

    @abc.abstractmethod
    def submit(self, request: GenerationRequest) -> ResultStream:
        """Queue a request; raises InvalidArgument for a bad one, Unavailable when the
        shard cannot serve."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    # The weight-update protocol on this one shard (ShardSet drives `updates` itself).

    async def begin(self, request: UpdateRequest) -> bool:
        return await self.updates.begin(request)

    async def await_transfer(self, version: int, bucket_crc32s: list[int]) -> TransferResult:
        return await self.updates.await_transfer(version, bucket_crc32s)

    async def commit(self, version: int) -> ServedPolicy:
        return await self.updates.commit(version)

    async def abort(self, version: int, reason: str) -> ServedPolicy:
        return await self.updates.abort(version, reason)
