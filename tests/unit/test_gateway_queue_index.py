"""QueueIndex: the same batches as Atropos' packing functions (the installed
atroposlib) on random queues with arrivals between batches, and work that grows with
the batch, not with the queue."""

from __future__ import annotations

import random

from atroposlib.api import utils as reference

from services.gateway.trajectory.queue_index import VERSION_HEAP_SLACK, Group, QueueIndex


class Queue:
    """The same queue twice: as Atropos' list of dicts and as a QueueIndex."""

    def __init__(self) -> None:
        self.index = QueueIndex()
        self.items: list[dict] = []
        self.next_qpos = 0

    def append(self, size: int, env_id=None, version: int = 0) -> None:
        qpos = self.next_qpos
        self.next_qpos += 1
        self.index.add(Group(id=qpos, size=size, env_id=env_id, body=b"{}", versions=[version] * size, qpos=qpos))
        self.items.append({"tokens": [[qpos]] * size, "env_id": env_id, "i": qpos})

    def take_both(self, batch_size: int, envs: list[dict] | None = None):
        if envs is None:
            batch, self.items = reference.grab_exact_from_heterogeneous_queue(self.items, batch_size)
            ours = self.index.pop_exact(batch_size)
        else:
            batch, self.items = reference.grab_batch_with_minimum_allocations(self.items, batch_size, envs)
            minimums = [
                (e["registered_id"], e["min_batch_allocation"])
                for e in envs
                if e["connected"] and e["min_batch_allocation"] is not None
            ]
            ours = self.index.pop_with_minimums(batch_size, minimums)
        expected = None if batch is None else [g["i"] for g in batch]
        got = None if ours is None else [g.qpos for g in ours]
        return expected, got


def test_exact_packing_matches_atropos_with_arrivals_between_batches():
    rng = random.Random(11)
    for trial in range(400):
        queue = Queue()
        batch_size = rng.choice([1, 2, 4, 6, 8, 16])
        sizes = rng.choice([[1, 2, 4, 8], [2, 4], [8], [1, 3, 6], [4, 4, 2, 16]])
        for _ in range(rng.randint(1, 12)):
            for _ in range(rng.randint(0, 10)):
                queue.append(rng.choice(sizes))
            for _ in range(rng.randint(0, 3)):
                expected, got = queue.take_both(batch_size)
                assert got == expected, (trial, batch_size)
        assert queue.index.groups == len(queue.items)
        assert queue.index.sequences == sum(len(g["tokens"]) for g in queue.items)
        assert [g.qpos for g in queue.index] == [g["i"] for g in queue.items]


def test_minimum_allocations_match_atropos_with_arrivals_between_batches():
    rng = random.Random(12)
    for trial in range(400):
        n_envs = rng.randint(1, 4)
        envs = [
            {
                "registered_id": e,
                "connected": rng.random() < 0.85,
                "min_batch_allocation": rng.choice([None, 0.0, 0.1, 0.25, 0.5, 0.7, 1.0]),
            }
            for e in range(n_envs)
        ]
        queue = Queue()
        batch_size = rng.choice([2, 4, 8, 10, 16])
        for _ in range(rng.randint(1, 10)):
            for _ in range(rng.randint(0, 12)):
                env_id = rng.choice([*range(n_envs), None, 7]) if rng.random() < 0.1 else rng.randrange(n_envs)
                queue.append(rng.choice([1, 2, 2, 4, 4, 8, 3]), env_id)
            for _ in range(rng.randint(0, 3)):
                expected, got = queue.take_both(batch_size, envs)
                assert got == expected, (trial, batch_size, envs)


def test_status_counters_follow_the_queue():
    queue = Queue()
    for size, env in [(2, 0), (4, 0), (1, 1), (2, None), (8, 1)]:
        queue.append(size, env)
    index = queue.index
    assert (index.max_size, index.env_max_size(0), index.env_max_size(1), index.env_max_size(5)) == (8, 4, 8, 0)
    assert index.env_sequences() == {0: 6, 1: 9, None: 2}
    popped = index.pop_exact(8)
    assert popped is not None
    assert [g.qpos for g in popped] == [4]
    assert (index.max_size, index.env_max_size(1)) == (4, 1)
    assert index.env_sequences() == {0: 6, 1: 1, None: 2}


def test_stale_groups_come_out_by_version_without_touching_the_rest():
    queue = Queue()
    for version in [3, 1, 2, 5, 1, 4]:
        queue.append(2, version=version)
    index = queue.index
    assert sorted(g.version for g in index.pop_older_than(3)) == [1, 1, 2]
    assert index.pop_older_than(3) == []
    assert [g.version for g in index] == [3, 5, 4]
    queue.append(2, version=0)
    assert sorted(g.version for g in index.pop_older_than(4)) == [0, 3]
    assert index.groups == 2


def deep_queue(groups: int, env_ids=(None,)) -> QueueIndex:
    index = QueueIndex()
    for qpos in range(groups):
        index.add(Group(id=qpos, size=8, env_id=env_ids[qpos % len(env_ids)], body=b"", versions=[0] * 8, qpos=qpos))
    return index


def test_batch_assembly_work_does_not_grow_with_the_queue():
    """A batch of 64 sequences (8 groups of 8) looks at the same number of groups
    whether 100 or 100,000 are queued; a scan would look at all of them."""
    work = {}
    for depth in (100, 100_000):
        index = deep_queue(depth)
        index.examined = 0
        for _ in range(10):
            popped = index.pop_exact(64)
            assert popped is not None
            assert len(popped) == 8
        work[depth] = index.examined
    assert work[100] == work[100_000] <= 10 * (8 + 1)

    for depth in (100, 100_000):
        index = deep_queue(depth, env_ids=(0, 1, 2))
        index.examined = 0
        for _ in range(10):
            batch = index.pop_with_minimums(64, [(0, 0.25), (1, 0.25)])
            assert batch is not None
            assert sum(g.size for g in batch) == 64
        work[depth] = index.examined
    assert work[100] == work[100_000] <= 10 * 3 * (8 + 3)


def test_the_version_heap_stays_bounded_without_a_staleness_bound():
    """clotho up: no staleness bound (nothing calls pop_older_than) and a new policy
    version every step. The heap of versions gained one entry per version for good (the
    gateway's soak slope, ~40 bytes a step); it now holds at most twice the live
    versions plus VERSION_HEAP_SLACK, and staleness still finds every old group after
    its rebuilds."""
    queue = Queue()
    index = queue.index
    rng = random.Random(0)
    most = 0
    for step in range(1, 10_001):
        # A group of this step's version and one of a recent one (versions empty out
        # of order), then a batch of two.
        queue.append(4, version=step)
        queue.append(4, version=max(0, step - rng.randrange(5)))
        assert index.pop_exact(8) is not None
        most = max(most, len(index._version_heap))
        assert len(index._version_heap) <= 2 * len(index._by_version) + VERSION_HEAP_SLACK
    assert most <= 2 * 10 + VERSION_HEAP_SLACK, most
    live = sorted(g.version for g in index)
    floor = live[len(live) // 2] if live else 0
    assert sorted(g.version for g in index.pop_older_than(floor)) == [v for v in live if v < floor]
    assert sorted(g.version for g in index) == [v for v in live if v >= floor]
