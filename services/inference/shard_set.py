"""The shards behind one inference service: least-loaded dispatch over the serving ones,
health per shard, and every weight-update call fanned out to every shard.

Shard i is rank `rendezvous.rank_offset + i` of the weight-update group (the trainer
sizes the group from GetModelInfo().shard_count), so one Prepare from the trainer joins
every shard and one broadcast feeds them all.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from opentelemetry import trace

from services.common.errors import InvalidArgument, Unavailable
from services.inference.generation_types import GenerationRequest, ServedPolicy
from services.inference.memory import MemoryReport
from services.inference.shard import HealthListener, ResultStream, Shard
from services.inference.weight_update import PreparesByFields, UpdateRequest

log = logging.getLogger(__name__)

T = TypeVar("T")
tracer = trace.get_tracer("clotho.inference.shards")


async def _on_shard(stage: str, shard: Shard, version: int, call: Awaitable[T]) -> T:
    """`call` under a span of the weight-update `stage` on `shard` (a child of the
    servicer's span: one per shard, in the trainer's push trace)."""
    attributes: dict[str, str | int] = {"clotho.shard": shard.name, "clotho.version": version}
    with tracer.start_as_current_span(f"shard.{stage}", attributes=attributes):
        return await call


# Called with (shard index, serving) when a shard's health flips.
ShardHealthListener = Callable[[int, bool], None]


class ShardSet(PreparesByFields):
    def __init__(self, shards: Sequence[Shard]) -> None:
        if not shards:
            raise ValueError("a service needs at least one shard")
        self.shards = list(shards)
        self._listener: ShardHealthListener | None = None
        self._turn = itertools.count()
        for i, shard in enumerate(self.shards):
            shard.set_health_listener(self._listener_for(i))

    def _listener_for(self, index: int) -> HealthListener:
        return lambda serving, reason: self._health_changed(index, serving, reason)

    @property
    def kind(self) -> str:
        return self.shards[0].kind

    def __len__(self) -> int:
        return len(self.shards)

    @property
    def accepts_shared_memory(self) -> bool:
        return all(s.accepts_shared_memory for s in self.shards)

    @property
    def device_uuid(self) -> str:
        """The GPU every shard runs on, when they share one ("" otherwise)."""
        uuids = {s.device_uuid for s in self.shards}
        return uuids.pop() if len(uuids) == 1 else ""

    @property
    def policy(self) -> ServedPolicy:
        """The lowest version any shard serves (they differ only after a partial commit)."""
        return min((s.policy for s in self.shards), key=lambda p: p.version)

    @property
    def max_context_len(self) -> int:
        return min(s.max_context_len for s in self.shards)

    @property
    def vocab_size(self) -> int:
        """The smallest vocabulary of the shards (0: some shard does not know)."""
        return min(s.vocab_size for s in self.shards)

    @property
    def serving(self) -> bool:
        return any(s.serving for s in self.shards)

    def set_health_listener(self, listener: ShardHealthListener) -> None:
        self._listener = listener

    async def start(self) -> None:
        await asyncio.gather(*(s.start() for s in self.shards))

    def submit(self, request: GenerationRequest) -> ResultStream:
        """Hand the request to the least-loaded serving shard (ties in turn)."""
        serving = [s for s in self.shards if s.serving]
        if not serving:
            raise Unavailable(
                f"none of the {len(self.shards)} shards is serving (a weight update failed; "
                "the next complete update resynchronises them)"
            )
        first = next(self._turn) % len(serving)
        rotated = serving[first:] + serving[:first]
        return min(rotated, key=lambda s: s.load).submit(request)

    async def begin(self, request: UpdateRequest) -> bool:
        """Prepare every shard, shard i as rank rank_offset + i. If any fails, the others
        drop the update too and the first error is raised."""
        rendezvous = request.rendezvous
        last_rank = rendezvous.rank_offset + len(self.shards) - 1
        if rendezvous.world_size and last_rank >= rendezvous.world_size:
            raise InvalidArgument(
                f"rendezvous: this service has {len(self.shards)} shards, ranks {rendezvous.rank_offset}.."
                f"{last_rank}, which do not fit world_size {rendezvous.world_size}"
            )
        try:
            joined = await self._all(
                [
                    _on_shard("prepare", s, request.version, s.updates.begin(request.for_rank(i)))
                    for i, s in enumerate(self.shards)
                ]
            )
        except BaseException as exc:
            await self._all(
                [s.updates.abort(request.version, f"another shard failed to prepare: {exc}") for s in self.shards],
                suppress=True,
            )
            raise
        return any(joined)

    async def await_transfer(self, version: int, bucket_crc32s: list[int]) -> tuple[int, float]:
        results = await self._all(
            [_on_shard("await", s, version, s.updates.await_transfer(version, bucket_crc32s)) for s in self.shards]
        )
        return sum(r.bytes_received for r in results), max(r.seconds for r in results)

    async def commit(self, version: int) -> ServedPolicy:
        await self._all([_on_shard("commit", s, version, s.updates.commit(version)) for s in self.shards])
        return self.policy

    async def abort(self, version: int, reason: str) -> ServedPolicy:
        await self._all([_on_shard("abort", s, version, s.updates.abort(version, reason)) for s in self.shards])
        return self.policy

    async def release_memory(self) -> list[MemoryReport]:
        """Colocated mode: every shard frees its KV cache."""
        return await self._all([s.release_memory() for s in self.shards])

    async def resume_memory(self) -> list[MemoryReport]:
        """Colocated mode: every shard takes its KV cache back."""
        return await self._all([s.resume_memory() for s in self.shards])

    async def close(self) -> None:
        await self._all([s.close() for s in self.shards], suppress=True)

    async def _all(self, calls: Sequence[Awaitable[T]], suppress: bool = False) -> list[T]:
        """Run the calls together, let every one finish, then raise the first error."""
        results = await asyncio.gather(*calls, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors and not suppress:
            raise errors[0]
        for e in errors:
            log.warning("shard call failed: %s", e)
        return results  # type: ignore[return-value]

    def _health_changed(self, index: int, serving: bool, reason: str) -> None:
        log.log(
            logging.INFO if serving else logging.WARNING,
            "shard %d (%s) is %s%s",
            index,
            self.shards[index].name,
            "SERVING" if serving else "NOT_SERVING",
            f": {reason}" if reason else "",
        )
        if self._listener is not None:
            self._listener(index, serving)
