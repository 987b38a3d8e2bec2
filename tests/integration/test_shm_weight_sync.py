"""The same-host weight transport between real processes: this test process is the
trainer (WeightSync, which picks shared memory because the inference service reports
this host), `python -m services.inference` the shard. After an update the shard's
logprobs are the trainer's; a corrupted bucket, a trainer SIGKILLed mid-transfer and a
missed deadline each leave it serving the old version with the old weights; and no
segment is left in /dev/shm, crash included."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from pathlib import Path

import pytest
import pytest_asyncio
import torch
from transformers import AutoModelForCausalLM

from clotho.v1 import inference_service_pb2 as pb
from clotho.v1 import inference_service_pb2_grpc as pb_grpc
from services.common.server import channel
from services.common.weight_wire import pack_bucket_crc32, shm
from services.trainer.weight_push import WeightSync, WeightSyncError

pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(not shm.available(), reason="no /dev/shm on this machine"),
]

HERE = Path(__file__).resolve().parent
BUCKET_BYTES = 64 * 1024  # the 0.5M-parameter model spans dozens of buckets
SEQUENCE = [1, 20, 21, 22, 10, 30, 31, 14, 15, 16, 40, 41]
SHARD_DEADLINE = 15.0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def target(tiny_model_dir, tmp_path_factory, service_process):
    assert shm.segment_names() == [], "segments left over before the test"
    args = ["--model-path", str(tiny_model_dir), "--grpc-port", "0", "--weight-update-timeout-seconds", "15"]
    async with service_process("services.inference", args, tmp_path_factory.mktemp("inference-logs")) as (_, ready):
        yield f"127.0.0.1:{ready['grpc_port']}"
    # The shard exited too: nothing of either side is left.
    assert shm.segment_names() == []


class Served:
    """What the shard should serve, and the trainer's own logprobs for it."""

    def __init__(self, model_dir: Path) -> None:
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        self.weights = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.version = 0

    def perturbed(self, seed: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return {n: w + 0.05 * torch.randn(w.shape, generator=gen) for n, w in self.weights.items()}

    def logprobs(self, weights: dict[str, torch.Tensor]) -> list[float]:
        self.model.load_state_dict(weights, strict=False)
        with torch.no_grad():
            logits = self.model(torch.tensor([SEQUENCE])).logits[0].float()
        lp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(SEQUENCE[1:])[:, None]).squeeze(-1)
        return [0.0, *lp.tolist()]


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    return Served(tiny_model_dir)


async def shard_state(target: str) -> tuple[int, list[float]]:
    async with channel(target) as ch:
        stub = pb_grpc.InferenceServiceStub(ch)
        version = (await stub.GetServedPolicy(pb.GetServedPolicyRequest())).policy.version
        request = pb.GenerateRequest(
            input_ids=SEQUENCE, sampling_params=pb.SamplingParams(max_new_tokens=0), return_prompt_logprobs=True
        )
        [response] = [r async for r in stub.Generate(request)]
    return version, list(response.completion.prompt_logprobs)


async def assert_serves(target: str, served: Served) -> None:
    version, logprobs = await shard_state(target)
    assert version == served.version
    assert logprobs == pytest.approx(served.logprobs(served.weights), abs=1e-4)


def make_sync(target: str, timeout: float = 20.0) -> WeightSync:
    return WeightSync.for_targets([target], bucket_bytes=BUCKET_BYTES, timeout_seconds=timeout, run_id="test")


async def test_updates_travel_through_shared_memory_and_serve_the_trainers_logprobs(target, served):
    sync = make_sync(target)
    try:
        await assert_serves(target, served)
        for seed in (1, 2, 3):  # both sets of the segment, then the first again
            weights = served.perturbed(seed)
            report = await sync.push(weights, served.version + 1, served.version + 1)
            assert report.group_name.startswith(shm.SEGMENT_PREFIX) and sync.group_name is None
            # Unlinked once the shard mapped it: nothing to leak from here on.
            assert shm.segment_names() == []
            served.version, served.weights = report.version, weights
            await assert_serves(target, served)
    finally:
        await sync.close()
    assert shm.segment_names() == []


