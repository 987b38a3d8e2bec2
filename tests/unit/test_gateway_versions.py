"""Policy versions on data: receipts of served completions, the client's explicit
version, the current version as fallback; max_staleness (drop or keep, counted) with
batches that stay exactly batch_size."""

from __future__ import annotations

from typing import Any, cast

import pytest

from clotho.v1 import gateway_service_pb2 as gpb
from services.gateway.rpc.servicer import GatewayServicer
from services.gateway.trajectory import TrainerRegistration, TrajectoryState
from services.gateway.trajectory.receipts import Receipts, completion_tokens
from services.gateway.trajectory.scored_data import ATROPOS_KEYS, POLICY_VERSIONS

# The servicer reads nothing from the gRPC context in these calls.
NO_CONTEXT: Any = None


def group(prompt, completions, versions=None, env_id=None):
    """A group whose sequences are `prompt + completion`, the prompt masked out."""
    g = dict.fromkeys(ATROPOS_KEYS)
    g["tokens"] = [prompt + c for c in completions]
    g["masks"] = [[-100] * len(prompt) + c for c in completions]
    g["scores"] = [1.0] * len(completions)
    g["env_id"] = env_id
    if versions is not None:
        g[POLICY_VERSIONS] = versions
    return g


def new_state(batch_size=2, **kwargs) -> TrajectoryState:
    state = TrajectoryState(receipts=Receipts(capacity=100), **kwargs)
    state.register_trainer(TrainerRegistration("g", "p", batch_size, 64, "/c", 1, 0, 10))
    state.mark_started()
    return state


def versions(batch):
    return [v for g in batch for v in g.versions]


def test_completion_tokens_are_the_unmasked_ones():
    assert completion_tokens([1, 2, 3, 4, 5], [-100, -100, 3, -100, 5]) == (3, 5)


def test_receipts_then_explicit_then_current():
    state = new_state(batch_size=4)
    state.receipts.record([7, 8], 3)  # /generate served completion [7, 8] at version 3
    state.observe_version(5)
    # Sequence 0 has a receipt; sequence 1 does not (current: 5); the explicit
    # version of sequence 2 wins over its receipt; sequence 3's explicit None falls back.
    state.submit([group([1, 2], [[7, 8], [9, 9]]), group([1], [[7, 8], [7, 8]], versions=[1, None])])
    assert versions(state.take_next()) == [3, 5, 1, 3]
    c = state.counters
    assert (c.versions_from_receipts, c.versions_current, c.versions_explicit) == (2, 1, 1)


def test_the_current_version_is_the_newest_reported_or_served():
    state = new_state()
    assert state.policy_version == 0
    state.observe_version(2)
    state.observe_version(1)  # never backwards
    assert state.policy_version == 2
    state.receipts.record([1], 4)  # an inference result already carries version 4
    assert state.policy_version == 4


def test_receipts_are_a_bounded_lru():
    receipts = Receipts(capacity=2)
    receipts.record([1], 1)
    receipts.record([2], 2)
    assert receipts.lookup((1,)) == 1  # a lookup does not refresh: insertion order
    receipts.record([3], 3)
    assert (receipts.lookup((1,)), receipts.lookup((2,)), receipts.lookup((3,))) == (None, 2, 3)
    receipts.record([2], 5)  # re-recording refreshes it
    receipts.record([4], 4)
    assert (receipts.lookup((2,)), receipts.lookup((3,))) == (5, None)


def test_max_staleness_drop_removes_stale_groups_and_batches_stay_exact():
    state = new_state(batch_size=4, max_staleness=1, staleness_policy="drop")
    # Versions 0, 3, 1, 3, 2, 3 (one group of 2 sequences each).
    for v in (0, 3, 1, 3, 2, 3):
        state.submit([group([1], [[v, 1], [v, 2]], versions=[v, v])])
    state.observe_version(3)
    # Allowed: versions >= 2. The groups at 0 and 1 go; 3, 3 make the first batch.
    first = state.take_next()
    assert first is not None
    assert sum(g.size for g in first) == 4 and versions(first) == [3, 3, 3, 3]
    second = state.take_next()
    assert second is not None
    assert sum(g.size for g in second) == 4 and sorted(versions(second)) == [2, 2, 3, 3]
    c = state.counters
    assert (c.stale_dropped_groups, c.stale_dropped_sequences, c.stale_kept_groups) == (2, 4, 0)
    assert state.held_groups == 0 and state.take_next() is None
    # Dropping happens at assembly time: a new version makes queued groups stale.
    state.submit([group([1], [[4, 1], [4, 2]], versions=[3, 3]), group([1], [[4, 1], [4, 2]], versions=[4, 4])])
    state.observe_version(5)
    assert state.take_next() is None
    assert (c.stale_dropped_groups, state.queue_size) == (3, 1)


