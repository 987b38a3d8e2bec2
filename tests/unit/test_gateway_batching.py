"""Atropos' packing rules: crafted queues with results worked out by hand from the
rules, and the reference functions of the installed atroposlib on many random queues."""

from __future__ import annotations

import random

import pytest
from atroposlib.api import utils as reference
from oracles.atropos_packing import take_exact, take_with_min_allocations

from services.gateway.trajectory.packing import find_subset_summing_to


def queue_of(sizes, env_ids=None):
    env_ids = env_ids or [None] * len(sizes)
    return [{"tokens": [[i]] * s, "env_id": e, "i": i} for i, (s, e) in enumerate(zip(sizes, env_ids))]


def ref_exact(sizes, batch_size):
    queue = queue_of(sizes)
    batch, _ = reference.grab_exact_from_heterogeneous_queue(queue, batch_size)
    return None if batch is None else [g["i"] for g in batch]


def ref_min(sizes, env_ids, batch_size, envs):
    queue = queue_of(sizes, env_ids)
    batch, _ = reference.grab_batch_with_minimum_allocations(queue, batch_size, envs)
    return None if batch is None else [g["i"] for g in batch]


def minimums_of(envs):
    return [
        (e["registered_id"], e["min_batch_allocation"])
        for e in envs
        if e.get("connected", False) and e.get("min_batch_allocation") is not None
    ]


@pytest.mark.parametrize(
    "sizes, batch_size, expected",
    [
        # Equal groups: each is a pack; the first two fill the batch.
        ([2, 2, 2, 2, 2], 4, [0, 1]),
        # The only group of the largest size is a pack by itself and fills the batch.
        ([1, 2, 1, 4], 4, [3]),
        # Single-sequence groups pair up into packs of 2 in queue order.
        ([2, 1, 1, 2, 1, 1], 4, [0, 1, 2]),
        # Packs are taken in the order they complete, not in queue order.
        ([1, 2, 1, 2], 4, [1, 0, 2]),
        # A batch may end inside a pack.
        ([4, 2, 2], 6, [0, 1]),
        # Packs of 3 jump over a batch of 4: no batch.
        ([3, 3, 3], 4, None),
        # Groups of 3 never make a pack of 8; only the 8 can be taken.
        ([3, 3, 3, 8], 8, [3]),
        ([3, 3, 3, 8], 16, None),
        # Not enough sequences.
        ([2, 2], 8, None),
        ([], 4, None),
    ],
)
def test_take_exact_crafted(sizes, batch_size, expected):
    assert take_exact(sizes, batch_size) == expected
    assert ref_exact(sizes, batch_size) == expected


def test_take_with_min_allocations_crafted():
    envs = [
        {"registered_id": 0, "connected": True, "min_batch_allocation": 0.5},
        {"registered_id": 1, "connected": True, "min_batch_allocation": None},
    ]
    env_ids: list[int | None]
    sizes, env_ids = [2, 2, 2, 2], [1, 1, 0, 0]
    # env 0 is owed 2 sequences: its first pack; the rest in queue order (index 0).
    assert take_with_min_allocations(sizes, env_ids, 4, minimums_of(envs)) == [2, 0]
    assert ref_min(sizes, env_ids, 4, envs) == [2, 0]

    # An environment that is owed sequences but has no pack blocks the batch.
    sizes, env_ids = [2, 2, 1], [1, 1, 0]
    assert take_with_min_allocations(sizes, env_ids, 4, minimums_of(envs)) is None
    assert ref_min(sizes, env_ids, 4, envs) is None

    # Groups without an env_id never enter a batch when minimums apply.
    sizes, env_ids = [2, 2, 2], [None, 0, 0]
    assert take_with_min_allocations(sizes, env_ids, 4, minimums_of(envs)) == [1, 2]
    assert ref_min(sizes, env_ids, 4, envs) == [1, 2]

    # Minimums over 100% are scaled down: 8 and 6 of 10 become 5 and 4.
    envs = [
        {"registered_id": 0, "connected": True, "min_batch_allocation": 0.8},
        {"registered_id": 1, "connected": True, "min_batch_allocation": 0.6},
    ]
    sizes, env_ids = [1] * 12, [0, 1] * 6
    expected = [0, 2, 4, 6, 8, 1, 3, 5, 7, 9]
    assert take_with_min_allocations(sizes, env_ids, 10, minimums_of(envs)) == expected
    assert ref_min(sizes, env_ids, 10, envs) == expected

    # Disconnected environments' minimums do not count: plain packing.
    envs = [{"registered_id": 0, "connected": False, "min_batch_allocation": 0.5}]
    assert take_with_min_allocations([2, 2], [1, 1], 4, minimums_of(envs)) == [0, 1]
    assert ref_min([2, 2], [1, 1], 4, envs) == [0, 1]


