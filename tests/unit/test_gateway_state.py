"""TrajectoryState: buffering of mismatched group sizes, /status-env arithmetic,
batch draining and the step, registration rules, and wakeups for waiters."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from services.common.errors import FailedPrecondition, NotFound
from services.gateway.trajectory import (
    EnvRegistration,
    Submitted,
    TrainerRegistration,
    TrajectoryState,
)
from services.gateway.trajectory.scored_data import ATROPOS_KEYS


def trainer(batch_size=4, starting_step=0):
    return TrainerRegistration("g", "p", batch_size, 128, "/ckpt", 5, starting_step, 50)


def group(size, env_id=None, tag=0):
    g = dict.fromkeys(ATROPOS_KEYS)
    g.update(tokens=[[tag, i] for i in range(size)], masks=[[-100, i] for i in range(size)], scores=[0.0] * size)
    g["env_id"] = env_id
    return g


def tag(held):
    """The tag of a held group (or of a stored JSON body)."""
    body = held if isinstance(held, bytes) else held.body
    return orjson.loads(body)["tokens"][0][0]


def _buffered(n):
    return Submitted(buffered=True, buffer_size=n)


def started_state(batch_size=4, envs=()):
    state = TrajectoryState()
    state.register_trainer(trainer(batch_size))
    state.take_batch()
    for reg in envs:
        assert state.register_env(reg) is not None
    return state


def test_environments_wait_for_the_trainer_to_start():
    state = TrajectoryState()
    assert state.register_env(EnvRegistration(64, "env", 1.0, 2)) is None
    with pytest.raises(FailedPrecondition):
        state.take_batch()
    state.register_trainer(trainer(starting_step=7))
    assert state.register_env(EnvRegistration(64, "env", 1.0, 2)) is None
    assert state.take_batch() is None  # the trainer asked: started
    first = state.register_env(EnvRegistration(64, "env", 1.0, 2))
    second = state.register_env(EnvRegistration(64, "env", 1.0, 2))
    assert first is not None and second is not None
    assert (first.env_id, first.wandb_name, first.starting_step) == (0, "env_0", 7)
    assert (second.env_id, second.wandb_name) == (1, "env_1")
    assert (first.checkpoint_dir, first.checkpoint_interval, first.num_steps) == ("/ckpt", 5, 50)


def test_mismatched_groups_are_buffered_until_they_make_up_the_group_size():
    state = started_state(envs=[EnvRegistration(64, "env", 1.0, 4)])
    a, b, c, d = group(2, 0, tag=1), group(3, 0, tag=2), group(2, 0, tag=3), group(1, 0, tag=4)
    assert state.submit([a]) == [_buffered(2)]
    assert state.submit([b]) == [_buffered(5)]
    assert state.queue_size == 0
    # 2 + 2 make 4 (first fit in FIFO order); the 3 stays.
    assert state.submit([c]) == [_buffered(3)]
    assert state.queue_size == 2
    assert tag(state.latest_example()) == 3
    assert state.submit([d]) == [_buffered(0)]
    assert state.queue_size == 4
    assert tag(state.latest_example()) == 4
    # A group of the right size, one for an unknown env and one without env go
    # straight to the queue.
    for g in (group(4, 0), group(3, 9), group(3, None)):
        assert state.submit([g])[0].buffered is False
    assert state.queue_size == 7


def test_batch_drains_every_full_batch_and_hands_out_the_last_formed_first():
    state = started_state(batch_size=4)
    groups = [group(4, tag=t) for t in range(3)] + [group(2, tag=9)]
    state.submit(groups)
    assert state.step == 0
    first = state.take_batch()
    # Three batches formed at once: the step jumps by three.
    assert state.step == 3
    assert state.queue_size == 1
    second, third = state.take_batch(), state.take_batch()
    assert [tag(b[0]) for b in (first, second, third)] == [2, 1, 0]
    assert state.take_batch() is None
    assert state.step == 3


def test_only_the_first_registration_sets_the_geometry():
    state = TrajectoryState()
    state.register_trainer(trainer(batch_size=8, starting_step=2))
    state.register_trainer(trainer(batch_size=2, starting_step=9))
    assert state.trainer is not None
    assert state.trainer.batch_size == 8
    assert state.step == 2


def test_reset_forgets_everything_but_the_latest_example():
    state = started_state(envs=[EnvRegistration(64, "env", 1.0, 2)])
    state.submit([group(2, 0, tag=5)])
    state.reset()
    assert (state.trainer, state.step, state.queue_size, state.started, state.envs) == (None, 0, 0, False, [])
    assert tag(state.latest_example()) == 5
    # As Atropos: /info forgets the batch size but not max_token_len.
    assert state.info() == (-1, 128)


def test_status_env_arithmetic():
    state = started_state(
        batch_size=16,
        envs=[
            EnvRegistration(100, "a", 1.0, 4, min_batch_allocation=0.25),
            EnvRegistration(300, "b", 1.0, 2),
            EnvRegistration(100, "c", 2.0, 2),
        ],
    )
    state.disconnect_env(2)
    state.submit([group(4, 0), group(4, 0), group(2, 1), group(2, 1), group(2, 1), group(1, None)])

    s0 = state.env_status(0)
    # weights over connected envs: 100 / (100 + 300); env 0 reserves 25% of 16 = 4.
    # Others in packs of the largest group (4): env 1 has 6 -> 8, no env has 1 -> 4.
    assert s0.env_weight == pytest.approx(0.25)
    assert s0.unallocated_fraction == pytest.approx(0.75)
    assert s0.max_group_size == 4
    assert s0.self_queue_size == 8 // 4
    assert s0.queue_size == (8 + 8 + 4) // 4

    s1 = state.env_status(1)
    # env 0's 8 sequences minus its reservation of 4, plus 4 from the env-less group.
    assert s1.env_weight == pytest.approx(0.75)
    assert (s1.self_queue_size, s1.queue_size) == (6 // 2, (6 + 4 + 4) // 2)

    # A disconnected env's share is still taken against the connected envs' total.
    assert state.env_status(2).env_weight == pytest.approx(200 / 400)
    with pytest.raises(NotFound):
        state.env_status(3)


def test_status_env_counts_no_others_for_single_sequences_and_floors_the_weight():
    state = started_state(batch_size=8, envs=[EnvRegistration(64, "a", 1.0, 1), EnvRegistration(64, "b", 0.0, 1)])
    state.submit([group(1, 0), group(1, 1), group(1, 1)])
    s = state.env_status(0)
    # Every group has one sequence: Atropos counts nothing from other envs.
    assert (s.queue_size, s.self_queue_size, s.max_group_size) == (1, 1, 1)
    # Weight 0 is floored at 1% so that no env starves.
    assert state.env_status(1).env_weight == pytest.approx(0.01)


def test_status_env_grows_the_group_size_to_the_largest_queued_group():
    state = started_state(batch_size=8)
    # Sent before the env registered: queued as it is.
    state.submit([group(2, 0), group(2, 0)])
    state.register_env(EnvRegistration(64, "a", 1.0, 1))
    s = state.env_status(0)
    assert (s.self_queue_size, s.queue_size) == (2, 2)
    assert state.envs[0].group_size == 2
    # From now on groups of 1 are buffered until they make a 2.
    assert state.submit([group(1, 0)])[0] == _buffered(1)
    assert state.submit([group(1, 0)])[0] == _buffered(0)
    assert state.queue_size == 4


async def test_waiters_wake_when_data_arrives():
    state = started_state(batch_size=2)
    waiter = asyncio.create_task(state.wakeup.wait_for(state.take_batch))
    await asyncio.sleep(0)  # a yield, not a delay: the waiter runs up to its wait
    assert not waiter.done()
    state.submit([group(1)])
    state.submit([group(1)])
    batch = await asyncio.wait_for(waiter, timeout=5)
    assert len(batch) == 2


def test_status_arithmetic_reads_counters_not_the_queue(monkeypatch):
    """/status and /status-env answer from the index's counters: with iteration over
    the queue made impossible they still answer, and as Atropos would."""
    from services.gateway.trajectory.queue_index import QueueIndex

    state = started_state(batch_size=16, envs=[EnvRegistration(64, "a", 1.0, 4), EnvRegistration(64, "b", 1.0, 2)])
    state.submit([group(4, 0, tag=t) for t in range(300)] + [group(2, 1, tag=t) for t in range(300)])

    def no_scans(_self):
        raise AssertionError("the whole queue was scanned")

    monkeypatch.setattr(QueueIndex, "__iter__", no_scans)
    s = state.env_status(1)
    assert (s.max_group_size, s.self_queue_size, s.queue_size) == (4, 300, (600 + 1200) // 2)
    assert state.queue_size == 600
