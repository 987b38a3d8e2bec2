"""The trajectory state behind both the Atropos REST routes and GatewayService.

One `TrajectoryState` per gateway holds what Atropos keeps on `app.state`: the
trainer's registration, the environments, the queue of scored groups, the per-env
buffer of groups whose size differs from the env's group size, the step counter, the
`started` flag, the batches formed but not yet handed out (`curr_batch`) and the
latest example. Every method is synchronous and runs on the event loop, so each call
is atomic; a durable store can replace this class behind the same methods.

Waiters (StreamBatches) do not poll: every mutation calls `wakeup.notify()` and they
re-check their condition.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from services.common.errors import FailedPrecondition, NotFound
from services.gateway.batching import find_subset_summing_to, take_exact, take_with_min_allocations

# Atropos' floor on an environment's share, so that no environment starves.
MIN_ENV_WEIGHT = 0.01

T = TypeVar("T")


@dataclass(frozen=True)
class TrainerRegistration:
    """Atropos `Registration`."""

    wandb_group: str
    wandb_project: str
    batch_size: int
    max_token_len: int
    checkpoint_dir: str
    save_checkpoint_interval: int
    starting_step: int
    num_steps: int


@dataclass(frozen=True)
class EnvRegistration:
    """Atropos `RegisterEnv`."""

    max_token_length: int
    desired_name: str
    weight: float
    group_size: int
    min_batch_allocation: float | None = None


@dataclass
class EnvRecord:
    """A registered environment (Atropos' entry in `app.state.envs`)."""

    registered_id: int
    desired_name: str
    real_name: str
    max_context_len: int
    weight: float
    group_size: int
    min_batch_allocation: float | None
    connected: bool = True
    last_update: float = 0.0


@dataclass(frozen=True)
class EnvRegistered:
    """What a successful environment registration answers."""

    env_id: int
    wandb_name: str
    checkpoint_dir: str
    starting_step: int
    checkpoint_interval: int
    num_steps: int


@dataclass(frozen=True)
class EnvStatus:
    """Atropos `/status-env`."""

    current_step: int
    queue_size: int
    unallocated_fraction: float
    self_queue_size: int
    max_group_size: int
    env_weight: float


@dataclass(frozen=True)
class Submitted:
    """The fate of one submitted group: queued, or held in its env's buffer (then
    `buffer_size` is the sequences left buffered for that env)."""

    buffered: bool
    buffer_size: int = 0


class Wakeup:
    """Wakes every waiter when the state changes (an asyncio.Condition whose notify
    needs no lock, so synchronous mutators can call it)."""

    def __init__(self) -> None:
        self._waiters: set[asyncio.Future[None]] = set()

    def notify(self) -> None:
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)

    async def wait(self) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._waiters.add(fut)
        try:
            await fut
        finally:
            self._waiters.discard(fut)

    async def wait_for(self, predicate: Callable[[], T]) -> T:
        """Wait until `predicate()` is truthy and return its value. The check and the
        registration of the waiter happen without yielding, so no wakeup is lost."""
        while not (result := predicate()):
            await self.wait()
        return result