@pytest.mark.parametrize(
    "sizes, target, expected",
    [
        ([1, 3, 2, 1], 4, [0, 1]),  # first fit in FIFO order
        ([3, 2, 2], 4, [1, 2]),  # first fit fails; exact subset
        ([2, 3, 1, 2], 4, [0, 3]),  # backtracking prefers the latest usable group
        ([3, 3, 2], 4, []),  # impossible
        ([], 4, []),
    ],
)
def test_find_subset_crafted(sizes, target, expected):
    assert find_subset_summing_to(sizes, target) == expected
    assert reference.find_groups_summing_to_target(queue_of(sizes), target) == expected


def test_take_exact_matches_reference_on_random_queues():
    rng = random.Random(1234)
    for _ in range(3000):
        sizes = [rng.choice([1, 1, 2, 2, 4, 4, 8, 3, 6, 16]) for _ in range(rng.randint(0, 30))]
        batch_size = rng.choice([1, 2, 4, 6, 8, 12, 16, 32])
        assert take_exact(sizes, batch_size) == ref_exact(sizes, batch_size), (sizes, batch_size)


def test_min_allocations_match_reference_on_random_queues():
    rng = random.Random(99)
    for _ in range(3000):
        n_envs = rng.randint(1, 4)
        envs = [
            {
                "registered_id": e,
                "connected": rng.random() < 0.85,
                "min_batch_allocation": rng.choice([None, 0.0, 0.1, 0.25, 0.5, 0.7, 1.0]),
            }
            for e in range(n_envs)
        ]
        n = rng.randint(0, 30)
        sizes = [rng.choice([1, 2, 2, 4, 4, 8, 3]) for _ in range(n)]
        env_ids = [
            rng.choice([*range(n_envs), None]) if rng.random() < 0.1 else rng.randrange(n_envs) for _ in range(n)
        ]
        batch_size = rng.choice([2, 4, 8, 10, 16])
        got = take_with_min_allocations(sizes, env_ids, batch_size, minimums_of(envs))
        assert got == ref_min(sizes, env_ids, batch_size, envs), (sizes, env_ids, batch_size, envs)


def test_find_subset_matches_reference_on_random_buffers():
    rng = random.Random(7)
    for _ in range(3000):
        sizes = [rng.randint(1, 9) for _ in range(rng.randint(0, 12))]
        target = rng.randint(1, 24)
        expected = reference.find_groups_summing_to_target(queue_of(sizes), target)
        assert find_subset_summing_to(sizes, target) == expected, (sizes, target)


def test_draining_matches_reference():
    """Forming every batch the queue allows, as /batch does, gives the same batches."""
    rng = random.Random(5)
    for _ in range(300):
        sizes = [rng.choice([1, 2, 4, 8]) for _ in range(rng.randint(0, 40))]
        batch_size = rng.choice([4, 8, 16])
        ref_queue = queue_of(sizes)
        ref_batches = []
        while True:
            batch, ref_queue = reference.grab_exact_from_heterogeneous_queue(ref_queue, batch_size)
            if batch is None:
                break
            ref_batches.append([g["i"] for g in batch])
        ours, remaining = [], list(range(len(sizes)))
        while (picked := take_exact([sizes[i] for i in remaining], batch_size)) is not None:
            ours.append([remaining[k] for k in picked])
            chosen = set(picked)
            remaining = [i for k, i in enumerate(remaining) if k not in chosen]
        assert ours == ref_batches
