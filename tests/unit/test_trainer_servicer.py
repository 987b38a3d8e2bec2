"""TrainerServicer and PolicyState called directly; TrainerSettings parsing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import pytest

from clotho.v1 import trainer_service_pb2 as pb
from services.common.settings import load_settings
from services.trainer.policy_state import PolicyState
from services.trainer.servicer import TrainerServicer
from services.trainer.settings import TrainerSettings

WAIT_SECONDS = 5.0
# The servicer methods read nothing from the gRPC context in these calls.
NO_CONTEXT: Any = None


async def test_watch_policy_sends_current_version_then_every_new_one():
    state = PolicyState()
    servicer = TrainerServicer(state)
    stream = servicer.WatchPolicy(pb.WatchPolicyRequest(), NO_CONTEXT)
    first = await asyncio.wait_for(anext(stream), WAIT_SECONDS)
    assert first.policy.version == 0

    # Several versions published before the watcher reads: none is skipped.
    state.publish(1, step=1)
    state.publish(2, step=2)
    state.publish(3, step=5)
    seen = [await asyncio.wait_for(anext(stream), WAIT_SECONDS) for _ in range(3)]
    assert [m.policy.version for m in seen] == [1, 2, 3]
    assert [m.policy.step for m in seen] == [1, 2, 5]
    assert all(m.policy.committed_at > 0 for m in seen)

    # A watcher that joins late starts from the current version.
    late = servicer.WatchPolicy(pb.WatchPolicyRequest(), NO_CONTEXT)
    assert (await asyncio.wait_for(anext(late), WAIT_SECONDS)).policy.version == 3

    assert state.watcher_count == 2
    assert isinstance(stream, AsyncGenerator) and isinstance(late, AsyncGenerator)
    await stream.aclose()
    await late.aclose()
    assert state.watcher_count == 0


async def test_watch_blocks_until_a_new_version_is_published():
    state = PolicyState()
    stream = TrainerServicer(state).WatchPolicy(pb.WatchPolicyRequest(), NO_CONTEXT)
    await anext(stream)
    pending = asyncio.ensure_future(anext(stream))
    done, _ = await asyncio.wait({pending}, timeout=0.05)
    assert not done
    state.publish(1, step=1)
    assert (await asyncio.wait_for(pending, WAIT_SECONDS)).policy.version == 1
    assert isinstance(stream, AsyncGenerator)
    await stream.aclose()


async def test_get_policy_and_status():
    state = PolicyState()
    servicer = TrainerServicer(state)
    assert (await servicer.GetPolicy(pb.GetPolicyRequest(), NO_CONTEXT)).policy.version == 0
    state.publish(1, step=4, committed_at=123.0)
    state.record_step(4, {"loss": 0.5, "mean_score": 0.25})
    policy = (await servicer.GetPolicy(pb.GetPolicyRequest(), NO_CONTEXT)).policy
    assert (policy.version, policy.step, policy.committed_at) == (1, 4, 123.0)
    status = await servicer.GetTrainerStatus(pb.GetTrainerStatusRequest(), NO_CONTEXT)
    assert status.step == 4 and status.policy.version == 1
    assert dict(status.metrics) == {"loss": 0.5, "mean_score": 0.25}


def test_versions_only_move_forward():
    state = PolicyState()
    state.publish(1, step=1)
    with pytest.raises(ValueError):
        state.publish(1, step=2)


def test_settings_from_flags_and_env(monkeypatch):
    monkeypatch.setenv("CLOTHO_TRAINER_INFERENCE", "127.0.0.1:1,127.0.0.1:2")
    monkeypatch.setenv("CLOTHO_TRAINER_LR", "0.01")
    s = load_settings(TrainerSettings, ["--model-path", "/m", "--gateway", "h:9", "--num-steps", "3"])
    assert s.inference == ["127.0.0.1:1", "127.0.0.1:2"]
    assert (s.model_path, s.gateway, s.num_steps, s.lr) == ("/m", "h:9", 3, 0.01)
    monkeypatch.delenv("CLOTHO_TRAINER_INFERENCE")
    s = load_settings(TrainerSettings, ["--inference", "a:1", "--inference", "b:2"])
    assert s.inference == ["a:1", "b:2"]
    d = load_settings(TrainerSettings, [])
    assert (d.batch_size, d.num_steps, d.credits, d.clip_eps, d.grad_clip) == (32, 0, 1, 0.2, 1.0)
    assert d.sync_address == "127.0.0.1" and d.inference == []
