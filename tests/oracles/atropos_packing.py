"""Atropos' batch packing rules as pure functions over group sizes: the oracle the
gateway's indexed queue (services/gateway/trajectory/queue_index.py) is tested against.

A queue item is a group of sequences that may not be split. Atropos forms a batch of
exactly `batch_size` sequences by first combining small groups into "packs" whose
size equals the largest group size in the queue (same-size groups, in queue order,
until they add up to it), then taking packs in the order they completed. These
functions return the chosen queue indices, in batch order, so that the result is
identical to `atroposlib.api.utils` while stopping as soon as the batch is full and
using sets and bitsets where the reference rescans lists.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence


def take_exact(sizes: Sequence[int], batch_size: int) -> list[int] | None:
    """Indices of the groups that form the next batch of exactly `batch_size`
    sequences, or None when no such batch can be formed yet.

    Same result as `grab_exact_from_heterogeneous_queue`: packs of the largest group
    size are walked in completion order and the batch is their prefix that adds up to
    `batch_size` exactly; overshooting means no batch.
    """
    if not sizes or batch_size <= 0:
        return None
    pack_size = max(sizes)
    pending: dict[int, list[int]] = {}
    picked: list[int] = []
    running = 0
    for index, size in enumerate(sizes):
        bucket = pending.setdefault(size, [])
        bucket.append(index)
        if len(bucket) * size != pack_size:
            continue
        for member in bucket:
            picked.append(member)
            running += sizes[member]
            if running == batch_size:
                return picked
            if running > batch_size:
                return None
        bucket.clear()
    return None


def take_with_min_allocations(
    sizes: Sequence[int],
    env_ids: Sequence[Hashable | None],
    batch_size: int,
    minimums: Sequence[tuple[Hashable, float]],
) -> list[int] | None:
    """Like `take_exact`, but every environment in `minimums` (connected environments
    with a `min_batch_allocation`, in registration order) first gets its share.

    Same result as `grab_batch_with_minimum_allocations`: packs are formed per
    environment; an environment owed sequences that has no pack means no batch;
    shares over 100% are scaled down (keeping at least one group); minimums are
    filled environment by environment in pack order, then the rest of the batch in
    queue order. Groups without an env_id never enter such a batch.
    """
    if not sizes:
        return None
    if not minimums:
        return take_exact(sizes, batch_size)

    pack_size = max(sizes)
    pending: dict[tuple[Hashable, int], list[int]] = {}
    packable: dict[Hashable, list[int]] = {}
    for index, (size, env) in enumerate(zip(sizes, env_ids)):
        if env is None:
            continue
        env_packs = packable.setdefault(env, [])
        bucket = pending.setdefault((env, size), [])
        bucket.append(index)
        if len(bucket) * size == pack_size:
            env_packs.extend(bucket)
            bucket.clear()

    owed: dict[Hashable, int] = {}
    for env, fraction in minimums:
        wanted = int(batch_size * fraction)
        if wanted <= 0:
            continue
        if not packable.get(env):
            return None
        owed[env] = wanted
    total_owed = sum(owed.values())
    if total_owed > batch_size:
        scale = batch_size / total_owed
        for env in owed:
            smallest = min(sizes[i] for i in packable[env])
            owed[env] = max(smallest, int(owed[env] * scale))

    picked: list[int] = []
    taken: set[int] = set()
    total = 0
    for env, wanted in owed.items():
        got = 0
        for index in packable[env]:
            if got >= wanted:
                break
            if total + sizes[index] <= batch_size:
                picked.append(index)
                taken.add(index)
                got += sizes[index]
                total += sizes[index]

    if total < batch_size:
        eligible = {i for members in packable.values() for i in members}
        for index in range(len(sizes)):
            if index in taken or index not in eligible:
                continue
            if total + sizes[index] <= batch_size:
                picked.append(index)
                total += sizes[index]
            if total == batch_size:
                break

    return picked if total == batch_size else None
