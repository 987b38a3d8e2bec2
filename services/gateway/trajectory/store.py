"""The journal interface the trajectory state's changes are appended to, and the
store that keeps nothing.

The trajectory state lives in memory (queue_index.py, state.py); every change to it
is appended to a `Store`, in order, as an operation on rows (journal.py turns the
state's records into these rows and back). A caller that must not answer before its
change is durable (a 200 on /scored_data, a batch handed out) awaits `sync()`, which
resolves once everything appended before the call is committed. `Store` itself keeps
nothing (`--store memory`, tests); sqlite_store.py is the durable one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

# A group row: (id, qpos or None, env_id, size, versions JSON, body JSON).
GroupRow = tuple[int, "int | None", "int | None", int, bytes, bytes]


@dataclass
class Snapshot:
    """What the store held when it was opened."""

    meta: dict[str, bytes] = field(default_factory=dict)
    envs: list[tuple[int, bytes]] = field(default_factory=list)
    groups: list[GroupRow] = field(default_factory=list)
    ready: list[tuple[int, bytes]] = field(default_factory=list)  # (formation, batches JSON)
    receipts: list[tuple[int, int]] = field(default_factory=list)  # (key, version), oldest first
    kept: list[tuple[int, bytes]] = field(default_factory=list)  # (step, group ids), by step


class Store:
    """The journal the trajectory state appends its changes to. This base keeps
    nothing: the gateway's state lives only in memory (`--store memory`, tests)."""

    durable = False

    def load(self) -> Snapshot:
        return Snapshot()

    def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def check(self) -> None:
        """Raise if changes can no longer be made durable (call before mutating)."""

    def insert_groups(self, rows: list[GroupRow]) -> None:
        pass

    def enqueue_groups(self, moves: list[tuple[int, int]]) -> None:
        """Buffered groups entered the queue: (qpos, id) pairs."""

    def form_batches(self, formation: int, batches: bytes) -> None:
        """Batches one /batch call formed and keeps for later calls: a JSON list of
        lists of group ids."""

    def delete_groups(self, ids: list[int], formation: int | None = None) -> None:
        """Groups handed out or dropped; `formation` when they were the last batch
        kept from that formation."""

    def keep_batch(self, step: int, ids: list[int]) -> None:
        """A batch handed out to an acknowledging trainer: its groups stay, recorded as
        the batch of `step`, until a trainer checkpoint holds it."""

    def release_batches(self, steps: list[int], ids: list[int]) -> None:
        """Kept batches a checkpoint holds (or past their bound): forget them and
        their groups, in one transaction."""

    def put_meta(self, key: str, value: bytes) -> None:
        pass

    def put_env(self, env_id: int, record: bytes) -> None:
        pass

    def put_receipt(self, key: int, version: int) -> None:
        """A served completion's version (receipts.py); not waited for."""

    def reset(self) -> None:
        """Forget groups, batches and environments (meta is rewritten by the caller)."""

    async def sync(self) -> None:
        """Return once every change appended so far is durable."""


def open_store(kind: str, directory: str | os.PathLike, fsync: bool = False, receipt_capacity: int = 100_000) -> Store:
    """The store the settings name: "sqlite" (durable, in `directory`) or "memory"."""
    if kind == "memory":
        return Store()
    if kind == "sqlite":
        # The SQLite store's module loads only when a gateway asks for it.
        from services.gateway.trajectory.sqlite_store import SqliteStore

        return SqliteStore(directory, fsync=fsync, receipt_capacity=receipt_capacity)
    raise ValueError(f"unknown store {kind!r}; use 'sqlite' or 'memory'")
