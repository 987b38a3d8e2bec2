"""Learner steps driven directly (no gateway, no gRPC server), with a scripted WeightSync."""

from __future__ import annotations

import io
import json

import pytest
import torch

from clotho.v1 import scored_data_pb2 as sd
from services.trainer.learner import Learner
from services.trainer.settings import TrainerSettings
from services.trainer.weight_sync import SyncReport, WeightSync, WeightSyncError

STEP_KEYS = {"event", "step", "policy_version", "mean_score", "loss", "clip_fraction",
             "sync_seconds", "sync_bytes", "step_seconds"}


def groups() -> list[sd.ScoredGroup]:
    prompt = [1, 10, 11, 12]
    return [sd.ScoredGroup(sequences=[
        sd.ScoredSequence(tokens=prompt + c, masks=[-100] * 4 + c, score=s)
        for c, s in (([20, 21, 22], 1.0), ([30, 31], 0.0))
    ])]


class ScriptedSync:
    """Stands in for WeightSync: fails the pushes whose call number is in `fail`."""

    def __init__(self, fail: set[int]) -> None:
        self.fail = fail
        self.pushes: list[tuple[int, int]] = []

    async def push(self, model, version: int, step: int) -> SyncReport:
        self.pushes.append((version, step))
        if len(self.pushes) in self.fail:
            raise WeightSyncError(version, "await", "shard-0: ABORTED: scripted")
        return SyncReport(version, 0.01, 123, 1)

    async def close(self) -> None:
        pass


def lines(out: io.StringIO) -> list[dict]:
    return [json.loads(x) for x in out.getvalue().splitlines()]


async def test_train_step_without_shards_publishes_and_prints_a_step_line(tiny_model_dir):
    out = io.StringIO()
    learner = Learner(TrainerSettings(model_path=str(tiny_model_dir)), out=out)
    await learner.load()
    assert isinstance(learner.weight_sync, WeightSync)
    before = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    record = await learner.train_step(groups())
    assert lines(out) == [record]
    assert STEP_KEYS <= record.keys()
    assert (record["step"], record["policy_version"], record["sync_ok"]) == (1, 1, True)
    assert record["mean_score"] == pytest.approx(0.5) and record["tokens"] == 5
    assert learner.state.version == 1 and learner.state.policy.step == 1
    assert any(not torch.equal(p.detach(), before[n]) for n, p in learner.model.named_parameters())
    await learner.close()


async def test_failed_push_keeps_the_published_version_and_retries_it_next_step(tiny_model_dir):
    out = io.StringIO()
    sync = ScriptedSync(fail={2})
    learner = Learner(TrainerSettings(model_path=str(tiny_model_dir)), weight_sync=sync, out=out)
    published = []
    watch = learner.state.watch()
    published.append((await anext(watch)).version)
    for _ in range(3):
        await learner.train_step(groups())
    # Shards only accept current + 1: the failed version 2 is retried, not skipped.
    assert sync.pushes == [(1, 1), (2, 2), (2, 3)]
    got = lines(out)
    assert [(x["policy_version"], x["sync_ok"]) for x in got] == [(1, True), (1, False), (2, True)]
    assert "scripted" in got[1]["sync_error"] and got[1]["sync_bytes"] == 0
    published += [(await anext(watch)).version for _ in range(2)]
    assert published == [0, 1, 2]
    await watch.aclose()


async def test_malformed_batch_changes_nothing(tiny_model_dir):
    learner = Learner(TrainerSettings(model_path=str(tiny_model_dir)), out=io.StringIO())
    bad = groups()
    bad[0].sequences[0].masks.pop()
    with pytest.raises(ValueError):
        await learner.train_step(bad)
    assert learner.step == 0 and learner.state.version == 0
