"""The trajectory state as the front doors change it: each change applied and made
durable in one awaited call.

The Atropos routes and GatewayService hold a `DurableState`, never the state's
synchronous mutators: every method here that changes the state applies the change
(atomically, on the event loop) and returns only once the journal has committed it,
so no route or RPC can acknowledge a change that a crash would lose. Reads go through
`view`, typed read-only.

A change whose commit fails is undone in memory too: the state is rebuilt from
what the store committed (`TrajectoryState.reload`), and the failed store refuses
every later change, so memory and store never disagree (an environment registered in
memory but not on disk would otherwise shift every later id after a restart).

Three changes are journaled without being waited for, because nothing acknowledges
them: the trainer's started flag and its reported policy version arriving on the
StreamBatches credit stream (`note_started`, `note_version`), and the step its
checkpoint holds (`note_checkpointed`). They become durable with the next commit,
which the next batch handed out waits for.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from services.common.errors import Unavailable
from services.gateway.trajectory.demand import TrainerDemand
from services.gateway.trajectory.door import DoorLimits
from services.gateway.trajectory.queue_index import Group, QueueIndex
from services.gateway.trajectory.records import (
    Counters,
    EnvRecord,
    EnvRegistered,
    EnvRegistration,
    EnvStatus,
    Submitted,
    TrainerRegistration,
)
from services.gateway.trajectory.scored_data import Incoming
from services.gateway.trajectory.state import TrajectoryState
from services.gateway.trajectory.store import Store

T = TypeVar("T")
# What `next_batch`'s condition answers once the stream is to end (truthy, unlike None).
_STOPPED = object()


class TrajectoryView(Protocol):
    """What the front doors may read of the state (TrajectoryState provides it)."""

    @property
    def trainer(self) -> TrainerRegistration | None: ...
    @property
    def started(self) -> bool: ...
    @property
    def step(self) -> int: ...
    @property
    def queue_size(self) -> int: ...
    @property
    def queue(self) -> QueueIndex: ...
    @property
    def held_groups(self) -> int: ...
    @property
    def held_bytes(self) -> int: ...
    @property
    def ready_batches(self) -> int: ...
    @property
    def buffered_groups(self) -> int: ...
    @property
    def policy_version(self) -> int: ...
    @property
    def envs(self) -> list[EnvRecord]: ...
    @property
    def wants_completions(self) -> bool: ...
    @property
    def counters(self) -> Counters: ...
    @property
    def store(self) -> Store: ...
    @property
    def max_groups(self) -> int: ...
    @property
    def max_staleness(self) -> int: ...
    @property
    def kept_batches(self) -> int: ...
    @property
    def kept_groups(self) -> int: ...
    @property
    def checkpointed_step(self) -> int: ...
    @property
    def limits(self) -> DoorLimits: ...

    def info(self) -> tuple[int, int]: ...
    def next_ready(self) -> list[Group] | None: ...
    def latest_example(self) -> bytes | None: ...


class DurableState:
    """Every change to the trajectory state, awaited until it is durable."""

    def __init__(self, state: TrajectoryState) -> None:
        self._state = state
        self.view: TrajectoryView = state
        self._rolled_back = False

    async def _durable(self, change: Callable[..., T], *args: Any) -> T:
        """Apply `change` (a synchronous mutator: atomic on the event loop), then wait
        until the journal has committed it."""
        result = change(*args)
        await self._sync()
        return result

    async def _sync(self) -> None:
        """Wait for the journal; if the store failed instead, put memory back to what
        the store committed (and raise): a change is in both or in neither."""
        try:
            await self._state.journal.sync()
        except Unavailable:
            if not self._rolled_back:
                self._rolled_back = True
                self._state.reload()
            raise

    async def register_trainer(self, registration: TrainerRegistration) -> int:
        return await self._durable(self._state.register_trainer, registration)

    async def register_env(self, registration: EnvRegistration) -> EnvRegistered | None:
        """None ("wait for trainer to start") changes nothing and waits for nothing."""
        registered = self._state.register_env(registration)
        if registered is not None:
            await self._sync()
        return registered

    async def disconnect_env(self, env_id: int) -> None:
        await self._durable(self._state.disconnect_env, env_id)

    async def env_status(self, env_id: int) -> EnvStatus:
        """Durable too: the env's group size may have grown."""
        return await self._durable(self._state.env_status, env_id)

    async def env_status_once(
        self, env_id: int, changed: Callable[[EnvStatus], bool], timeout: float, closing: Callable[[], bool]
    ) -> EnvStatus:
        """`env_status` once `changed(status)` or `closing()` holds, or after `timeout`
        seconds (a long poll: waits on the state's wakeup, without polling)."""
        state = self._state
        status = state.env_status(env_id)  # an unknown env_id raises before any wait
        if timeout > 0 and not closing() and not changed(status):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await state.wakeup.wait_for(lambda: closing() or changed(state.env_status(env_id)))
        return await self.env_status(env_id)

    @property
    def demand(self) -> TrainerDemand:
        """The trainer's outstanding StreamBatches credits and its time waiting (demand.py)."""
        return self._state.demand

    async def submit(self, groups: list[Incoming] | list[dict[str, Any]]) -> list[Submitted]:
        return await self._durable(self._state.submit, groups)

    async def take_batch(self) -> list[Group] | None:
        """/batch: the next batch (None when none can be formed), once its hand-out
        is durable."""
        return await self._durable(self._state.take_batch)

    async def reset(self) -> None:
        await self._durable(self._state.reset)

    async def next_batch(
        self, may_take: Callable[[], bool], stop: Callable[[], bool]
    ) -> tuple[list[Group], int] | None:
        """StreamBatches: wait (without polling) until `stop()` (then None) or until
        `may_take()` and a batch can be formed; then the batch and the step it
        brought, once its hand-out is durable."""
        state = self._state

        def ready() -> object:
            if stop():
                return _STOPPED
            if may_take() and state.trainer is not None:
                return state.take_next()
            return None

        batch = await state.wakeup.wait_for(ready)
        if batch is _STOPPED:
            return None
        assert isinstance(batch, list)
        step = state.step
        await self._sync()
        return batch, step

    async def open_acknowledged(self, resume_step: int, checkpointed_step: int) -> None:
        """An acknowledging StreamBatches stream opens (acknowledged.py)."""
        await self._durable(self._state.open_acknowledged, resume_step, checkpointed_step)

    async def next_acknowledged_batch(
        self, after: int, may_take: Callable[[], bool], stop: Callable[[], bool]
    ) -> tuple[list[Group], int] | None:
        """An acknowledging stream whose last batch had step `after`: as `next_batch`,
        but kept batches after `after` come first and new batches are kept until a
        checkpoint holds them."""
        state = self._state

        def ready() -> object:
            if stop():
                return _STOPPED
            if may_take() and state.trainer is not None:
                return state.take_acknowledged(after)
            return None

        taken = await state.wakeup.wait_for(ready)
        if taken is _STOPPED:
            return None
        assert isinstance(taken, tuple)
        await self._sync()
        return taken

    def note_checkpointed(self, step: int) -> None:
        """A trainer checkpoint holds every batch up to `step` (journaled, not awaited:
        a trainer that restarts reports it again when it opens its stream)."""
        self._state.acknowledge(step)

    def note_started(self) -> None:
        """The trainer asked for data (journaled, not awaited: nothing answers it)."""
        self._state.mark_started()

    def note_version(self, version: int) -> None:
        """The trainer's committed policy version (journaled, not awaited)."""
        self._state.observe_version(version)

    def notify(self) -> None:
        """Wake the waiters of `next_batch` to re-check their condition."""
        self._state.wakeup.notify()
