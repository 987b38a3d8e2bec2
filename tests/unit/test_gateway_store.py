"""The SQLite store under a TrajectoryState: everything a state holds comes back after
a reopen (queue order, per-env buffers, batches formed but not handed out, envs,
trainer, started flag, step, versions, latest example); concurrent submissions share
commits; one gateway per directory; a failed store refuses changes."""

from __future__ import annotations

import asyncio
from array import array

import orjson
import pytest

from services.common.errors import FailedPrecondition, Unavailable
from services.gateway.trajectory import EnvRegistration, TrainerRegistration, TrajectoryState
from services.gateway.trajectory.scored_data import ATROPOS_KEYS
from services.gateway.trajectory.sqlite_store import SqliteStore


def group(size, env_id=None, tag=0, versions=None):
    g = dict.fromkeys(ATROPOS_KEYS)
    g.update(tokens=[[tag, i] for i in range(size)], masks=[[-100, i] for i in range(size)], scores=[0.5] * size)
    g["env_id"] = env_id
    if versions is not None:
        g["policy_versions"] = versions
    return g


def script(state: TrajectoryState) -> None:
    """A session that leaves something everywhere: queued groups of several sizes,
    a buffered group, batches /batch formed and kept, a disconnected env."""
    state.register_trainer(TrainerRegistration("g", "p", 4, 64, "/ckpt", 3, 5, 99))
    state.take_batch()
    state.register_env(EnvRegistration(64, "a", 1.0, 2))
    state.register_env(EnvRegistration(32, "b", 0.5, 4, min_batch_allocation=None))
    state.observe_version(3)
    state.submit([group(2, 0, tag=t) for t in range(1, 7)])  # three batches' worth
    state.submit([group(1, 0, tag=20)])  # buffered: env 0 wants groups of 2
    state.submit([group(4, 1, tag=30, versions=[1, 1, 2, 2]), group(2, None, tag=40)])
    assert state.take_batch() is not None  # forms 4 batches, hands out the last
    state.submit([group(4, 1, tag=50), group(2, 0, tag=60)])
    state.disconnect_env(1)
    state.env_status(0)


def snapshot(state: TrajectoryState) -> dict:
    return {
        "trainer": state.trainer,
        "step": state.step,
        "started": state.started,
        "envs": [(e.real_name, e.group_size, e.connected, e.weight) for e in state.envs],
        "queue": [(g.body, g.versions) for g in state.queue],
        "buffered": {env: [g.body for g in b] for env, b in state._buffers.items()},
        "ready": [[g.body for g in batch] for batch in state._ready],
        "latest": state.latest_example(),
        "version": state.policy_version,
        "held": (state.held_groups, state.held_bytes),
    }


async def test_everything_comes_back_after_a_reopen(tmp_path):
    store = SqliteStore(tmp_path)
    durable = TrajectoryState(store)
    store.start()
    script(durable)
    await store.sync()
    before = snapshot(durable)
    assert before["ready"] and before["buffered"] and before["queue"]
    await store.close()

    reopened_store = SqliteStore(tmp_path)
    reopened = TrajectoryState(reopened_store)
    reopened_store.start()
    try:
        assert snapshot(reopened) == before
        # And it goes on exactly as a state that never stopped.
        twin = TrajectoryState()
        script(twin)
        for state in (twin, reopened):
            state.submit([group(1, 0, tag=70)])  # completes the buffered one
        while (expected := twin.take_batch()) is not None:
            got = reopened.take_batch()
            assert got is not None
            assert [g.body for g in got] == [g.body for g in expected]
            assert [g.versions for g in got] == [g.versions for g in expected]
        assert reopened.take_batch() is None and reopened.step == twin.step
        # Ids stay unique after a restart.
        reopened.submit([group(2, None, tag=80)])
        await reopened_store.sync()
    finally:
        await reopened_store.close()


