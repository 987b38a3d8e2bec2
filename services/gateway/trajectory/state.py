"""The trajectory state behind both the Atropos REST routes and GatewayService.

One `TrajectoryState` per gateway holds what Atropos keeps on `app.state`: the
trainer's registration, the environments, the queue of scored groups, the per-env
buffer of groups whose size differs from the env's group size, the step counter, the
`started` flag, the batches formed but not yet handed out (`curr_batch`) and the
latest example. Every method is synchronous and runs on the event loop, so each call
is atomic. Each change is also appended to the store (store.py) in the same order;
callers that acknowledge something await `store.sync()` before they answer.

On top of Atropos:
- the queue is indexed (queue_index.py): forming a batch costs what the batch costs;
- the store is bounded: past `max_groups` held groups (or `max_bytes`) a submission
  is refused with `StoreFull` and nothing accepted is ever dropped for room;
- every sequence carries a policy version (explicit from the client, else a receipt
  of the completion the gateway served, else the version current at submission), and
  batch assembly enforces `max_staleness` by dropping stale groups before a batch is
  formed (then `/batch` forms one batch per call, so no batch waits formed while its
  data goes stale), or by keeping and counting them.

Waiters (StreamBatches) do not poll: every mutation calls `wakeup.notify()` and they
re-check their condition.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Literal, TypeVar

import orjson

from services.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from services.gateway.trajectory.packing import find_subset_summing_to
from services.gateway.trajectory.queue_index import Group, QueueIndex
from services.gateway.trajectory.receipts import Receipts
from services.gateway.trajectory.scored_data import Incoming, incoming
from services.gateway.trajectory.store import GroupRow, Snapshot, Store

log = logging.getLogger(__name__)

# Atropos' floor on an environment's share, so that no environment starves.
MIN_ENV_WEIGHT = 0.01

T = TypeVar("T")
StalenessPolicy = Literal["drop", "keep"]


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


@dataclass
class Counters:
    """Monotonic counts for GetStatus and /metrics (since the process started)."""

    submitted_groups: int = 0
    submitted_sequences: int = 0
    refused_full: int = 0
    batches_handed_out: int = 0
    stale_dropped_groups: int = 0
    stale_dropped_sequences: int = 0
    stale_kept_groups: int = 0
    stale_kept_sequences: int = 0
    versions_explicit: int = 0
    versions_from_receipts: int = 0
    versions_current: int = 0


class StoreFull(ResourceExhausted):
    """The store holds its capacity: retry after `retry_after` seconds (HTTP answers
    503 with Retry-After, gRPC RESOURCE_EXHAUSTED)."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


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

    def __init__(
        self,
        store: Store | None = None,
        receipts: Receipts | None = None,
        *,
        max_groups: int = 0,
        max_bytes: int = 0,
        retry_after_seconds: int = 1,
        max_staleness: int = 0,
        staleness_policy: StalenessPolicy = "drop",
    ) -> None:
        if staleness_policy not in ("drop", "keep"):
            raise ValueError(f"staleness_policy must be 'drop' or 'keep', not {staleness_policy!r}")
        self.wakeup = Wakeup()
        self.store = store if store is not None else Store()
        self.receipts = receipts if receipts is not None else Receipts()
        self.max_groups = max_groups
        self.max_bytes = max_bytes
        self.retry_after_seconds = retry_after_seconds
        self.max_staleness = max_staleness
        self.staleness_policy = staleness_policy
        self.counters = Counters()
        # The version the trainer last reported (kept across resets).
        self._reported_version = 0
        # Atropos keeps the latest example across /reset_data.
        self._latest: bytes | None = None
        # After /reset_data Atropos' /info still shows the old max_token_len.
        self._max_token_len_after_reset = -1
        self._next_id = 0
        self._next_qpos = 0
        self._next_formation = 0
        self._clear()
        self._restore(self.store.load())
        if self.store.durable:
            self.receipts.sink = self.store.put_receipt

    def _clear(self) -> None:
        self._trainer: TrainerRegistration | None = None
        self._requesters: list[int] = []
        self._step = 0
        self._started = False
        self._envs: list[EnvRecord] = []
        self._queue = QueueIndex()
        self._buffers: dict[int, list[Group]] = {}
        # Batches /batch formed and keeps for its next calls (a stack, as Atropos'
        # curr_batch), all from one formation: a new one is formed only when it is empty.
        self._ready: list[list[Group]] = []
        self._formation = -1
        # Groups (and their bytes) held outside the queue: buffered or in a formed batch.
        self._aside_groups = 0
        self._aside_bytes = 0

    # -- reading ---------------------------------------------------------------

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
        """Groups in the queue (Atropos' `len(queue)`: not buffered, not formed)."""
        return self._queue.groups

    @property
    def queue(self) -> QueueIndex:
        return self._queue

    @property
    def held_groups(self) -> int:
        """Every group the store holds: queued, buffered, or in a formed batch."""
        return self._queue.groups + self._aside_groups

    @property
    def held_bytes(self) -> int:
        return self._queue.bytes + self._aside_bytes

    @property
    def ready_batches(self) -> int:
        return len(self._ready)

    def next_ready(self) -> list[Group] | None:
        """The batch formed earlier that the next /batch call hands out, if any."""
        return self._ready[-1] if self._ready else None

    @property
    def buffered_groups(self) -> int:
        return sum(len(b) for b in self._buffers.values())

    @property
    def policy_version(self) -> int:
        """The current policy version: the newest the trainer reported or an inference
        result carried."""
        return max(self._reported_version, self.receipts.newest_version)

    def info(self) -> tuple[int, int]:
        """Atropos' /info: (batch_size, max_token_len), -1 where unknown."""
        if self._trainer is None:
            return -1, self._max_token_len_after_reset
        return self._trainer.batch_size, self._trainer.max_token_len

    # -- trainer ---------------------------------------------------------------

    def register_trainer(self, registration: TrainerRegistration) -> int:
        """Register a trainer; returns its id (a random 128-bit integer). As in Atropos,
        only the first registration sets the batch geometry; later ones just get ids."""
        self.store.check()
        if self._trainer is None:
            self._trainer = registration
            self._step = registration.starting_step
            self._started = False
            self._put_meta("trainer", dataclasses.asdict(registration))
            self._put_meta("step", self._step)
            self._put_meta("started", False)
        requester = uuid.uuid4().int
        self._requesters.append(requester)
        self.wakeup.notify()
        return requester

    def mark_started(self) -> None:
        """The trainer asked for data: environments may now register."""
        if self._trainer is None:
            raise FailedPrecondition("Trainer not registered. Call /register (RegisterTrainer) first.")
        if not self._started:
            self.store.check()
            self._started = True
            self._put_meta("started", True)

    def observe_version(self, version: int) -> None:
        """The trainer reported its committed policy version."""
        if version > self._reported_version:
            self.store.check()
            self._reported_version = version
            self._put_meta("policy_version", version)
            self.wakeup.notify()

    # -- environments ----------------------------------------------------------

    @property
    def envs(self) -> list[EnvRecord]:
        return list(self._envs)

    def register_env(self, registration: EnvRegistration) -> EnvRegistered | None:
        """Register an environment, or None ("wait for trainer to start") until the
        trainer asked for its first batch."""
        if not self._started or self._trainer is None:
            return None
        self.store.check()
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
        self._put_env(record)
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
        # Atropos indexes its list, so -1 is the last environment.
        if not -len(self._envs) <= env_id < len(self._envs):
            raise NotFound(f"env_id {env_id} is not registered ({len(self._envs)} environments registered)")
        return self._envs[env_id]

    def disconnect_env(self, env_id: int) -> None:
        env = self._env(env_id)
        self.store.check()
        env.connected = False
        self._put_env(env)
        self.wakeup.notify()

    def env_status(self, env_id: int) -> EnvStatus:
        """Atropos' `/status-env` arithmetic, including its side effect: the env's group
        size grows to the largest group it has in the queue. Counters, not a scan."""
        me = self._env(env_id)
        envs = self._envs
        total = sum(e.max_context_len * max(0.0, e.weight) for e in envs if e.connected)
        env_weight = me.max_context_len * me.weight / total if total else 0.0
        env_weight = max(MIN_ENV_WEIGHT, env_weight)

        total_min = sum(e.min_batch_allocation for e in envs if e.connected and e.min_batch_allocation is not None)
        unallocated_fraction = 1.0 - min(total_min, 1.0)

        queue = self._queue
        max_group_size = max(1, queue.max_size)
        own_group_size = max(me.group_size, queue.env_max_size(env_id))
        sequences = queue.env_sequences()
        own_sequences = sequences.get(env_id, 0)
        if own_group_size != me.group_size:
            self.store.check()
            me.group_size = own_group_size
            self._put_env(me)

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
            for owner, count in sequences.items():
                if owner != env_id:
                    packed = math.ceil(count / max_group_size) * max_group_size
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

    @property
    def wants_completions(self) -> bool:
        """Whether submissions should come with their completions' token ids (only
        receipts need them; there are none until the gateway serves inference)."""
        return len(self.receipts) > 0

    def submit(self, groups: list[Incoming] | list[dict[str, Any]]) -> list[Submitted]:
        """Queue validated groups (Incoming records, or validated group dicts) or
        buffer them until their env's group size is made up. All of them are applied
        or none: a full store refuses the whole call."""
        if not groups:
            return []
        self.store.check()
        want = self.wants_completions
        groups = [g if isinstance(g, Incoming) else incoming(g, want) for g in groups]
        sources = [0, 0, 0]  # explicit, receipt, current
        records = [self._new_group(g, sources) for g in groups]
        self._admit(len(records), sum(len(r.body) for r in records))

        first_id = self._next_id
        for record in records:
            record.id = self._next_id
            self._next_id += 1
        moved: list[Group] = []
        outcomes = [self._submit_one(record, moved) for record in records]

        self.store.insert_groups([_row(r) for r in records])
        self.store.enqueue_groups([(g.qpos, g.id) for g in moved if g.id < first_id])
        counters = self.counters
        counters.submitted_groups += len(records)
        counters.submitted_sequences += sum(r.size for r in records)
        counters.versions_explicit += sources[0]
        counters.versions_from_receipts += sources[1]
        counters.versions_current += sources[2]
        self.wakeup.notify()
        return outcomes

    def _new_group(self, group: Incoming, sources: list[int]) -> Group:
        return Group(
            id=-1,
            size=group.size,
            env_id=group.env_id,
            body=group.body,
            versions=self._attribute(group, sources),
        )

    def _attribute(self, group: Incoming, sources: list[int]) -> tuple[int, ...]:
        """Each sequence's policy version: the client's, else the version whose
        completion it is (a receipt), else the version current now. `sources` counts
        which (explicit, receipt, current)."""
        explicit = group.policy_versions
        current = self.policy_version
        if explicit is None and (group.completions is None or not len(self.receipts)):
            sources[2] += group.size
            return (current,) * group.size
        receipts = self.receipts if len(self.receipts) else None
        completions = group.completions
        versions = []
        for i in range(group.size):
            version = explicit[i] if explicit is not None else None
            if version is not None:
                sources[0] += 1
            elif (
                receipts is not None
                and completions is not None
                and (version := receipts.lookup(completions[i])) is not None
            ):
                sources[1] += 1
            else:
                version = current
                sources[2] += 1
            versions.append(version)
        # A tuple of ints: the garbage collector stops tracking it (deep queues).
        return tuple(versions)

    def _admit(self, groups: int, size: int) -> None:
        """Refuse a submission the store has no room for; nothing held is ever dropped
        to make room."""
        limits = []
        if self.max_groups and groups > self.max_groups:
            limits.append(f"{groups} groups, more than the store's capacity of {self.max_groups}")
        if self.max_bytes and size > self.max_bytes:
            limits.append(f"{size} bytes, more than the store's capacity of {self.max_bytes}")
        if limits:
            raise InvalidArgument(f"the submission can never fit: {'; '.join(limits)}")
        full = (self.max_groups and self.held_groups + groups > self.max_groups) or (
            self.max_bytes and self.held_bytes + size > self.max_bytes
        )
        if full:
            self.counters.refused_full += 1
            raise StoreFull(
                f"the trajectory store is full ({self.held_groups} groups, {self.held_bytes} bytes held; "
                f"capacity {self.max_groups or 'unbounded'} groups, {self.max_bytes or 'unbounded'} bytes): "
                "retry once the trainer has taken batches",
                self.retry_after_seconds,
            )

    def _submit_one(self, record: Group, moved: list[Group]) -> Submitted:
        env_id = record.env_id
        # Atropos: `env_id < len(envs)`, then indexes the list (so -1 is the last env).
        if env_id is not None and -len(self._envs) <= env_id < len(self._envs):
            expected = self._envs[env_id].group_size
            if record.size != expected:
                buffer = self._buffers.setdefault(env_id, [])
                buffer.append(record)
                self._aside_groups += 1
                self._aside_bytes += len(record.body)
                chosen = find_subset_summing_to([g.size for g in buffer], expected)
                if chosen:
                    picked = set(chosen)
                    for i in chosen:
                        group = buffer[i]
                        self._aside_groups -= 1
                        self._aside_bytes -= len(group.body)
                        self._enqueue(group)
                        moved.append(group)
                    buffer[:] = [g for i, g in enumerate(buffer) if i not in picked]
                return Submitted(buffered=True, buffer_size=sum(g.size for g in buffer))
        self._enqueue(record)
        return Submitted(buffered=False)

    def _enqueue(self, group: Group) -> None:
        group.qpos = self._next_qpos
        self._next_qpos += 1
        self._queue.add(group)
        self._latest = group.body

    def buffered_sequences(self, env_id: int) -> int:
        return sum(g.size for g in self._buffers.get(env_id, []))

    def latest_example(self) -> bytes | None:
        """The latest group that entered the queue, as JSON."""
        return self._latest

    # -- batches ---------------------------------------------------------------

    def take_batch(self) -> list[Group] | None:
        """The next batch for Atropos' `/batch`, or None when none can be formed yet.

        As Atropos: marks the trainer started; hands out a batch formed earlier if
        there is one; otherwise forms every batch the queue allows, advances the step
        by how many it formed and hands out the last one formed (Atropos pops
        `curr_batch` from the end), keeping the rest for the next calls.

        Except when stale data is dropped (`max_staleness` with the drop policy, a
        Clotho setting Atropos has no equivalent of): then each call forms one batch,
        as StreamBatches does, so that staleness is judged when the trainer takes the
        batch, not when a batch it takes several steps later was formed.
        """
        if self.max_staleness and self.staleness_policy == "drop":
            return self.take_next()
        self.mark_started()
        if self._ready:
            return self._hand_out_ready()
        self.store.check()
        self._drop_stale()
        formed = []
        while (batch := self._form()) is not None:
            formed.append(batch)
        if not formed:
            return None
        last = formed.pop()
        if formed:
            self._formation = self._next_formation
            self._next_formation += 1
            self._ready = formed
            for batch in formed:
                self._aside_groups += len(batch)
                self._aside_bytes += sum(len(g.body) for g in batch)
            # One row for the whole formation, whatever its size.
            self.store.form_batches(self._formation, orjson.dumps([[g.id for g in b] for b in formed]))
        self._step += len(formed) + 1
        self._hand_out(last, None)
        return last

    def take_next(self) -> list[Group] | None:
        """The next batch for StreamBatches, or None: a batch formed earlier by
        `/batch` if there is one, else one batch formed now, which advances the step
        by one. Forming one batch per credit (not every batch at once, as `/batch`
        does) keeps the step equal to the batches handed out and lets staleness be
        judged when the trainer takes the batch."""
        self.mark_started()
        if self._ready:
            return self._hand_out_ready()
        self.store.check()
        self._drop_stale()
        batch = self._form()
        if batch is None:
            return None
        self._step += 1
        self._hand_out(batch, None)
        return batch

    def _hand_out_ready(self) -> list[Group]:
        self.store.check()
        batch = self._ready.pop()
        self._aside_groups -= len(batch)
        self._aside_bytes -= sum(len(g.body) for g in batch)
        self._hand_out(batch, None if self._ready else self._formation)
        return batch

    def _hand_out(self, batch: list[Group], last_of_formation: int | None) -> None:
        """The batch leaves the store: one transaction deletes it and records the step,
        so a batch is handed out at most once (a crash between the commit and the
        reply loses that batch rather than sending it twice)."""
        self.store.delete_groups([g.id for g in batch], last_of_formation)
        self._put_meta("step", self._step)
        self.counters.batches_handed_out += 1
        if self.max_staleness:
            floor = self.policy_version - self.max_staleness
            stale = [g for g in batch if g.version < floor]
            self.counters.stale_kept_groups += len(stale)
            self.counters.stale_kept_sequences += sum(g.size for g in stale)
        self.wakeup.notify()

    def _form(self) -> list[Group] | None:
        assert self._trainer is not None
        batch_size = self._trainer.batch_size
        if any(e.min_batch_allocation is not None for e in self._envs):
            minimums = [
                (e.registered_id, e.min_batch_allocation)
                for e in self._envs
                if e.connected and e.min_batch_allocation is not None
            ]
            return self._queue.pop_with_minimums(batch_size, minimums)
        return self._queue.pop_exact(batch_size)

    def _drop_stale(self) -> None:
        """Under the drop policy, remove every queued group more than `max_staleness`
        versions behind, before a batch is formed from what remains (so batches stay
        exactly batch_size)."""
        if not self.max_staleness or self.staleness_policy != "drop":
            return
        floor = self.policy_version - self.max_staleness
        if floor <= 0:
            return
        stale = self._queue.pop_older_than(floor)
        if stale:
            self.store.delete_groups([g.id for g in stale])
            self.counters.stale_dropped_groups += len(stale)
            self.counters.stale_dropped_sequences += sum(g.size for g in stale)
            log.info("dropped %d groups older than policy version %d", len(stale), floor)
            self.wakeup.notify()

    # -- reset -----------------------------------------------------------------

    def reset(self) -> None:
        """Forget the trainer, environments, queue, buffers and step (Atropos
        `/reset_data`; the latest example survives, as there)."""
        self.store.check()
        if self._trainer is not None:
            self._max_token_len_after_reset = self._trainer.max_token_len
        self._clear()
        self.store.reset()
        self._put_meta("trainer", None)
        self._put_meta("step", 0)
        self._put_meta("started", False)
        self._put_meta("max_token_len_after_reset", self._max_token_len_after_reset)
        if self._latest is not None:
            self.store.put_meta("latest", self._latest)
        self.wakeup.notify()

    # -- persistence -----------------------------------------------------------

    def _put_meta(self, key: str, value: Any) -> None:
        self.store.put_meta(key, orjson.dumps(value))

    def _put_env(self, env: EnvRecord) -> None:
        self.store.put_env(env.registered_id, orjson.dumps(dataclasses.asdict(env)))

    def _restore(self, snapshot: Snapshot) -> None:
        """Rebuild the state from what the store held (startup)."""
        meta = {key: orjson.loads(value) for key, value in snapshot.meta.items() if key != "latest"}
        if meta.get("trainer"):
            self._trainer = TrainerRegistration(**meta["trainer"])
        self._step = meta.get("step", 0)
        self._started = bool(meta.get("started", False))
        self._reported_version = meta.get("policy_version", 0)
        if snapshot.receipts:
            self.receipts.restore(snapshot.receipts, max(v for _, v in snapshot.receipts))
        self._max_token_len_after_reset = meta.get("max_token_len_after_reset", -1)
        self._envs = [EnvRecord(**orjson.loads(record)) for _, record in snapshot.envs]

        groups = {}
        for gid, qpos, env_id, size, versions, body in snapshot.groups:
            groups[gid] = Group(
                id=gid, size=size, env_id=env_id, body=bytes(body), versions=tuple(orjson.loads(versions)),
                qpos=-1 if qpos is None else qpos,
            )
        in_batches = set()
        for formation, batches in snapshot.ready:
            # Batches already handed out are gone from `groups` (deleted whole, in
            # one transaction each); the rest is the stack, in formation order.
            kept = [[groups[i] for i in ids] for ids in orjson.loads(batches) if ids and ids[0] in groups]
            for batch in kept:
                in_batches.update(g.id for g in batch)
                self._aside_groups += len(batch)
                self._aside_bytes += sum(len(g.body) for g in batch)
            if kept:
                self._ready, self._formation = kept, formation
            self._next_formation = formation + 1
        queued = []
        for group in groups.values():  # in id order: each buffer's order
            if group.id in in_batches:
                continue
            if group.qpos < 0:
                self._buffers.setdefault(group.env_id, []).append(group)
                self._aside_groups += 1
                self._aside_bytes += len(group.body)
            else:
                queued.append(group)
        queued.sort(key=lambda g: g.qpos)
        for group in queued:
            self._queue.add(group)
        # The latest example is not written with every submission (that would double
        # the bytes written): after a restart it is the newest group still held, else
        # the one /reset_data kept.
        newest = max((g for g in groups.values() if g.qpos >= 0), key=lambda g: g.qpos, default=None)
        kept = snapshot.meta.get("latest")
        self._latest = newest.body if newest is not None else (bytes(kept) if kept else None)
        self._next_id = max(groups, default=-1) + 1
        self._next_qpos = max((g.qpos for g in groups.values()), default=-1) + 1
        if groups or self._trainer is not None:
            log.info(
                "restored: step %d, %d queued, %d buffered, %d formed batches, %d environments",
                self._step, self._queue.groups, self.buffered_groups, len(self._ready), len(self._envs),
            )


def _row(group: Group) -> GroupRow:
    return (
        group.id,
        group.qpos if group.qpos >= 0 else None,
        group.env_id,
        group.size,
        orjson.dumps(group.versions),
        group.body,
    )
