"""Reset (Atropos' `/reset_data`) and restore (rebuilding the state from what the
store held at startup)."""

from __future__ import annotations

import logging

from services.gateway.trajectory.base import StateBase
from services.gateway.trajectory.journal import Restored

log = logging.getLogger(__name__)


class ResetRestore(StateBase):
    """Forgetting everything, and coming back after a restart."""

    def reset(self) -> None:
        """Forget the trainer, environments, queue, buffers and step (Atropos
        `/reset_data`; the latest example survives, as there)."""
        self.journal.check()
        if self._trainer is not None:
            self._max_token_len_after_reset = self._trainer.max_token_len
        self._clear()
        self.journal.reset(self._max_token_len_after_reset, self._latest)
        self.wakeup.notify()

    def _restore(self, restored: Restored) -> None:
        """Rebuild the state from what the store held (startup)."""
        self._trainer = restored.trainer
        self._step = restored.step
        self._started = restored.started
        self._reported_version = restored.policy_version
        if restored.receipts:
            self.receipts.restore(restored.receipts, max(v for _, v in restored.receipts))
        self._max_token_len_after_reset = restored.max_token_len_after_reset
        self._envs = restored.envs

        groups = restored.groups
        in_batches: set[int] = set()
        for formation, batches in restored.formations:
            # Batches already handed out are gone from `groups` (deleted whole, in
            # one transaction each); the rest is the stack, in formation order.
            kept = [[groups[i] for i in ids] for ids in batches if ids and ids[0] in groups]
            for batch in kept:
                in_batches.update(g.id for g in batch)
                self._aside_groups += len(batch)
                self._aside_bytes += sum(len(g.body) for g in batch)
            if kept:
                self._ready, self._formation = kept, formation
            self._next_formation = formation + 1
        # Batches handed out to an acknowledging trainer and not yet in a checkpoint.
        handed = [(step, [groups[i] for i in ids if i in groups]) for step, ids in restored.kept]
        for _, batch in handed:
            in_batches.update(g.id for g in batch)
        self._restore_kept(handed, restored.checkpointed_step)
        queued = []
        for group in groups.values():  # in id order: each buffer's order
            if group.id in in_batches:
                continue
            if group.qpos < 0:
                assert group.env_id is not None
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
        self._latest = newest.body if newest is not None else restored.latest
        self._next_id = max(groups, default=-1) + 1
        self._next_qpos = max((g.qpos for g in groups.values()), default=-1) + 1
        if groups or self._trainer is not None:
            log.info(
                "restored: step %d, %d queued, %d buffered, %d formed batches, %d kept batches, %d environments",
                self._step,
                self._queue.groups,
                self.buffered_groups,
                len(self._ready),
                len(handed),
                len(self._envs),
            )
