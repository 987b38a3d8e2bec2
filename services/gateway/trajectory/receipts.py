"""Version receipts: which policy version produced a completion the gateway served.

Atropos' ScoredData carries no policy version, so the gateway remembers the recent
completions it served through /generate and the OpenAI routes (a bounded LRU map from
a hash of the completion's token ids to the version that produced them) and, when a
scored sequence comes back whose completion tokens (the tokens whose mask is not
-100) hash to a receipt, tags the sequence with that version (ARCHITECTURE section 2).

The inference routes call the module-level `record(token_ids, version)`; the
trajectory state looks receipts up through the same process-wide `Receipts`. With a
durable store the state gives the receipts a `sink` that appends each one to the
store (without waiting for the commit: a receipt recorded in the last moments before
a crash may be lost, and that data then gets the version current at submission, as
an unmatched sequence does), and a restart loads the newest `capacity` back. Keys are
Python's hash of a tuple of ints, which is the same in every process of one Python
version (no hash seed), not necessarily across Python versions.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from itertools import compress, repeat
from operator import ne

# Prompt tokens carry this label in Atropos' masks.
PROMPT_LABEL = -100
DEFAULT_CAPACITY = 100_000


def completion_key(token_ids: Iterable[int]) -> int:
    """The key of a completion: a 64-bit hash of its token ids (ints hash the same in
    every process run, so this needs no seed)."""
    return hash(tuple(token_ids))


def completion_tokens(tokens: Sequence[int], masks: Sequence[int]) -> tuple[int, ...]:
    """The tokens of a scored sequence that the policy generated (mask != -100)."""
    return tuple(compress(tokens, map(ne, masks, repeat(PROMPT_LABEL))))


class Receipts:
    """A bounded LRU map from completion keys to policy versions, plus the newest
    version seen (inference results also tell the gateway the current version).

    `record` may be called from any thread (the inference routes run on the event
    loop today, but nothing here depends on it)."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self.newest_version = 0
        self._map: OrderedDict[int, int] = OrderedDict()
        self._lock = threading.Lock()
        # Called with (key, version) for every receipt recorded (persistence).
        self.sink: Callable[[int, int], None] | None = None

    def __len__(self) -> int:
        return len(self._map)

    def record(self, completion_token_ids: Iterable[int], version: int) -> None:
        """Remember that `version` produced this completion."""
        if self.capacity <= 0:
            return
        key = completion_key(completion_token_ids)
        with self._lock:
            self._map[key] = version
            self._map.move_to_end(key)
            while len(self._map) > self.capacity:
                self._map.popitem(last=False)
            if version > self.newest_version:
                self.newest_version = version
        if self.sink is not None:
            self.sink(key, version)

    def restore(self, receipts: Iterable[tuple[int, int]], newest_version: int) -> None:
        """Load (key, version) pairs, oldest first (what a store kept), without
        sending them to the sink."""
        with self._lock:
            for key, version in receipts:
                self._map[key] = version
                self._map.move_to_end(key)
            while len(self._map) > self.capacity:
                self._map.popitem(last=False)
            self.newest_version = max(self.newest_version, newest_version)

    def lookup(self, completion: Sequence[int]) -> int | None:
        """The version that produced `completion` (its generated token ids), if served
        recently."""
        if not self._map:
            return None
        return self._map.get(completion_key(completion))

    def clear(self) -> None:
        with self._lock:
            self._map.clear()


# The process-wide receipts the gateway's routes and trajectory state share.
default = Receipts()


def record(completion_token_ids: Iterable[int], version: int) -> None:
    """Remember that `version` produced this completion (called for every completion
    the gateway's inference routes return)."""
    default.record(completion_token_ids, version)