async def test_reset_is_durable_and_keeps_the_latest_example(tmp_path):
    store = SqliteStore(tmp_path)
    state = TrajectoryState(store)
    store.start()
    script(state)
    latest = state.latest_example()
    state.reset()
    await store.close()
    store = SqliteStore(tmp_path)
    state = TrajectoryState(store)
    assert (state.trainer, state.step, state.started, state.envs, state.held_groups) == (None, 0, False, [], 0)
    assert state.latest_example() == latest and state.info() == (-1, 64)
    await store.close()


async def test_concurrent_submissions_share_commits(tmp_path):
    store = SqliteStore(tmp_path)
    state = TrajectoryState(store)
    store.start()

    async def submit(tag):
        state.submit([group(2, tag=tag)])
        await store.sync()

    await asyncio.gather(*(submit(t) for t in range(200)))
    # Every submission waited for its commit, yet they went in a few transactions.
    assert state.queue_size == 200
    assert store.commits < 50
    await store.close()
    store = SqliteStore(tmp_path)
    assert TrajectoryState(store).queue_size == 200
    await store.close()


async def test_one_gateway_per_directory(tmp_path):
    store = SqliteStore(tmp_path)
    with pytest.raises(FailedPrecondition, match="in use by another gateway"):
        SqliteStore(tmp_path)
    await store.close()
    await SqliteStore(tmp_path).close()  # free again once closed


async def test_a_failed_store_refuses_changes(tmp_path):
    store = SqliteStore(tmp_path)
    state = TrajectoryState(store)
    store.start()
    state.submit([group(2, tag=1)])
    await store.sync()
    store._append("bogus")  # a write that cannot be applied
    with pytest.raises(Unavailable, match="store failed"):
        await store.sync()
    with pytest.raises(Unavailable):
        state.submit([group(2, tag=2)])
    assert state.queue_size == 1
    await store.close()
    # What was committed before the failure is intact.
    store = SqliteStore(tmp_path)
    restored = TrajectoryState(store)
    assert [orjson.loads(g.body)["tokens"][0][0] for g in restored.queue] == [1]
    await store.close()


async def test_handed_out_groups_are_purged_after_the_commit_and_after_a_crash_between(tmp_path):
    """A hand-out commits as a small record; the groups' rows go in the next
    transaction. If the process dies between the two, the reopen finishes the purge,
    so those groups are never handed out again."""
    import sqlite3

    store = SqliteStore(tmp_path)
    state = TrajectoryState(store)
    store.start()
    state.register_trainer(TrainerRegistration("g", "p", 2, 64, "/ckpt", 3, 0, 99))
    state.submit([group(1, tag=t) for t in range(4)])
    taken = state.take_batch()  # forms two batches, hands out the last
    assert taken is not None
    await store.sync()
    ids = {g.id for g in taken}
    await store.close()
    assert store.purges >= 1
    with sqlite3.connect(tmp_path / "trajectories.sqlite3") as db:
        rows = {r[0] for r in db.execute("SELECT id FROM groups")}
        assert not ids & rows and len(rows) == 2
        assert db.execute("SELECT count(*) FROM handed").fetchone() == (0,)
        # A crash after the hand-out committed, before its purge: the record is
        # there and the rows too.
        kept_ids = sorted(rows)
        db.execute("INSERT INTO handed (ids) VALUES (?)", (array("q", kept_ids[:1]).tobytes(),))

    reopened_store = SqliteStore(tmp_path)
    reopened = TrajectoryState(reopened_store)
    reopened_store.start()
    try:
        assert reopened.held_groups == 1
        remaining = [g.id for batch in reopened._ready for g in batch] + [g.id for g in reopened.queue]
        assert kept_ids[0] not in remaining
    finally:
        await reopened_store.close()


