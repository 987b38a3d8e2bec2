"""Atropos' buffer rule: which buffered groups of an environment make up its group
size (`find_groups_summing_to_target` in atroposlib.api.utils), as a pure function
over group sizes."""

from __future__ import annotations

from collections.abc import Sequence


def find_subset_summing_to(sizes: Sequence[int], target: int) -> list[int]:
    """Indices (ascending) of buffered groups whose sizes add up to `target`, or [].

    Same result as `find_groups_summing_to_target`: a first-fit pass in FIFO order,
    then an exact subset sum whose backtrack takes the latest usable group first.
    The subset-sum table is a list of bitsets (bit j of row i: sum j is reachable with
    the first i groups) instead of a boolean matrix.
    """
    if not sizes:
        return []
    chosen: list[int] = []
    running = 0
    for index, size in enumerate(sizes):
        if running + size <= target:
            chosen.append(index)
            running += size
            if running == target:
                return chosen

    if target < 0:
        return []
    mask = (1 << (target + 1)) - 1
    reachable = [1]
    for size in sizes:
        row = reachable[-1]
        reachable.append((row | (row << size)) & mask)
    if not (reachable[-1] >> target) & 1:
        return []
    chosen = []
    remaining = target
    for index in range(len(sizes) - 1, -1, -1):
        size = sizes[index]
        if remaining >= size and (reachable[index] >> (remaining - size)) & 1:
            chosen.append(index)
            remaining -= size
    chosen.reverse()
    return chosen
