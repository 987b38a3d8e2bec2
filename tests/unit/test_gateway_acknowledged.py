"""Batches kept for an acknowledging trainer (acknowledged.py) on a real SQLite store:
kept until a checkpoint holds them, replayed in step order after a resume, purged on
acknowledgement, bounded, restored after a reopen; /batch stays at most once; a
failed commit leaves memory as the store holds it."""

from __future__ import annotations

import sqlite3

import orjson
import pytest

from services.common.errors import Unavailable
from services.gateway.trajectory import DurableState, EnvRegistration, Group, TrainerRegistration, TrajectoryState
from services.gateway.trajectory.scored_data import ATROPOS_KEYS
from services.gateway.trajectory.sqlite_store import DB_NAME, SqliteStore
from waiting import wait_until


def group(tag: int) -> dict:
    g = dict.fromkeys(ATROPOS_KEYS)
    g.update(tokens=[[tag, 1]], masks=[[-100, 1]], scores=[0.5])
    return g


def tags(batch) -> list[int]:
    return [orjson.loads(g.body)["tokens"][0][0] for g in batch]


def registration(batch_size: int = 2, starting_step: int = 0) -> TrainerRegistration:
    return TrainerRegistration("g", "p", batch_size, 64, "/ckpt", 2, starting_step, 99)


def take(state: TrajectoryState, after: int) -> tuple[list[Group], int]:
    """take_acknowledged where a batch is known to be ready."""
    taken = state.take_acknowledged(after)
    assert taken is not None
    return taken


async def open_state(path, **kwargs) -> tuple[SqliteStore, TrajectoryState]:
    store = SqliteStore(path)
    state = TrajectoryState(store, **kwargs)
    store.start()
    return store, state


def kept_rows(path) -> list[int]:
    with sqlite3.connect(path / DB_NAME) as db:
        return [r[0] for r in db.execute("SELECT step FROM kept ORDER BY step")]


def group_rows(path) -> int:
    with sqlite3.connect(path / DB_NAME) as db:
        return db.execute("SELECT count(*) FROM groups").fetchone()[0]


async def test_kept_until_checkpointed_then_replayed_in_order_after_a_resume(tmp_path):
    store, state = await open_state(tmp_path)
    state.register_trainer(registration())
    state.submit([group(t) for t in range(10)])  # five batches of two
    state.open_acknowledged(0, 0)
    trained: dict[int, list[int]] = {}
    after = 0
    for _ in range(3):
        batch, step = take(state, after)
        trained[step] = tags(batch)
        after = step
    assert list(trained) == [1, 2, 3] and state.step == 3
    assert state.kept_steps() == [1, 2, 3] and state.kept_groups == 6
    # Kept batches are not the queue's: /status and the capacity see 4 groups.
    assert (state.queue_size, state.held_groups) == (4, 4)
    await store.sync()
    assert kept_rows(tmp_path) == [1, 2, 3] and group_rows(tmp_path) == 10

    # The checkpoint of step 2 holds batches 1 and 2: forgotten, on disk too.
    state.acknowledge(2)
    await store.sync()
    assert state.kept_steps() == [3] and state.checkpointed_step == 2
    assert kept_rows(tmp_path) == [3]

    # The trainer dies and resumes from that checkpoint: batch 3 again, same step,
    # then new batches.
    state.open_acknowledged(2, 2)
    batch, step = take(state, 2)
    assert (step, tags(batch)) == (3, trained[3])
    batch, step = take(state, 3)
    assert step == 4 and not set(tags(batch)) & {t for b in trained.values() for t in b}
    trained[4] = tags(batch)
    assert state.counters.kept_replayed == 1
    await store.close()

    # The gateway restarts: the kept batches (3, 4), the step and the queue come back.
    store, state = await open_state(tmp_path)
    try:
        assert state.kept_steps() == [3, 4] and state.step == 4 and state.queue_size == 2
        assert state.checkpointed_step == 2
        state.open_acknowledged(2, 2)
        seen = []
        after = 2
        while (taken := state.take_acknowledged(after)) is not None:
            batch, after = taken
            seen.append((after, tags(batch)))
        assert seen[:2] == [(3, trained[3]), (4, trained[4])] and [s for s, _ in seen] == [3, 4, 5]
        # Every group exactly once per step: trained before the checkpoint (1, 2), then
        # everything after it.
        everything = trained[1] + trained[2] + [t for _, b in seen for t in b]
        assert sorted(everything) == list(range(10))
        state.acknowledge(5)
        await store.sync()
        assert state.kept_batches == 0 and kept_rows(tmp_path) == []
    finally:
        await store.close()
    assert group_rows(tmp_path) == 0


