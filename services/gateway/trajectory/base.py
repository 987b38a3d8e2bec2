"""What the trajectory state holds, and the reads of it.

`StateBase` declares every field the state's parts (registry.py, admission.py,
batches.py, restore.py) share and answers the questions the routes, GetStatus and
/metrics ask; it changes nothing. `TrajectoryState` (state.py) is the parts together.
"""

from __future__ import annotations

from services.gateway.trajectory.demand import TrainerDemand
from services.gateway.trajectory.door import DoorLimits
from services.gateway.trajectory.journal import Journal
from services.gateway.trajectory.queue_index import Group, QueueIndex
from services.gateway.trajectory.receipts import Receipts
from services.gateway.trajectory.records import (
    Counters,
    EnvRecord,
    StalenessPolicy,
    TrainerRegistration,
)
from services.gateway.trajectory.store import Store
from services.gateway.trajectory.wakeup import Wakeup


class StateBase:
    """The fields of the trajectory state and its read-only views."""

    wakeup: Wakeup
    demand: TrainerDemand
    store: Store
    journal: Journal
    receipts: Receipts
    counters: Counters
    max_groups: int
    max_bytes: int
    retry_after_seconds: int
    max_staleness: int
    staleness_policy: StalenessPolicy
    # The version the trainer last reported (kept across resets).
    _reported_version: int
    # Atropos keeps the latest example across /reset_data.
    _latest: bytes | None
    # After /reset_data Atropos' /info still shows the old max_token_len.
    _max_token_len_after_reset: int
    _next_id: int
    _next_qpos: int
    _next_formation: int
    # What /reset_data forgets (`_clear`).
    _trainer: TrainerRegistration | None
    _requesters: list[int]
    _step: int
    _started: bool
    _envs: list[EnvRecord]
    _queue: QueueIndex
    _buffers: dict[int, list[Group]]
    # Batches /batch formed and keeps for its next calls (a stack, as Atropos'
    # curr_batch), all from one formation: a new one is formed only when it is empty.
    _ready: list[list[Group]]
    _formation: int
    # Groups (and their bytes) held outside the queue: buffered or in a formed batch.
    _aside_groups: int
    _aside_bytes: int

    def _restore_kept(self, kept: list[tuple[int, list[Group]]], checkpointed_step: int) -> None:
        """Startup: the batches kept for an acknowledging trainer (acknowledged.py)."""
        raise NotImplementedError

    def _clear(self) -> None:
        self._trainer = None
        self._requesters = []
        self._step = 0
        self._started = False
        self._envs = []
        self._queue = QueueIndex()
        self._buffers = {}
        self._ready = []
        self._formation = -1
        self._aside_groups = 0
        self._aside_bytes = 0

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

    def buffered_sequences(self, env_id: int) -> int:
        return sum(g.size for g in self._buffers.get(env_id, []))

    @property
    def policy_version(self) -> int:
        """The current policy version: the newest the trainer reported or an inference
        result carried."""
        return max(self._reported_version, self.receipts.newest_version)

    @property
    def envs(self) -> list[EnvRecord]:
        return list(self._envs)

    # The model's vocabulary size, learned from the inference service (the gateway
    # server sets it); None: the door refuses only negative token ids.
    vocab_size: int | None = None
    # Refuse groups larger than the trainer's batch size (door.py); off in a bare
    # state, which behaves exactly as run-api (that wedges behind such a group).
    refuse_oversized_groups: bool = False

    @property
    def limits(self) -> DoorLimits:
        """What the door checks submissions against (door.py)."""
        trainer = self._trainer
        batch_size = trainer.batch_size if trainer is not None and self.refuse_oversized_groups else None
        return DoorLimits(self.vocab_size, batch_size)

    def info(self) -> tuple[int, int]:
        """Atropos' /info: (batch_size, max_token_len), -1 where unknown."""
        if self._trainer is None:
            return -1, self._max_token_len_after_reset
        return self._trainer.batch_size, self._trainer.max_token_len

    @property
    def wants_completions(self) -> bool:
        """Whether submissions should come with their completions' token ids (only
        receipts need them; there are none until the gateway serves inference)."""
        return len(self.receipts) > 0

    def latest_example(self) -> bytes | None:
        """The latest group that entered the queue, as JSON."""
        return self._latest
