"""Learner steps driven directly (no gateway, no gRPC server), with a scripted WeightSync."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncGenerator
from typing import cast

import pytest
import torch
from trainer_groups import groups

from services.trainer.learner import Learner
from services.trainer.settings import TrainerSettings
from services.trainer.weight_push import SyncReport, WeightSync, WeightSyncError

STEP_KEYS = {
    "event",
    "step",
    "policy_version",
    "mean_score",
    "loss",
    "clip_fraction",
    "sync_seconds",
    "sync_bytes",
    "step_seconds",
}


class ScriptedSync:
    """Stands in for WeightSync: fails the pushes whose call number is in `fail`."""

    def __init__(self, fail: set[int]) -> None:
        self.fail = fail
        self.pushes: list[tuple[int, int, bool]] = []

    has_shards = True

    async def push(self, weights, version: int, step: int, *, resync: bool = False) -> SyncReport:
        self.pushes.append((version, step, resync))
        if len(self.pushes) in self.fail:
            raise WeightSyncError(version, "await", "shard-0: ABORTED: scripted")
        return SyncReport(version, 0.01, 123, 1, resync=resync)

    async def close(self) -> None:
        pass


def lines(out: io.StringIO) -> list[dict]:
    return [json.loads(x) for x in out.getvalue().splitlines()]


def settings(model_dir, **extra) -> TrainerSettings:
    return TrainerSettings(model_path=str(model_dir), checkpoint_dir="", **extra)


async def test_train_step_without_shards_publishes_and_prints_a_step_line(tiny_model_dir):
    out = io.StringIO()
    learner = Learner(settings(tiny_model_dir), out=out)
    await learner.load()
    assert isinstance(learner.weight_sync, WeightSync)
    assert learner.model is not None
    before = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    record = await learner.train_step(groups())
    assert record is not None
    assert lines(out) == [record]
    assert record.keys() >= STEP_KEYS
    assert (record["step"], record["policy_version"], record["sync_ok"]) == (1, 1, True)
    assert record["mean_score"] == pytest.approx(0.5) and record["tokens"] == 5
    assert learner.state.version == 1 and learner.state.policy.step == 1
    assert any(not torch.equal(p.detach(), before[n]) for n, p in learner.model.named_parameters())
    await learner.close()


async def test_failed_push_keeps_the_published_version_and_retries_it_next_step(tiny_model_dir):
    out = io.StringIO()
    sync = ScriptedSync(fail={2})
    learner = Learner(settings(tiny_model_dir), weight_sync=cast(WeightSync, sync), out=out)
    published = []
    watch = learner.state.watch()
    assert isinstance(watch, AsyncGenerator)
    published.append((await anext(watch)).version)
    for _ in range(3):
        await learner.train_step(groups())
    # Shards only accept current + 1: the failed version 2 is retried, not skipped, as a
    # resync (a shard that lost track accepts it whatever it serves).
    assert sync.pushes == [(1, 1, False), (2, 2, False), (2, 3, True)]
    got = lines(out)
    assert [(x["policy_version"], x["sync_ok"]) for x in got] == [(1, True), (1, False), (2, True)]
    assert "scripted" in got[1]["sync_error"] and got[1]["sync_bytes"] == 0
    published += [(await anext(watch)).version for _ in range(2)]
    assert published == [0, 1, 2]
    await watch.aclose()


async def test_malformed_batch_changes_nothing(tiny_model_dir):
    learner = Learner(settings(tiny_model_dir), out=io.StringIO())
    bad = groups()
    bad[0].sequences[0].masks.pop()
    with pytest.raises(ValueError):
        await learner.train_step(bad)
    assert learner.step == 0 and learner.state.version == 0


async def test_checkpoint_restores_step_version_optimizer_schedule_and_rng(tiny_model_dir, tmp_path):
    def make(sync):
        s = TrainerSettings(
            model_path=str(tiny_model_dir),
            checkpoint_dir=str(tmp_path),
            checkpoint_interval=2,
            lr_schedule="cosine",
            warmup_steps=1,
            num_steps=10,
            lr=0.01,
        )
        return Learner(s, weight_sync=cast(WeightSync, sync), out=io.StringIO())

    first = make(ScriptedSync(fail=set()))
    records = [await first.train_step(groups()) for _ in range(2)]
    assert [r["lr"] for r in records] == pytest.approx([0.005, 0.01])  # warmup, then the peak
    saved = {n: p.detach().clone() for n, p in first.model.named_parameters()}
    saved_optim = first.core.optimizer.state_dict()
    saved_rng = torch.get_rng_state()
    torch.manual_seed(1234)  # disturb the RNG the checkpoint must restore
    await first.close()

    sync = ScriptedSync(fail=set())
    second = make(sync)
    await second.load()
    assert (second.step, second.state.version, second.resync_needed) == (2, 2, True)
    assert torch.equal(torch.get_rng_state(), saved_rng)
    for name, p in second.model.named_parameters():
        assert torch.equal(p.detach(), saved[name]), name
    restored_optim = second.core.optimizer.state_dict()
    for key, value in saved_optim["state"][0].items():
        assert torch.equal(restored_optim["state"][0][key], value), key
    # The shards get the checkpoint's weights under its own version before training.
    await second.sync_shards()
    assert sync.pushes == [(2, 2, True)] and not second.resync_needed
    record = await second.train_step(groups())
    assert (record["step"], record["policy_version"]) == (3, 3)
    # Step 3's lr is where the uninterrupted schedule would be.
    from services.trainer.schedule import lr_factor

    assert record["lr"] == pytest.approx(0.01 * lr_factor(2, 1, 10, "cosine"))
    await second.close()


async def test_unpublished_weights_resume_as_the_next_version(tiny_model_dir, tmp_path):
    """A checkpoint whose weights no shard ever committed (the push failed) must not
    reuse the version number of older weights."""
    s = TrainerSettings(model_path=str(tiny_model_dir), checkpoint_dir=str(tmp_path), checkpoint_interval=2)
    first = Learner(s, weight_sync=cast(WeightSync, ScriptedSync(fail={2})), out=io.StringIO())
    for _ in range(2):
        await first.train_step(groups())
    await first.close()
    assert json.loads((tmp_path / "step-2" / "trainer_state.json").read_text())["weights_published"] is False

    sync = ScriptedSync(fail=set())
    second = Learner(s, weight_sync=cast(WeightSync, sync), out=io.StringIO())
    await second.load()
    assert (second.step, second.state.version) == (2, 1)
    await second.sync_shards()
    assert sync.pushes == [(2, 2, True)] and second.state.version == 2
    await second.close()


async def test_step_line_has_per_environment_scores_and_off_policy_metrics(tiny_model_dir):
    learner = Learner(settings(tiny_model_dir, max_staleness=1), out=io.StringIO())
    batch = groups() + groups()
    batch[0].env_id, batch[1].env_id = 0, 4
    batch[1].sequences[0].score = 3.0
    for s, v in zip(batch[1].sequences, (5, 2)):
        s.policy_version = v
    learner.state.restore(5, 0)
    record = await learner.train_step(batch)
    assert record is not None
    assert record["atropos/env_0/mean_score"] == pytest.approx(0.5)
    assert record["atropos/env_4/mean_score"] == pytest.approx(1.5)
    # Staleness 0 and 3 (versions 5 and 2 at version 5): the second one is dropped.
    assert (record["staleness_max"], record["stale_dropped"], record["sequences"]) == (3, 1, 3)
    for key in ("kl", "is_truncated_fraction", "ratio_min", "real_token_fraction", "entropy", "lr"):
        assert key in record
    await learner.close()