async def test_a_reconnect_without_a_restart_gets_only_what_it_has_not_consumed(tmp_path):
    store, state = await open_state(tmp_path)
    try:
        state.register_trainer(registration())
        state.submit([group(t) for t in range(6)])
        state.open_acknowledged(0, 0)
        first, _ = take(state, 0)
        second, _ = take(state, 1)
        # The stream broke after batch 1 reached the trainer, batch 2 did not.
        state.open_acknowledged(1, 0)
        batch, step = take(state, 1)
        assert (step, tags(batch)) == (2, tags(second))
        assert state.kept_steps() == [1, 2]  # nothing checkpointed yet
    finally:
        await store.close()


async def test_the_bound_releases_the_oldest_kept_batch(tmp_path):
    store, state = await open_state(tmp_path, max_kept_batches=2)
    try:
        state.register_trainer(registration())
        state.submit([group(t) for t in range(8)])
        state.open_acknowledged(0, 0)
        after = 0
        for _ in range(4):
            _, after = take(state, after)
        assert state.kept_steps() == [3, 4] and state.counters.kept_released == 2
        await store.sync()
        assert kept_rows(tmp_path) == [3, 4]
    finally:
        await store.close()


async def test_resume_keeps_the_step_at_least_the_trainers(tmp_path):
    store, state = await open_state(tmp_path)
    try:
        state.register_trainer(registration())
        state.submit([group(t) for t in range(2)])
        state.open_acknowledged(7, 7)
        assert state.step == 7
        _, step = take(state, 7)
        assert step == 8
    finally:
        await store.close()


async def test_batch_stays_at_most_once_beside_kept_batches(tmp_path):
    store, state = await open_state(tmp_path)
    try:
        state.register_trainer(registration())
        state.submit([group(t) for t in range(6)])
        state.open_acknowledged(0, 0)
        kept, _ = take(state, 0)
        # /batch never sees kept batches and deletes what it hands out.
        handed = state.take_batch()
        assert handed is not None and not set(tags(handed)) & set(tags(kept))
        # A stream without resume_step: at most once too.
        plain = state.take_next()
        assert plain is not None
        await store.sync()
        # The handed-out groups' rows go in the purge that follows the commit.
        await wait_until(lambda: group_rows(tmp_path) <= 2)
        assert kept_rows(tmp_path) == [1]
        assert group_rows(tmp_path) == 2
        # /reset_data forgets kept batches.
        state.reset()
        await store.sync()
        assert state.kept_batches == 0 and kept_rows(tmp_path) == []
    finally:
        await store.close()


async def test_batches_batch_formed_go_at_most_once_to_an_acknowledging_stream(tmp_path):
    store, state = await open_state(tmp_path)
    try:
        state.register_trainer(registration())
        state.submit([group(t) for t in range(6)])
        state.take_batch()  # forms three, keeps two for later calls; step 3
        batch, step = take(state, 0)
        assert step == 3 and state.kept_batches == 0 and state.ready_batches == 1
    finally:
        await store.close()


async def test_a_failed_commit_leaves_memory_as_the_store_holds_it(tmp_path):
    store, state = await open_state(tmp_path)
    durable = DurableState(state)
    await durable.register_trainer(registration())
    durable.note_started()
    registered = await durable.register_env(EnvRegistration(64, "a", 1.0, 1))
    assert registered is not None and registered.env_id == 0
    store._append("bogus")  # the next transaction cannot commit
    with pytest.raises(Unavailable):
        await durable.register_env(EnvRegistration(64, "b", 1.0, 1))
    # Memory is back to the last commit: env "b" is in neither.
    assert [e.desired_name for e in state.envs] == ["a"]
    with pytest.raises(Unavailable):
        await durable.register_env(EnvRegistration(64, "c", 1.0, 1))
    assert [e.desired_name for e in state.envs] == ["a"]
    await store.close()

    store, state = await open_state(tmp_path)
    try:
        durable = DurableState(state)
        registered = await durable.register_env(EnvRegistration(64, "b", 1.0, 1))
        assert registered is not None and registered.env_id == 1
        assert [e.desired_name for e in state.envs] == ["a", "b"]
    finally:
        await store.close()