async def test_a_corrupted_bucket_keeps_the_old_weights(target, served, monkeypatch):
    write = shm.write_buckets

    def corrupting(segment, manifest, tensors, buffer_set, abandoned, on_sent=None):
        crcs, written = [], 0
        for i, bucket in enumerate(manifest.buckets):
            out = segment.bucket(buffer_set, i)
            crcs.append(pack_bucket_crc32(manifest, i, tensors, out))
            if i == 2:  # damaged in the segment after its checksum was taken
                out.view(torch.uint8)[5] ^= 0xFF
            written += bucket.nbytes
            segment.publish(written)
        return crcs

    monkeypatch.setattr(shm, "write_buckets", corrupting)
    sync = make_sync(target)
    try:
        with pytest.raises(WeightSyncError) as err:
            await sync.push(served.perturbed(10), served.version + 1, served.version + 1)
        assert err.value.stage == "await" and "bucket 2 arrived with crc32" in str(err.value)
        await assert_serves(target, served)
        monkeypatch.setattr(shm, "write_buckets", write)
        # The next push uses a fresh segment and lands.
        weights = served.perturbed(11)
        report = await sync.push(weights, served.version + 1, served.version + 1)
        served.version, served.weights = report.version, weights
        await assert_serves(target, served)
    finally:
        await sync.close()
    assert shm.segment_names() == []


async def test_a_missed_deadline_keeps_the_old_weights(target, served, monkeypatch):
    write = shm.write_buckets
    release = threading.Event()

    def stalling(segment, manifest, tensors, buffer_set, abandoned, on_sent=None):
        release.wait(10)
        return write(segment, manifest, tensors, buffer_set, abandoned, on_sent)

    monkeypatch.setattr(shm, "write_buckets", stalling)
    sync = make_sync(target, timeout=3.0)
    try:
        with pytest.raises(WeightSyncError) as err:
            await sync.push(served.perturbed(20), served.version + 1, served.version + 1)
        assert err.value.stage == "transfer" and "deadline" in str(err.value)
        release.set()
        await assert_serves(target, served)
        assert shm.segment_names() == []
    finally:
        release.set()
        await sync.close()


async def test_a_trainer_killed_mid_transfer_leaves_the_old_weights_and_no_segment(target, served, tiny_model_dir):
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        str(HERE / "shm_trainer_child.py"),
        target,
        str(tiny_model_dir),
        str(served.version + 1),
        "4",
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        assert child.stdout is not None
        line = await asyncio.wait_for(child.stdout.readline(), 120)
        assert line.strip() == b"midway"
    finally:
        if child.returncode is None:
            child.send_signal(signal.SIGKILL)
        await child.wait()
    assert child.returncode == -signal.SIGKILL
    assert shm.segment_names() == []
    # The shard drops the update at its deadline and keeps serving the old weights.
    await asyncio.sleep(4.5)  # past the 4 s deadline the child was given
    await assert_serves(target, served)
    # A new trainer (resync, as after a restart) updates it through a new segment.
    sync = make_sync(target)
    try:
        weights = served.perturbed(30)
        report = await sync.push(weights, served.version + 1, served.version + 1, resync=True)
        served.version, served.weights = report.version, weights
        await assert_serves(target, served)
    finally:
        await sync.close()
    assert shm.segment_names() == []


async def test_colocated_release_push_resume_serves_the_new_weights(target, served):
    """Colocated mode over gRPC: the service frees its KV cache, the update lands while
    it is released, and after the resume it serves the trainer's logprobs."""
    sync = make_sync(target)
    colocation = sync.colocation(torch.device("cpu"))
    try:
        released = await colocation.release()
        [(name, shard)] = released["shards"].items()
        assert name.startswith(target) and shard["phase"] == "released"
        assert int(shard.get("kv_cache_bytes", 0)) == 0 and int(shard["rss_bytes"]) > 0
        assert "rss_bytes" in released["trainer"]
        weights = served.perturbed(40)
        report = await sync.push(weights, served.version + 1, served.version + 1)
        resumed = await colocation.resume()
        assert next(iter(resumed["shards"].values()))["phase"] == "resumed"
        served.version, served.weights = report.version, weights
        await assert_serves(target, served)
    finally:
        await sync.close()
    assert shm.segment_names() == []
