"""The queue of scored groups, indexed so that forming a batch costs what the batch
costs, not what the queue holds.

Atropos keeps one list and rescans it for every batch. Its packing rules (the
oracle tests/oracles/atropos_packing.py states them over a list of sizes) only ever look at groups in queue order within one
group size, or within one (environment, group size): a pack is the next `p / size`
groups of one size, where `p` is the largest group size in the queue, and packs are
taken in the order they complete. So the queue is kept as one FIFO per size and one
per (environment, size), each an OrderedDict keyed by queue position (O(1) removal
from anywhere, O(1) access to the front), and a batch is formed by merging the FIFOs'
fronts with a heap: the work is the groups taken plus a look-ahead of one pack per
FIFO. Counters per size and per environment answer `/status-env` without a scan, and
a FIFO per policy version finds stale groups without a scan.

`examined` counts the groups a batch assembly looked at; tests assert on it instead
of on time.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any


@dataclass(eq=False, slots=True)
class Group:
    """One scored group as the gateway holds it."""

    # Submission id: the durable store's key.
    id: int
    # Sequences in the group.
    size: int
    env_id: int | None
    # The group as Atropos' /batch sends it: JSON, byte for byte.
    body: bytes
    # The policy version of each sequence (sent by the client or attributed).
    versions: Sequence[int] = ()
    # Position in the queue (increasing in queue order); -1 while buffered.
    qpos: int = -1
    # The group's policy version for staleness: its oldest sequence's.
    version: int = field(init=False, default=0)
    # The submission that brought the group, as tracing.submission_span keeps it
    # (None when untraced, and after a restart: spans are not stored), for the
    # hand-out span's links.
    span: Any = None

    def __post_init__(self) -> None:
        self.version = min(self.versions) if self.versions else 0


# An environment's key in the queue's counters: its env_id (None for groups without one).
EnvKey = int | None

Fifo = OrderedDict[int, Group]  # queue position -> Group, in queue order
# Dead entries the version heap may hold beyond twice its live versions (_forget_version).
VERSION_HEAP_SLACK = 16


def _chunks(fifo: Fifo, chunk: int) -> Iterator[list[Group]]:
    """Consecutive runs of `chunk` groups from the front; only complete ones."""
    it = iter(fifo.values())
    while len(run := list(islice(it, chunk))) == chunk:
        yield run


class QueueIndex:
    """The queued groups (not buffered, not in a formed batch) with Atropos' packing."""

    def __init__(self) -> None:
        self._by_size: dict[int, Fifo] = {}
        self._by_env_size: dict[tuple[EnvKey, int], Fifo] = {}
        self._env_sizes: dict[EnvKey, dict[int, int]] = {}
        self._env_sequences: dict[EnvKey, int] = {}
        self._by_version: dict[int, Fifo] = {}
        self._version_heap: list[int] = []
        self.groups = 0
        self.sequences = 0
        self.bytes = 0
        self.examined = 0

    # -- membership ------------------------------------------------------------

    def add(self, group: Group) -> None:
        """Append a group; its qpos must be larger than every queued group's."""
        self._by_size.setdefault(group.size, OrderedDict())[group.qpos] = group
        if group.env_id is not None:
            self._by_env_size.setdefault((group.env_id, group.size), OrderedDict())[group.qpos] = group
        sizes = self._env_sizes.setdefault(group.env_id, {})
        sizes[group.size] = sizes.get(group.size, 0) + 1
        self._env_sequences[group.env_id] = self._env_sequences.get(group.env_id, 0) + group.size
        version = group.version
        if version not in self._by_version:
            self._by_version[version] = OrderedDict()
            heapq.heappush(self._version_heap, version)
        self._by_version[version][group.qpos] = group
        self.groups += 1
        self.sequences += group.size
        self.bytes += len(group.body)

    def remove(self, group: Group) -> None:
        # Inlined: forming every batch of a deep queue at once (/batch) calls this
        # once per group.
        qpos, size, env = group.qpos, group.size, group.env_id
        fifo = self._by_size[size]
        del fifo[qpos]
        if not fifo:
            del self._by_size[size]
        if env is not None:
            fifo = self._by_env_size[(env, size)]
            del fifo[qpos]
            if not fifo:
                del self._by_env_size[(env, size)]
        sizes = self._env_sizes[env]
        if sizes[size] > 1:
            sizes[size] -= 1
        else:
            del sizes[size]
            if not sizes:
                del self._env_sizes[env]
        left = self._env_sequences[env] - size
        if left:
            self._env_sequences[env] = left
        else:
            del self._env_sequences[env]
        version_fifo = self._by_version.get(group.version)
        if version_fifo is not None:  # pop_older_than takes whole versions out first
            version_fifo.pop(qpos, None)
            if not version_fifo:
                self._forget_version(group.version)
        self.groups -= 1
        self.sequences -= size
        self.bytes -= len(group.body)

    def _forget_version(self, version: int) -> None:
        """A version's last queued group left. Its heap entry stays until
        `pop_older_than` reaches it, and without a staleness bound nothing does: with
        a new policy version every step, the heap would gain an entry per step for
        good. So once dead entries outnumber the live versions (plus a few), the heap
        is rebuilt from the live ones (a sorted list is a heap): at most
        2 x live + VERSION_HEAP_SLACK entries, at amortized O(1) per version."""
        del self._by_version[version]
        if len(self._version_heap) > 2 * len(self._by_version) + VERSION_HEAP_SLACK:
            self._version_heap = sorted(self._by_version)

    def remove_all(self, groups: Sequence[Group]) -> None:
        for group in groups:
            self.remove(group)

    def __iter__(self) -> Iterator[Group]:
        """Every queued group in queue order (restores and tests; never per batch)."""
        return iter(sorted((g for fifo in self._by_size.values() for g in fifo.values()), key=lambda g: g.qpos))

    # -- what /status-env needs, without a scan --------------------------------

    @property
    def max_size(self) -> int:
        """The largest group size in the queue (0 when empty)."""
        return max(self._by_size, default=0)

    def env_max_size(self, env_id: EnvKey) -> int:
        return max(self._env_sizes.get(env_id, ()), default=0)

    def env_sequences(self) -> dict[EnvKey, int]:
        """Queued sequences per env_id (None for groups without one); read only."""
        return self._env_sequences

    # -- batch assembly --------------------------------------------------------

    def pop_exact(self, batch_size: int) -> list[Group] | None:
        """Remove and return the next batch of exactly `batch_size` sequences, as
        `take_exact` (the oracle in tests/oracles/atropos_packing.py, Atropos'
        `grab_exact_from_heterogeneous_queue`) would choose it, or None."""
        if not self.groups or batch_size <= 0 or self.sequences < batch_size:
            return None
        pack = self.max_size
        heap = []
        for size, fifo in self._by_size.items():
            if pack % size:
                continue  # never adds up to a pack
            runs = _chunks(fifo, pack // size)
            if (first := next(runs, None)) is not None:
                self.examined += len(first)
                heap.append((first[-1].qpos, size, first, runs))
        heapq.heapify(heap)
        picked: list[Group] = []
        running = 0
        while heap:
            _, size, members, runs = heap[0]
            for group in members:
                picked.append(group)
                running += size
                if running == batch_size:
                    self.remove_all(picked)
                    return picked
                if running > batch_size:
                    return None
            if (run := next(runs, None)) is not None:
                self.examined += len(run)
                heapq.heapreplace(heap, (run[-1].qpos, size, run, runs))
            else:
                heapq.heappop(heap)
        return None

    def pop_with_minimums(self, batch_size: int, minimums: Sequence[tuple[EnvKey, float]]) -> list[Group] | None:
        """Remove and return the next batch that gives every environment in `minimums`
        (connected envs with a `min_batch_allocation`, in registration order) its
        share, as `take_with_min_allocations` (the same oracle) would choose it, or None."""
        if not self.groups:
            return None
        if not minimums:
            return self.pop_exact(batch_size)
        pack = self.max_size

        def packable_sizes(env: EnvKey) -> list[tuple[int, Fifo]]:
            out = []
            for size in self._env_sizes.get(env, ()):
                fifo = self._by_env_size[(env, size)]
                if not pack % size and len(fifo) >= pack // size:
                    out.append((size, fifo))
            return out

        owed: dict[EnvKey, int] = {}
        for env, fraction in minimums:
            wanted = int(batch_size * fraction)
            if wanted <= 0:
                continue
            if env not in self._env_sizes or not packable_sizes(env):
                return None
            owed[env] = wanted
        total_owed = sum(owed.values())
        if total_owed > batch_size:
            scale = batch_size / total_owed
            for env in owed:
                smallest = min(size for size, _ in packable_sizes(env))
                owed[env] = max(smallest, int(owed[env] * scale))

        picked: list[Group] = []
        taken: set[int] = set()
        total = 0
        # Minimums first: each env's packs in completion order, taking what fits.
        for env, wanted in owed.items():
            got = 0
            heap = []
            for size, fifo in packable_sizes(env):
                runs = _chunks(fifo, pack // size)
                first = next(runs)
                self.examined += len(first)
                heap.append((first[-1].qpos, size, first, runs))
            heapq.heapify(heap)
            while heap and got < wanted:
                _, size, members, runs = heap[0]
                fits = True
                for group in members:
                    if got >= wanted:
                        break
                    if total + size > batch_size:
                        # Nothing of this size fits any more: the total only grows.
                        fits = False
                        break
                    picked.append(group)
                    taken.add(group.qpos)
                    got += size
                    total += size
                run = next(runs, None) if fits else None
                if run is not None:
                    self.examined += len(run)
                    heapq.heapreplace(heap, (run[-1].qpos, size, run, runs))
                else:
                    heapq.heappop(heap)

        # Then the rest of the batch from every env's packs, in queue order.
        if total < batch_size:
            fill = []
            for (_env, size), fifo in self._by_env_size.items():
                chunk = pack // size
                packable = (len(fifo) // chunk) * chunk if not pack % size else 0
                if packable and size <= batch_size - total:
                    it = islice(fifo.values(), packable)
                    group = next(it)
                    self.examined += 1
                    fill.append((group.qpos, size, group, it))
            heapq.heapify(fill)
            while fill and total < batch_size:
                _, size, group, it = fill[0]
                if size > batch_size - total:
                    heapq.heappop(fill)
                    continue
                if group.qpos not in taken:
                    picked.append(group)
                    total += size
                if (nxt := next(it, None)) is not None:
                    self.examined += 1
                    heapq.heapreplace(fill, (nxt.qpos, size, nxt, it))
                else:
                    heapq.heappop(fill)

        if total != batch_size:
            return None
        self.remove_all(picked)
        return picked

    # -- staleness -------------------------------------------------------------

    def pop_older_than(self, version: int) -> list[Group]:
        """Remove and return every group whose version is below `version`; the work is
        the groups returned (plus versions already emptied)."""
        out: list[Group] = []
        while self._version_heap and self._version_heap[0] < version:
            # pop, not get: a version can sit in the heap twice (emptied, then reused).
            fifo = self._by_version.pop(heapq.heappop(self._version_heap), None)
            if fifo:
                out.extend(fifo.values())
        self.remove_all(out)
        return out