class TrajectoryState:
    """Registration, queue, buffering and batch assembly with Atropos' semantics."""

    def __init__(self) -> None:
        self.wakeup = Wakeup()
        # The policy version the gateway knows as current (kept across resets).
        self.policy_version = 0
        # Atropos keeps the latest example across /reset_data.
        self._latest: dict[str, Any] | None = None
        self._clear()

    def _clear(self) -> None:
        self._trainer: TrainerRegistration | None = None
        self._requesters: list[int] = []
        self._step = 0
        self._started = False
        self._envs: list[EnvRecord] = []
        self._queue: list[dict[str, Any]] = []
        self._buffers: dict[int, list[dict[str, Any]]] = {}
        self._ready: list[list[dict[str, Any]]] = []

    # -- trainer ---------------------------------------------------------------

    @property
    def trainer(self) -> TrainerRegistration | None:
        return self._trainer

    @property
    def started(self) -> bool:
        return self._started

    @property
    def step(self) -> int:
        return self._step

    @property
    def queue_size(self) -> int:
        return len(self._queue)

    def register_trainer(self, registration: TrainerRegistration) -> int:
        """Register a trainer; returns its id (a random 128-bit integer). As in Atropos,
        only the first registration sets the batch geometry; later ones just get ids."""
        if self._trainer is None:
            self._trainer = registration
            self._step = registration.starting_step
            self._started = False
            self._ready = []
        requester = uuid.uuid4().int
        self._requesters.append(requester)
        self.wakeup.notify()
        return requester

    def mark_started(self) -> None:
        """The trainer asked for data: environments may now register."""
        if self._trainer is None:
            raise FailedPrecondition("Trainer not registered. Call /register (RegisterTrainer) first.")
        self._started = True

    # -- environments ----------------------------------------------------------

    @property
    def envs(self) -> list[EnvRecord]:
        return list(self._envs)

    def register_env(self, registration: EnvRegistration) -> EnvRegistered | None:
        """Register an environment, or None ("wait for trainer to start") until the
        trainer asked for its first batch."""
        if not self._started or self._trainer is None:
            return None
        same_name = sum(1 for e in self._envs if e.desired_name == registration.desired_name)
        record = EnvRecord(
            registered_id=len(self._envs),
            desired_name=registration.desired_name,
            real_name=f"{registration.desired_name}_{same_name}",
            max_context_len=registration.max_token_length,
            weight=registration.weight,
            group_size=registration.group_size,
            min_batch_allocation=registration.min_batch_allocation,
            last_update=time.time(),
        )
        self._envs.append(record)
        self.wakeup.notify()
        return EnvRegistered(
            env_id=record.registered_id,
            wandb_name=record.real_name,
            checkpoint_dir=self._trainer.checkpoint_dir,
            starting_step=self._step,
            checkpoint_interval=self._trainer.save_checkpoint_interval,
            num_steps=self._trainer.num_steps,
        )

    def _env(self, env_id: int) -> EnvRecord:
        if not 0 <= env_id < len(self._envs):
            raise NotFound(f"env_id {env_id} is not registered ({len(self._envs)} environments registered)")
        return self._envs[env_id]

    def disconnect_env(self, env_id: int) -> None:
        self._env(env_id).connected = False
        self.wakeup.notify()

    def env_status(self, env_id: int) -> EnvStatus:
        """Atropos' `/status-env` arithmetic, including its side effect: the env's group
        size grows to the largest group it has in the queue."""
        me = self._env(env_id)
        envs = self._envs
        total = sum(e.max_context_len * max(0.0, e.weight) for e in envs if e.connected)
        env_weight = me.max_context_len * me.weight / total if total else 0.0
        env_weight = max(MIN_ENV_WEIGHT, env_weight)

        total_min = sum(e.min_batch_allocation for e in envs if e.connected and e.min_batch_allocation is not None)
        unallocated_fraction = 1.0 - min(total_min, 1.0)

        max_group_size = 1
        own_group_size = me.group_size
        own_sequences = 0
        others: dict[Any, int] = {}
        for group in self._queue:
            size = len(group["tokens"])
            if size > max_group_size:
                max_group_size = size
            owner = group.get("env_id")
            if owner == env_id:
                own_group_size = max(own_group_size, size)
                own_sequences += size
            else:
                others[owner] = others.get(owner, 0) + size
        me.group_size = own_group_size

        batch_size = self._trainer.batch_size if self._trainer is not None else 0
        reserved = {
            e.registered_id: int(batch_size * e.min_batch_allocation)
            for e in envs
            if e.connected and e.min_batch_allocation is not None
        }
        # Other environments' sequences count in whole packs of the largest group
        # size, minus what their own minimum allocation reserves (Atropos counts
        # nothing from others while every group is a single sequence).
        available = 0
        if max_group_size > 1:
            for owner, sequences in others.items():
                packed = math.ceil(sequences / max_group_size) * max_group_size
                available += max(0, packed - reserved.get(owner, 0))

        return EnvStatus(
            current_step=self._step,
            queue_size=(own_sequences + available) // own_group_size,
            unallocated_fraction=unallocated_fraction,
            self_queue_size=own_sequences // own_group_size,
            max_group_size=max_group_size,
            env_weight=env_weight,
        )

    # -- data ------------------------------------------------------------------

    def submit(self, groups: list[dict[str, Any]]) -> list[Submitted]:
        """Queue validated groups (or buffer them until their env's group size is made
        up). All of them are applied; nothing can fail halfway."""
        outcomes = [self._submit_one(group) for group in groups]
        if groups:
            self.wakeup.notify()
        return outcomes

    def _submit_one(self, group: dict[str, Any]) -> Submitted:
        env_id = group.get("env_id")
        if env_id is not None and 0 <= env_id < len(self._envs):
            expected = self._envs[env_id].group_size
            if len(group["tokens"]) != expected:
                buffer = self._buffers.setdefault(env_id, [])
                buffer.append(group)
                chosen = find_subset_summing_to([len(g["tokens"]) for g in buffer], expected)
                if chosen:
                    picked = set(chosen)
                    self._queue.extend(buffer[i] for i in chosen)
                    self._latest = buffer[chosen[-1]]
                    buffer[:] = [g for i, g in enumerate(buffer) if i not in picked]
                return Submitted(buffered=True, buffer_size=sum(len(g["tokens"]) for g in buffer))
        self._queue.append(group)
        self._latest = group
        return Submitted(buffered=False)

    def buffered_sequences(self, env_id: int) -> int:
        return sum(len(g["tokens"]) for g in self._buffers.get(env_id, []))

    def latest_example(self) -> dict[str, Any] | None:
        return self._latest

    # -- batches ---------------------------------------------------------------

    def take_batch(self) -> list[dict[str, Any]] | None:
        """The next batch, or None when none can be formed yet.

        As Atropos' `/batch`: marks the trainer started; hands out a batch formed
        earlier if there is one; otherwise forms every batch the queue allows, advances
        the step by how many it formed and hands out the last one formed (Atropos pops
        `curr_batch` from the end), keeping the rest for the next calls.
        """
        self.mark_started()
        if self._ready:
            return self._ready.pop()
        formed = []
        while (batch := self._form_batch()) is not None:
            formed.append(batch)
        if not formed:
            return None
        self._step += len(formed)
        self._ready.extend(formed)
        return self._ready.pop()

    def _form_batch(self) -> list[dict[str, Any]] | None:
        assert self._trainer is not None
        queue = self._queue
        sizes = [len(g["tokens"]) for g in queue]
        if any(e.min_batch_allocation is not None for e in self._envs):
            minimums = [
                (e.registered_id, e.min_batch_allocation)
                for e in self._envs
                if e.connected and e.min_batch_allocation is not None
            ]
            env_ids = [g.get("env_id") for g in queue]
            chosen = take_with_min_allocations(sizes, env_ids, self._trainer.batch_size, minimums)
        else:
            chosen = take_exact(sizes, self._trainer.batch_size)
        if chosen is None:
            return None
        picked = set(chosen)
        batch = [queue[i] for i in chosen]
        self._queue = [g for i, g in enumerate(queue) if i not in picked]
        return batch

    # -- reset -----------------------------------------------------------------

    def reset(self) -> None:
        """Forget the trainer, environments, queue, buffers and step (Atropos
        `/reset_data`; the latest example survives, as there)."""
        self._clear()
        self.wakeup.notify()
