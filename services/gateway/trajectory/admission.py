"""Submission: admission against the store's bounds, attribution of each sequence's
policy version, and buffering of groups whose size differs from their environment's
group size until a subset makes it up (Atropos' buffer rule, packing.py)."""

from __future__ import annotations

from typing import Any

from services.common.errors import InvalidArgument
from services.gateway.trajectory.base import StateBase
from services.gateway.trajectory.packing import find_subset_summing_to
from services.gateway.trajectory.queue_index import Group
from services.gateway.trajectory.records import StoreFull, Submitted
from services.gateway.trajectory.scored_data import Incoming, incoming
from services.gateway.trajectory.tracing import submission_span


class Admission(StateBase):
    """Groups entering the store: the queue, or their environment's buffer."""

    def submit(self, groups: list[Incoming] | list[dict[str, Any]]) -> list[Submitted]:
        """Queue validated groups (Incoming records, or validated group dicts) or
        buffer them until their env's group size is made up. All of them are applied
        or none: a full store refuses the whole call."""
        if not groups:
            return []
        self.journal.check()
        want = self.wants_completions
        records_in = [g if isinstance(g, Incoming) else incoming(g, want) for g in groups]
        sources = [0, 0, 0]  # explicit, receipt, current
        records = [self._new_group(g, sources) for g in records_in]
        span = submission_span()
        if span is not None:
            for record in records:
                record.span = span
        self._admit(len(records), sum(len(r.body) for r in records))

        first_id = self._next_id
        for record in records:
            record.id = self._next_id
            self._next_id += 1
        moved: list[Group] = []
        outcomes = [self._submit_one(record, moved) for record in records]

        self.journal.groups_added(records)
        earlier = [g for g in moved if g.id < first_id]
        if earlier:
            self.journal.groups_queued(earlier)
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
