"""What the service needs from one engine instance (a shard): generate, the policy it
serves, its load and health, and the shard side of the weight-update protocol.

A shard is one rank of the weight-update group. The torch engine (torch_shard.py) and
an SGLang server (sglang_shard.py) are shards; ShardSet (shard_set.py) fronts several.
"""

from __future__ import annotations

from typing import AsyncIterator, Callable, Protocol

from clotho.v1 import inference_service_pb2 as pb
from services.inference.api import Completion, GenerationRequest, PolicyState, TokenChunk

# Called with (serving, reason) whenever a shard's health flips.
HealthListener = Callable[[bool, str], None]


class ResultStream(Protocol):
    """The events of one submitted request: TokenChunk (streaming requests) and one
    Completion per sample. An engine failure is raised from the iteration."""

    def __aiter__(self) -> AsyncIterator[TokenChunk | Completion]: ...

    def cancel(self) -> None:
        """Stop the request's samples (a no-op once they finished)."""


class Shard(Protocol):
    kind: str
    name: str

    @property
    def policy(self) -> PolicyState:
        """The version every token generated from now on is stamped with."""

    @property
    def load(self) -> int:
        """Samples running or waiting on this shard."""

    @property
    def serving(self) -> bool:
        """Whether the shard may take requests (gRPC health SERVING)."""

    @property
    def max_context_len(self) -> int: ...

    def set_health_listener(self, listener: HealthListener) -> None: ...

    async def start(self) -> None:
        """Become ready to serve (launch or attach a server, start health checks)."""

    def submit(self, request: GenerationRequest) -> ResultStream:
        """Queue a request; raises InvalidArgument for a bad one, Unavailable when the
        shard cannot serve."""

    async def prepare(
        self,
        version: int,
        manifest: pb.WeightManifest,
        rendezvous: pb.Rendezvous,
        deadline_seconds: float,
        step: int,
        resync: bool = False,
    ) -> bool:
        """Join the group as rank `rendezvous.rank_offset` and get ready to receive
        `version` (any version when `resync`: the trainer restarted or found the shard
        off its version); returns whether the group was formed for this update."""

    async def await_transfer(self, version: int, bucket_crc32s: list[int]) -> tuple[int, float]:
        """Wait for every bucket; returns (bytes received, seconds)."""

    async def commit(self, version: int) -> PolicyState: ...

    async def abort(self, version: int, reason: str) -> PolicyState: ...

    async def close(self) -> None: ...
