"""Batch formation in its two modes and staleness.

`/batch` (`take_batch`) forms every batch the queue allows at once, hands out the
last and keeps the rest for its next calls, as Atropos does; StreamBatches
(`take_next`) forms one batch per credit. Staleness (`max_staleness`, a Clotho
setting Atropos has no equivalent of) either drops groups more than that many
policy versions behind before a batch is formed, or keeps and counts them.
"""

from __future__ import annotations

import logging

from services.gateway.trajectory.queue_index import Group
from services.gateway.trajectory.registry import Registry

log = logging.getLogger(__name__)


class BatchFormation(Registry):
    """Batches out of the queue, each handed out at most once (taking a batch marks
    the trainer started, as Atropos' /batch does)."""

    def take_batch(self) -> list[Group] | None:
        """The next batch for Atropos' `/batch`, or None when none can be formed yet.

        As Atropos: marks the trainer started; hands out a batch formed earlier if
        there is one; otherwise forms every batch the queue allows, advances the step
        by how many it formed and hands out the last one formed (Atropos pops
        `curr_batch` from the end), keeping the rest for the next calls.

        Except when stale data is dropped (`max_staleness` with the drop policy):
        then each call forms one batch, as StreamBatches does, so that staleness is
        judged when the trainer takes the batch, not when a batch it takes several
        steps later was formed.
        """
        if self.max_staleness and self.staleness_policy == "drop":
            return self.take_next()
        self.mark_started()
        if self._ready:
            return self._hand_out_ready()
        self.journal.check()
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
            self.journal.batches_formed(self._formation, formed)
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
        self.journal.check()
        self._drop_stale()
        batch = self._form()
        if batch is None:
            return None
        self._step += 1
        self._hand_out(batch, None)
        return batch

    def _hand_out_ready(self) -> list[Group]:
        self.journal.check()
        batch = self._ready.pop()
        self._aside_groups -= len(batch)
        self._aside_bytes -= sum(len(g.body) for g in batch)
        self._hand_out(batch, None if self._ready else self._formation)
        return batch

    def _hand_out(self, batch: list[Group], last_of_formation: int | None) -> None:
        """The batch leaves the store: one transaction deletes it and records the step,
        so a batch is handed out at most once (a crash between the commit and the
        reply loses that batch rather than sending it twice)."""
        self.journal.groups_removed(batch, last_of_formation)
        self.journal.step(self._step)
        self._count_handed_out(batch)

    def _count_handed_out(self, batch: list[Group]) -> None:
        """Count a batch handed out (and its stale groups kept), wake the waiters."""
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
            self.journal.groups_removed(stale)
            self.counters.stale_dropped_groups += len(stale)
            self.counters.stale_dropped_sequences += sum(g.size for g in stale)
            log.info("dropped %d groups older than policy version %d", len(stale), floor)
            self.wakeup.notify()
