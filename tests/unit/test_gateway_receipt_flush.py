"""Receipts (nobody waits for them) ride with the next change's commit instead of
committing on their own; alone, they commit RECEIPT_FLUSH_SECONDS later, or at a
sync() or close()."""

from __future__ import annotations

import asyncio

from services.gateway.trajectory import TrainerRegistration, TrajectoryState
from services.gateway.trajectory import sqlite_store as sqlite_module
from services.gateway.trajectory.receipts import Receipts
from services.gateway.trajectory.scored_data import ATROPOS_KEYS
from services.gateway.trajectory.sqlite_store import SqliteStore
from waiting import wait_until


def group(tag: int) -> dict:
    g = dict.fromkeys(ATROPOS_KEYS)
    g.update(tokens=[[tag, 7]], masks=[[-100, 7]], scores=[1.0])
    return g


async def settle() -> None:
    """A few turns of the loop (a flush scheduled for now would have run)."""
    for _ in range(5):
        await asyncio.sleep(0.01)


def stored_receipts(store: SqliteStore) -> int:
    return store._conn.execute("SELECT count(*) FROM receipts").fetchone()[0]


async def test_receipts_ride_with_the_next_change(tmp_path, monkeypatch):
    monkeypatch.setattr(sqlite_module, "RECEIPT_FLUSH_SECONDS", 30.0)
    store = SqliteStore(tmp_path)
    receipts = Receipts(capacity=100)
    state = TrajectoryState(store, receipts)
    store.start()
    try:
        state.register_trainer(TrainerRegistration("g", "p", 8, 64, "/ckpt", 3, 0, 99))
        await store.sync()
        commits = store.commits
        for i in range(8):
            receipts.record([100 + i, 7], 2)
        await settle()
        assert store.commits == commits  # waiting for a change (or the timer)
        state.submit([group(1)])
        await store.sync()
        assert store.commits == commits + 1  # one commit: the receipts and the group
        assert stored_receipts(store) == 8
    finally:
        await store.close()


async def test_receipts_alone_commit_after_a_while_or_at_a_sync_or_close(tmp_path, monkeypatch):
    monkeypatch.setattr(sqlite_module, "RECEIPT_FLUSH_SECONDS", 0.05)
    store = SqliteStore(tmp_path)
    receipts = Receipts(capacity=100)
    TrajectoryState(store, receipts)
    store.start()
    try:
        receipts.record([1, 7], 3)
        await wait_until(lambda: store.commits)  # the flush timer's commit
        assert store.commits == 1 and stored_receipts(store) == 1
        monkeypatch.setattr(sqlite_module, "RECEIPT_FLUSH_SECONDS", 30.0)
        receipts.record([2, 7], 3)
        await store.sync()  # goes at once
        assert store.commits == 2 and stored_receipts(store) == 2
        receipts.record([3, 7], 3)
    finally:
        await store.close()  # commits what waits
    reopened_receipts = Receipts(capacity=100)
    reopened = SqliteStore(tmp_path)
    TrajectoryState(reopened, reopened_receipts)
    reopened.start()
    try:
        assert [reopened_receipts.lookup((k, 7)) for k in (1, 2, 3)] == [3, 3, 3]
    finally:
        await reopened.close()