def test_under_drop_batch_forms_one_batch_per_call_so_none_goes_stale_formed():
    """Atropos' /batch forms every batch at once and hands them out over later calls;
    with stale data dropped, a batch formed at version 1 and taken at version 3 would
    slip through. So /batch forms one batch per call, and the step counts batches
    handed out."""
    state = new_state(batch_size=2, max_staleness=1, staleness_policy="drop")
    state.submit([group([1], [[i]], versions=[1]) for i in range(2)])
    state.submit([group([1], [[i]], versions=[2]) for i in range(2, 4)])
    state.observe_version(2)
    first = state.take_batch()
    assert versions(first) == [1, 1] and (state.step, state.ready_batches, state.queue_size) == (1, 0, 2)
    state.observe_version(4)  # the queued version-2 groups are now stale
    assert state.take_batch() is None
    assert (state.counters.stale_dropped_groups, state.counters.stale_kept_groups, state.step) == (2, 0, 1)
    # Under keep, /batch keeps Atropos' way: every batch formed by the first call.
    kept = new_state(batch_size=2, max_staleness=1, staleness_policy="keep")
    kept.submit([group([1], [[i]], versions=[1]) for i in range(4)])
    kept.take_batch()
    assert (kept.step, kept.ready_batches) == (2, 1)


def test_max_staleness_keep_hands_stale_groups_out_and_counts_them():
    state = new_state(batch_size=4, max_staleness=1, staleness_policy="keep")
    for v in (0, 3):
        state.submit([group([1], [[v, 1], [v, 2]], versions=[v, v])])
    state.observe_version(3)
    batch = state.take_next()
    assert versions(batch) == [0, 0, 3, 3]
    c = state.counters
    assert (c.stale_dropped_groups, c.stale_kept_groups, c.stale_kept_sequences) == (0, 1, 2)


def test_oldest_sequence_decides_a_groups_staleness():
    state = new_state(batch_size=2, max_staleness=2)
    state.submit([group([1], [[1], [2]], versions=[9, 6])])
    state.observe_version(9)
    assert state.take_next() is None  # 9 - 6 > 2
    assert state.counters.stale_dropped_groups == 1


async def test_get_status_reports_the_counts():
    state = new_state(batch_size=2, max_staleness=1, staleness_policy="keep", max_groups=50)
    state.submit([group([1], [[1], [2]], versions=[0, 0])])
    state.observe_version(2)
    state.take_next()
    status = await GatewayServicer(state).GetStatus(gpb.GetStatusRequest(), NO_CONTEXT)
    assert (status.policy_version, status.stale_kept_groups, status.stale_dropped_groups) == (2, 1, 0)
    assert (status.max_staleness, status.stored_groups, status.max_stored_groups, status.current_step) == (1, 0, 50, 1)


def test_unknown_staleness_policy_is_refused():
    with pytest.raises(ValueError, match="staleness_policy"):
        TrajectoryState(staleness_policy=cast(Any, "ignore"))


def test_an_empty_policy_versions_list_means_none_given():
    """As every per-sequence field: [] is accepted (run-api takes it) and the
    sequences get the version they would without it."""
    import json

    from services.gateway.rpc.convert import group_to_proto
    from services.gateway.trajectory.scored_data import parse_scored_data

    state = new_state(batch_size=2)
    state.observe_version(5)
    body = {"tokens": [[1, 2], [1, 3]], "masks": [[-100, 2], [-100, 3]], "scores": [1.0, 0.0], "policy_versions": []}
    group = parse_scored_data(json.dumps(body).encode())
    state.submit([group])
    assert versions(state.take_batch()) == [5, 5]
    assert [s.HasField("policy_version") for s in group_to_proto(group).sequences] == [False, False]
