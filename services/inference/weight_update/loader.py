"""What an engine plugs into the weight-update state machine (machine.py): the engine
side of each step. The torch engine's loader is torch_engine/loader.py, an SGLang
server's is sglang_server/loader.py."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from services.common.errors import ClothoError
from services.common.weight_wire import Manifest
from services.inference.generation_types import ServedPolicy
from services.inference.weight_update.request import GroupKey, Received


@dataclass(eq=False)
class UpdateInFlight:
    """One prepared update. `failed` resolves to the error that dropped it (a result,
    not an exception, so nobody has to retrieve it)."""

    version: int
    step: int
    resync: bool
    manifest: Manifest
    group: GroupKey
    deadline_seconds: float
    deadline: float  # on the event loop's clock
    started: float  # time.monotonic() at prepare
    failed: asyncio.Future
    timer: asyncio.TimerHandle | None = None
    # Set by the loader's `begin_update`: resolves to a Received (or a pair of the same
    # fields) when every bucket has arrived.
    transfer: asyncio.Future | None = None
    verified: Any = None  # the TransferResult, once checked
    commit: asyncio.Future | None = None
    # The loader's own state for this update (staging buffers, flags).
    loading: Any = field(default=None)

    @property
    def dropped(self) -> ClothoError | None:
        return self.failed.result() if self.failed.done() else None


class WeightLoader(Protocol):
    name: str

    @property
    def served(self) -> ServedPolicy:
        """The policy the engine serves: the loader is the one place that knows it."""

    @property
    def parameter_specs(self) -> Mapping[str, tuple[Any, ...]]:
        """Name -> (shape, ...) of every parameter an update must carry."""

    def check_update(self, manifest: Manifest, group: GroupKey) -> None:
        """Raise InvalidArgument for what this engine cannot receive (beyond the checks
        every shard applies)."""

    async def begin_update(self, update: UpdateInFlight) -> bool:
        """Join (or reuse) the group, get ready to receive and set `update.transfer`
        (resolving to Received). Returns whether the group was formed for this update.
        Raises a ClothoError to drop the update."""

    def serves(self, version: int) -> bool:
        """Whether `version` is committed and served (a retried commit)."""

    async def commit_update(self, update: UpdateInFlight) -> ServedPolicy:
        """Switch the engine to the verified update; raises a ClothoError on failure."""

    def drop_update(self, update: UpdateInFlight, error: ClothoError) -> None:
        """Release what `update` holds and leave the group (the trainer re-forms it)."""

    async def release(self) -> None:
        """Leave the group, waiting (bounded) for anything closing in the background."""


__all__ = ["Received", "UpdateInFlight", "WeightLoader"]