async def test_receipts_come_back_after_a_reopen_newest_capacity_only(tmp_path):
    """Receipts recorded while the gateway served completions are in the store; a
    reopened gateway attributes data to the versions that produced it, keeps only the
    newest `capacity`, and knows the newest served version."""
    from services.gateway.trajectory.receipts import Receipts

    store = SqliteStore(tmp_path, receipt_capacity=3)
    receipts = Receipts(capacity=3)
    TrajectoryState(store, receipts)
    store.start()
    for i, version in enumerate([1, 1, 2, 3]):
        receipts.record([100 + i, 7], version)
    receipts.record([100, 7], 4)  # served again: now the newest
    await store.sync()
    await store.close()

    reopened_receipts = Receipts(capacity=3)
    reopened_store = SqliteStore(tmp_path, receipt_capacity=3)
    reopened = TrajectoryState(reopened_store, reopened_receipts)
    reopened_store.start()
    try:
        assert reopened_receipts.lookup((100, 7)) == 4
        assert reopened_receipts.lookup((101, 7)) is None  # the oldest, trimmed
        assert [reopened_receipts.lookup((100 + i, 7)) for i in (2, 3)] == [2, 3]
        assert reopened.policy_version == 4
        reopened.register_trainer(TrainerRegistration("g", "p", 1, 64, "/ckpt", 3, 0, 99))
        g = group(1, tag=5)
        g.update(tokens=[[1, 102, 7]], masks=[[-100, 102, 7]])
        reopened.submit([g])
        batch = reopened.take_batch()
        assert batch is not None
        assert batch[0].versions == (2,)
    finally:
        await reopened_store.close()


async def test_sqlite_memory_stays_under_its_cap_whatever_the_commit_sizes(tmp_path):
    """The mesh's cycle (ingest, a batch kept for an acknowledging trainer, released
    past the bound or by a checkpoint) with commits of every size from 1 to 300 groups
    and a few floods: SQLite's heap stays under MEMORY_CAP_BYTES. One prepared
    statement per distinct row count used to stay cached (128 of them, ~650 bytes a
    row), so varied commit sizes filled 35 MB here (the cap is 8 MiB), slowly enough
    to read as a slope in a soak."""
    import gc

    from services.gateway.trajectory.sqlite_store import MEMORY_CAP_BYTES, sqlite_memory_used

    gc.collect()
    baseline = sqlite_memory_used()
    if baseline is None:
        pytest.skip("sqlite3_memory_used cannot be read here (no shared libsqlite3 mapped)")
    store = SqliteStore(tmp_path)
    state = TrajectoryState(store, max_kept_batches=4)
    store.start()
    try:
        state.register_trainer(TrainerRegistration("g", "p", 8, 64, "/ckpt", 3, 0, 99))
        state.open_acknowledged(0, 0)
        after, most = 0, 0
        sizes = [*range(1, 301), 2000, 5000, 3, 4097]
        for n, groups in enumerate(sizes):
            state.observe_version(n)
            state.submit([group(2, tag=n) for _ in range(groups)])
            await store.sync()
            while (taken := state.take_acknowledged(after)) is not None:
                after = taken[1]
            if n % 7 == 0:
                state.acknowledge(after)
            await store.sync()
            used = store.memory_bytes
            assert used is not None
            most = max(most, used - baseline)
        assert state.kept_batches <= 4 and state.queue_size < 4
        assert most <= MEMORY_CAP_BYTES, f"SQLite held {most} bytes, over its cap of {MEMORY_CAP_BYTES}"
    finally:
        await store.close()


async def test_metrics_show_sqlite_memory_and_the_wal(tmp_path):
    """`/metrics` carries the store's SQLite heap and WAL size (read at scrape time)."""
    from services.gateway.http.metrics import metrics_response
    from services.gateway.trajectory.sqlite_store import sqlite_memory_used

    store = SqliteStore(tmp_path)
    state = TrajectoryState(store)
    store.start()
    try:
        state.submit([group(2, tag=1)])
        await store.sync()
        lines = bytes(metrics_response(state).body).decode().splitlines()
        values = {line.split()[0]: float(line.split()[1]) for line in lines if line and not line.startswith("#")}
        assert values["clotho_gateway_store_wal_bytes"] > 0
        if sqlite_memory_used() is not None:
            assert values["clotho_gateway_store_sqlite_bytes"] > 0
    finally:
        await store.close()
