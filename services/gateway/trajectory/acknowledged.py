"""Batches kept until a trainer checkpoint holds them: delivery that survives a crash
of the trainer as well as of the gateway.

`/batch` (and a StreamBatches stream that does not acknowledge) hands a batch out at
most once: the transaction that records the hand-out deletes the batch. A trainer that
checkpoints opens StreamBatches with `resume_step` (the step of the last batch its
weights include) and reports `checkpointed_step` after each checkpoint. For such a
stream:

- a batch formed for it is kept, under its step, in memory and in the store (the
  `kept` table), in the same transaction that records the step; it is sent once that
  transaction is durable;
- `acknowledge(c)` forgets every kept batch with step <= c (its checkpoint holds
  them): the store deletes them in one transaction;
- opening the stream with `resume_step` r first forgets what `checkpointed_step`
  says, then the stream is given every kept batch with step > r, in step order and
  with its own step, before any new batch (`take_acknowledged(after)` answers the
  first kept batch after `after`, the stream's last step; new batches get steps above
  every kept one). A trainer restarted from a checkpoint of step S is therefore given
  again every batch after S, once each;
- the gateway's step never goes below `resume_step` (a restarted gateway that lost
  its store, or a reset, cannot hand out step numbers the trainer already consumed);
- batches `/batch` formed and kept for its later calls keep `/batch`'s at-most-once
  delivery whoever takes them.

Bound: at most `max_kept_batches` batches are kept. Handing out one more releases the
oldest (logged, counted as `kept_released`): a trainer that never checkpoints cannot
grow the store without end, and a trainer whose checkpoint interval stays below the
bound loses nothing. Kept batches do not count toward `max_groups`/`max_bytes`, so
a trainer that checkpoints rarely never blocks ingestion. `/reset_data` forgets them.
"""

from __future__ import annotations

import logging

from services.gateway.trajectory.batches import BatchFormation
from services.gateway.trajectory.queue_index import Group

log = logging.getLogger(__name__)

DEFAULT_MAX_KEPT_BATCHES = 64


class Acknowledged(BatchFormation):
    """Kept batches: handed out, replayed after a trainer restart, released by its
    checkpoints."""

    max_kept_batches: int
    # Kept batches by step, ascending (steps only grow while batches are kept).
    _kept: dict[int, list[Group]]
    _kept_groups: int
    _kept_bytes: int
    # The newest step a trainer checkpoint was reported to hold.
    _checkpointed_step: int

    def _clear(self) -> None:
        super()._clear()
        self._kept = {}
        self._kept_groups = 0
        self._kept_bytes = 0
        self._checkpointed_step = 0

    @property
    def kept_batches(self) -> int:
        return len(self._kept)

    @property
    def kept_groups(self) -> int:
        return self._kept_groups

    @property
    def checkpointed_step(self) -> int:
        return self._checkpointed_step

    def kept_steps(self) -> list[int]:
        return list(self._kept)

    def open_acknowledged(self, resume_step: int, checkpointed_step: int) -> None:
        """An acknowledging stream opens: forget what its checkpoint holds and keep the
        step at least `resume_step`. The stream then asks `take_acknowledged` with
        `after=resume_step`."""
        self.mark_started()
        self.acknowledge(checkpointed_step)
        if resume_step > self._step:
            self.journal.check()
            self._step = resume_step
            self.journal.step(self._step)
        self.wakeup.notify()

    def acknowledge(self, checkpointed_step: int) -> None:
        """A trainer checkpoint holds every batch up to `checkpointed_step`."""
        done = [step for step in self._kept if step <= checkpointed_step]
        if not done and checkpointed_step <= self._checkpointed_step:
            return
        self.journal.check()
        self._checkpointed_step = max(self._checkpointed_step, checkpointed_step)
        self._release(done)

    def take_acknowledged(self, after: int) -> tuple[list[Group], int] | None:
        """The next batch for an acknowledging stream whose last batch had step
        `after`, and its step; None when none can be formed yet. A kept batch after
        `after` comes first (a replay); then a batch /batch formed earlier (at most
        once, with the current step); then a batch formed now and kept."""
        self.mark_started()
        for step, batch in self._kept.items():
            if step > after:
                self.counters.kept_replayed += 1
                return batch, step
        if self._ready:
            return self._hand_out_ready(), self._step
        self.journal.check()
        self._drop_stale()
        formed = self._form()
        if formed is None:
            return None
        batch = formed
        self._step += 1
        self._kept[self._step] = batch
        self._kept_groups += len(batch)
        self._kept_bytes += sum(len(g.body) for g in batch)
        self.journal.batch_kept(self._step, batch)
        self.journal.step(self._step)
        if self.max_kept_batches and len(self._kept) > self.max_kept_batches:
            oldest = list(self._kept)[: len(self._kept) - self.max_kept_batches]
            self.counters.kept_released += len(oldest)
            log.warning(
                "more than %d batches wait for a trainer checkpoint: releasing step(s) %s "
                "(a trainer restarting before its next checkpoint will not get them again; "
                "checkpoint more often or raise --max-kept-batches)",
                self.max_kept_batches,
                oldest,
            )
            self._release(oldest)
        self._count_handed_out(batch)
        return batch, self._step

    def _release(self, steps: list[int]) -> None:
        groups = [g for step in steps for g in self._kept.pop(step)]
        self._kept_groups -= len(groups)
        self._kept_bytes -= sum(len(g.body) for g in groups)
        self.journal.batches_released(steps, groups, self._checkpointed_step)

    def _restore_kept(self, kept: list[tuple[int, list[Group]]], checkpointed_step: int) -> None:
        """Startup: the batches the store kept, by step."""
        self._checkpointed_step = checkpointed_step
        for step, batch in kept:
            self._kept[step] = batch
            self._kept_groups += len(batch)
            self._kept_bytes += sum(len(g.body) for g in batch)
