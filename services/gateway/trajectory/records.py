"""The records the trajectory state holds and answers with: registrations (Atropos'
`Registration` and `RegisterEnv`), a registered environment, what a registration,
`/status-env` and a submission answer, the counters, and `StoreFull`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from services.common.errors import ResourceExhausted

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
    # Kept batches sent again to a trainer that resumed, and kept batches released
    # past the bound before a checkpoint held them (acknowledged.py).
    kept_replayed: int = 0
    kept_released: int = 0


class StoreFull(ResourceExhausted):
    """The store holds its capacity: retry after `retry_after` seconds (HTTP answers
    503 with Retry-After, gRPC RESOURCE_EXHAUSTED)."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after
