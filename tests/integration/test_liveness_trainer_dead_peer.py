"""A trainer whose inference shard is SIGKILLed mid-transfer names the dead peer well
before its sync deadline (a real inference process, the trainer's real WeightSync over
gloo), instead of waiting the deadline out and reporting "deadline exceeded"."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import pytest

from services import launcher
from services.trainer.weight_push import WeightSync, WeightSyncError
from services.trainer.weight_push import sender as sender_module
from trainer_fakes import load_model

DEADLINE = 120.0


@pytest.fixture
async def inference(tiny_model_dir, tmp_path):
    args = [
        "--model-path",
        str(tiny_model_dir),
        "--grpc-port",
        "0",
        "--grace-seconds",
        "1",
        "--weight-update-timeout-seconds",
        str(DEADLINE),
    ]
    child = await launcher.start("inference", "services.inference", args, tmp_path, env={"OMP_NUM_THREADS": "1"})
    try:
        ready = await launcher.wait_ready(child, 120)
        yield child, f"127.0.0.1:{ready['grpc_port']}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            child.proc.kill()
        await launcher.stop(child, grace=5)


async def test_shard_killed_mid_transfer_is_named_before_the_deadline(inference, tiny_model_dir, monkeypatch):
    child, address = inference
    model = load_model(tiny_model_dir)
    real_send = sender_module.pipeline.send_buckets
    killed = []

    def send_after_the_shard_dies(handle, manifest, tensors, *rest):
        # Rank 0 is about to broadcast: the shard has joined the group, then dies.
        os.kill(child.proc.pid, signal.SIGKILL)
        killed.append(time.monotonic())
        return real_send(handle, manifest, tensors, *rest)

    monkeypatch.setattr(sender_module.pipeline, "send_buckets", send_after_the_shard_dies)
    # The collective path: the shard dies while gloo carries the buckets.
    sync = WeightSync.for_targets([address], bucket_bytes=64 * 1024, timeout_seconds=DEADLINE, transport="collective")
    try:
        with pytest.raises(WeightSyncError) as err:
            await sync.push(model, version=1, step=1)
        assert killed, "the shard was not killed during the transfer"
        message = str(err.value)
        assert f"shard 0 ({address}) died during" in message, message
        assert err.value.stage in ("transfer", "await")
        # Named by the peer watch, not by the deadline running out.
        assert "deadline" not in err.value.detail.split(" (then:")[0]
    finally:
        await sync.close()


async def test_shard_frozen_mid_transfer_is_named_before_the_deadline(inference, tiny_model_dir, monkeypatch):
    """A frozen shard keeps its connections open (no reset to notice): the probes'
    deadlines name it."""
    child, address = inference
    model = load_model(tiny_model_dir)
    real_send = sender_module.pipeline.send_buckets

    def send_after_the_shard_freezes(handle, manifest, tensors, *rest):
        os.kill(child.proc.pid, signal.SIGSTOP)
        return real_send(handle, manifest, tensors, *rest)

    monkeypatch.setattr(sender_module.pipeline, "send_buckets", send_after_the_shard_freezes)
    sync = WeightSync.for_targets(
        [address], bucket_bytes=64 * 1024, timeout_seconds=DEADLINE, probe_timeout_seconds=2.0, transport="collective"
    )
    try:
        with pytest.raises(WeightSyncError) as err:
            await sync.push(model, version=1, step=1)
        # "stopped answering" is the peer watch's verdict; the deadline would say otherwise.
        assert f"shard 0 ({address}) stopped answering during" in str(err.value), str(err.value)
    finally:
        # Killed (not resumed) so the broadcast thread's connection resets and close() is quick.
        with contextlib.suppress(ProcessLookupError):
            child.proc.kill()
            os.kill(child.proc.pid, signal.SIGCONT)
        await sync.close()
