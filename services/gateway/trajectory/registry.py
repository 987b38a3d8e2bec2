"""Registration: the trainer, its started flag and reported policy version, the
environments, and Atropos' `/status-env` arithmetic over them."""

from __future__ import annotations

import math
import time
import uuid

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.gateway.trajectory.base import StateBase
from services.gateway.trajectory.records import (
    EnvRecord,
    EnvRegistered,
    EnvRegistration,
    EnvStatus,
    TrainerRegistration,
)

# Atropos' floor on an environment's share, so that no environment starves.
MIN_ENV_WEIGHT = 0.01


class Registry(StateBase):
    """The trainer's and the environments' registrations."""

    def register_trainer(self, registration: TrainerRegistration) -> int:
        """Register a trainer; returns its id (a random 128-bit integer). As in Atropos,
        only the first registration sets the batch geometry; later ones just get ids."""
        if registration.batch_size < 1:
            raise InvalidArgument(f"batch_size is {registration.batch_size}: it must be at least 1")
        self.journal.check()
        if self._trainer is None:
            # Journaled first: a record the journal cannot take changes nothing in memory.
            self.journal.trainer(registration)
            self.journal.step(registration.starting_step)
            self.journal.started(False)
            self._trainer = registration
            self._step = registration.starting_step
            self._started = False
        requester = uuid.uuid4().int
        self._requesters.append(requester)
        self.wakeup.notify()
        return requester

    def mark_started(self) -> None:
        """The trainer asked for data: environments may now register."""
        if self._trainer is None:
            raise FailedPrecondition("Trainer not registered. Call /register (RegisterTrainer) first.")
        if not self._started:
            self.journal.check()
            self._started = True
            self.journal.started(True)

    def observe_version(self, version: int) -> None:
        """The trainer reported its committed policy version."""
        if version > self._reported_version:
            self.journal.check()
            self._reported_version = version
            self.journal.policy_version(version)
            self.wakeup.notify()

    def register_env(self, registration: EnvRegistration) -> EnvRegistered | None:
        """Register an environment, or None ("wait for trainer to start") until the
        trainer asked for its first batch."""
        if not self._started or self._trainer is None:
            return None
        self._check_env(registration)
        self.journal.check()
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
        # Journaled first: a record the journal cannot take changes nothing in memory.
        self.journal.env(record)
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

    def _check_env(self, registration: EnvRegistration) -> None:
        """What no environment can be registered with (the same on REST and gRPC)."""
        weight = registration.weight
        if not math.isfinite(weight) or weight < 0:
            raise InvalidArgument(f"weight is {weight}: it must be a finite number, not negative")
        if registration.group_size < 1:
            raise InvalidArgument(f"group_size is {registration.group_size}: it must be at least 1")
        minimum = registration.min_batch_allocation
        if minimum is not None and not 0.0 <= minimum <= 1.0:
            raise InvalidArgument(f"min_batch_allocation is {minimum}: it must be in [0, 1]")
        trainer = self._trainer
        if self.refuse_oversized_groups and trainer is not None and registration.group_size > trainer.batch_size:
            raise InvalidArgument(
                f"group_size is {registration.group_size} but the trainer's batch size is "
                f"{trainer.batch_size}: no batch could hold one group"
            )

    def _env(self, env_id: int) -> EnvRecord:
        # Atropos indexes its list, so -1 would be the last environment: refused.
        if env_id < 0:
            raise InvalidArgument(f"env_id is {env_id}: environment ids are not negative")
        if not env_id < len(self._envs):
            raise NotFound(f"env_id {env_id} is not registered ({len(self._envs)} environments registered)")
        return self._envs[env_id]

    def disconnect_env(self, env_id: int) -> None:
        env = self._env(env_id)
        self.journal.check()
        env.connected = False
        self.journal.env(env)
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
            self.journal.check()
            me.group_size = own_group_size
            self.journal.env(me)

        batch_size = self._trainer.batch_size if self._trainer is not None else 0
        reserved: dict[int | None, int] = {
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
