"""The inference service as a real process (`python -m services.inference`) on loopback:
Generate end to end, and the weight-update protocol driven by this test acting as the
trainer over a real gloo group."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
import torch
from transformers import AutoModelForCausalLM

from clotho.v1 import inference_service_pb2 as pb
from clotho.v1 import inference_service_pb2_grpc as pb_grpc
from services.common.server import channel
from services.common.weight_wire import CollectiveGroup, build_manifest, crc32, pack_bucket

pytestmark = pytest.mark.asyncio(loop_scope="module")

REPO = Path(__file__).resolve().parents[2]
COLLECTIVE_TIMEOUT = 15.0
BUCKET_BYTES = 64 * 1024  # the 0.5M-parameter model spans dozens of buckets
SEQUENCE = [1, 20, 21, 22, 10, 30, 31, 14, 15, 16, 40, 41]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stub(tiny_model_dir, tmp_path_factory, service_process):
    args = [
        "--model-path",
        str(tiny_model_dir),
        "--grpc-port",
        "0",
        "--weight-update-timeout-seconds",
        str(COLLECTIVE_TIMEOUT),
    ]
    async with service_process("services.inference", args, tmp_path_factory.mktemp("inference-logs")) as (_, ready):
        chan = channel(f"127.0.0.1:{ready['grpc_port']}")
        try:
            yield pb_grpc.InferenceServiceStub(chan)
        finally:
            await chan.close()


class Trainer:
    """What the trainer does for one shard: rank 0 of the weight group, driving Prepare,
    broadcast, Await and Commit, and Abort on any failure. Tracks the weights the shard
    should serve."""

    def __init__(self, stub: pb_grpc.InferenceServiceStub, model_dir: Path) -> None:
        self.stub = stub
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        self.weights = {name: p.detach().clone() for name, p in self.model.named_parameters()}
        self.version = 0
        self.group: CollectiveGroup | None = None

    def perturbed(self, seed: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return {n: w + 0.05 * torch.randn(w.shape, generator=gen) for n, w in self.weights.items()}

    async def push(
        self, weights: dict[str, torch.Tensor], *, wrong_crc: bool = False, stop_after: int | None = None
    ) -> tuple[bool, pb.CommitWeightUpdateResponse]:
        version = self.version + 1
        manifest = build_manifest(list(weights.items()), BUCKET_BYTES)
        assert len(manifest.buckets) > 3
        if self.group is None:
            self.group = CollectiveGroup.host("gloo", "127.0.0.1", 2, f"clotho-{uuid.uuid4().hex}", COLLECTIVE_TIMEOUT)
        group = self.group
        connect = None if group.connected else asyncio.create_task(asyncio.to_thread(group.connect))
        try:
            prepared = await self.stub.PrepareWeightUpdate(
                pb.PrepareWeightUpdateRequest(
                    version=version,
                    manifest=manifest.to_proto(),
                    rendezvous=pb.Rendezvous(
                        backend=pb.COLLECTIVE_BACKEND_GLOO,
                        address="127.0.0.1",
                        port=group.port,
                        world_size=2,
                        rank_offset=1,
                        group_name=group.group_name,
                    ),
                    deadline_seconds=60,
                    step=100 + version,
                )
            )
            if connect is not None:
                await connect
            crcs = []
            for i in range(len(manifest.buckets)):
                if stop_after is not None and i == stop_after:
                    raise RuntimeError(f"trainer stopped after {i} buckets")
                flat = pack_bucket(manifest, i, weights)
                crcs.append(crc32(flat))
                await asyncio.to_thread(group.broadcast, flat)
            if wrong_crc:
                crcs[len(crcs) // 2] ^= 0x5A5A
            await self.stub.AwaitWeightTransfer(pb.AwaitWeightTransferRequest(version=version, bucket_crc32s=crcs))
            committed = await self.stub.CommitWeightUpdate(pb.CommitWeightUpdateRequest(version=version))
        except BaseException as exc:
            aborted = await self.stub.AbortWeightUpdate(pb.AbortWeightUpdateRequest(version=version, reason=str(exc)))
            assert aborted.policy.version == self.version
            await asyncio.to_thread(group.close)
            self.group = None
            raise
        self.version, self.weights = version, weights
        return prepared.joined_group, committed

    def local_prompt_logprobs(self, weights: dict[str, torch.Tensor], ids: list[int]) -> list[float]:
        self.model.load_state_dict(weights, strict=False)
        with torch.no_grad():
            logits = self.model(torch.tensor([ids])).logits[0].float()
        lp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
        return [0.0, *lp.tolist()]

    def local_greedy(self, weights: dict[str, torch.Tensor], ids: list[int], steps: int) -> list[int]:
        self.model.load_state_dict(weights, strict=False)
        out = list(ids)
        with torch.no_grad():
            for _ in range(steps):
                out.append(int(self.model(torch.tensor([out])).logits[0, -1].argmax()))
        return out[len(ids) :]

    def close(self) -> None:
        if self.group is not None:
            self.group.close()


@pytest.fixture(scope="module")
def trainer(stub, tiny_model_dir):
    t = Trainer(stub, tiny_model_dir)
    yield t
    t.close()


async def served_prompt_logprobs(stub) -> list[float]:
    request = pb.GenerateRequest(
        input_ids=SEQUENCE,
        sampling_params=pb.SamplingParams(max_new_tokens=0),
        return_prompt_logprobs=True,
    )
    [response] = [r async for r in stub.Generate(request)]
    return list(response.completion.prompt_logprobs)


async def served_version(stub) -> int:
    return (await stub.GetServedPolicy(pb.GetServedPolicyRequest())).policy.version


async def test_generate_end_to_end(stub, trainer, tiny_model_dir):
    info = await stub.GetModelInfo(pb.GetModelInfoRequest())
    assert (info.engine, info.shard_count, info.max_context_len, info.eos_token_id) == ("torch", 1, 512, 2)
    # Issue 10: GetModelInfo names the served model, never its local path.
    assert info.model_path == Path(tiny_model_dir).name and info.model_name == Path(tiny_model_dir).name

    request = pb.GenerateRequest(
        input_ids=SEQUENCE,
        sampling_params=pb.SamplingParams(temperature=0.0, max_new_tokens=8, n=2, ignore_eos=True),
        stream=True,
        request_id="e2e",
    )
    responses = [r async for r in stub.Generate(request)]
    chunks: dict[int, list[int]] = {0: [], 1: []}
    completions = {}
    for r in responses:
        if r.WhichOneof("payload") == "chunk":
            assert r.index not in completions
            chunks[r.index] += list(r.chunk.token_ids)
        else:
            completions[r.index] = r.completion
    expected = trainer.local_greedy(trainer.weights, SEQUENCE, 8)
    for i in (0, 1):
        c = completions[i]
        assert list(c.output_ids) == chunks[i] == expected
        assert c.finish_reason == pb.FINISH_REASON_LENGTH and c.prompt_tokens == len(SEQUENCE)
        assert [(s.start_token, s.version) for s in c.version_spans] == [(0, trainer.version)]
        assert len(c.output_logprobs) == 8

    bad = pb.GenerateRequest(input_ids=[1, 999])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        [r async for r in stub.Generate(bad)]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input_ids[1] = 999" in (err.value.details() or "")


async def test_top_logprobs_end_to_end(stub, trainer):
    """Top-k alternatives per generated token (streamed and final) and per prompt
    position, equal to torch.topk(log_softmax(logits)) of the weights served."""
    k, k_prompt, steps = 5, 4, 6
    request = pb.GenerateRequest(
        input_ids=SEQUENCE,
        sampling_params=pb.SamplingParams(temperature=0.0, max_new_tokens=steps, n=2, ignore_eos=True),
        stream=True,
        top_logprobs=k,
        prompt_top_logprobs=k_prompt,
    )
    chunk_tops: dict[int, list[pb.TopLogprobs]] = {0: [], 1: []}
    completions = {}
    async for r in stub.Generate(request):
        if r.WhichOneof("payload") == "chunk":
            assert len(r.chunk.top_logprobs) == len(r.chunk.token_ids)
            chunk_tops[r.index] += list(r.chunk.top_logprobs)
        else:
            completions[r.index] = r.completion

    expected = trainer.local_greedy(trainer.weights, SEQUENCE, steps)
    trainer.model.load_state_dict(trainer.weights, strict=False)
    with torch.no_grad():
        ref = torch.log_softmax(trainer.model(torch.tensor([SEQUENCE + expected])).logits[0].float(), -1)
    for i in (0, 1):
        c = completions[i]
        assert list(c.output_ids) == expected
        assert list(c.output_top_logprobs) == chunk_tops[i] and len(c.output_top_logprobs) == steps
        for t, top in enumerate(c.output_top_logprobs):
            values, ids = ref[len(SEQUENCE) - 1 + t].topk(k)
            assert list(top.token_ids) == ids.tolist()
            assert list(top.logprobs) == pytest.approx(values.tolist(), abs=1e-4)
            # Greedy: the sampled token heads the list, with exactly its logprob.
            assert top.token_ids[0] == c.output_ids[t] and top.logprobs[0] == c.output_logprobs[t]
        assert len(c.prompt_top_logprobs) == len(c.prompt_logprobs) == len(SEQUENCE)
        assert list(c.prompt_top_logprobs[0].token_ids) == [] and c.prompt_logprobs[0] == 0.0
        for pos in range(1, len(SEQUENCE)):
            values, ids = ref[pos - 1].topk(k_prompt)
            top = c.prompt_top_logprobs[pos]
            assert list(top.token_ids) == ids.tolist()
            assert list(top.logprobs) == pytest.approx(values.tolist(), abs=1e-4)

    # Without the fields nothing comes back; a k above 20 is refused, naming the field.
    request = pb.GenerateRequest(input_ids=SEQUENCE, sampling_params=pb.SamplingParams(max_new_tokens=2), stream=True)
    for r in [r async for r in stub.Generate(request)]:
        if r.WhichOneof("payload") == "chunk":
            assert len(r.chunk.top_logprobs) == 0
        else:
            assert len(r.completion.output_top_logprobs) == len(r.completion.prompt_top_logprobs) == 0
    for field in ("top_logprobs", "prompt_top_logprobs"):
        out_of_range: dict[str, Any] = {field: 21}
        bad = pb.GenerateRequest(input_ids=SEQUENCE, **out_of_range)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            [r async for r in stub.Generate(bad)]
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (err.value.details() or "").startswith(f"{field} must be between 0 and 20, got 21")


async def test_update_with_wrong_checksums_keeps_the_old_version(stub, trainer):
    before_version = await served_version(stub)
    before = await served_prompt_logprobs(stub)
    assert before == pytest.approx(trainer.local_prompt_logprobs(trainer.weights, SEQUENCE), abs=1e-4)

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await trainer.push(trainer.perturbed(seed=1), wrong_crc=True)
    assert err.value.code() == grpc.StatusCode.ABORTED and "crc32" in (err.value.details() or "")

    assert await served_version(stub) == before_version == trainer.version
    assert await served_prompt_logprobs(stub) == before


async def test_update_abandoned_midway_keeps_the_old_version(stub, trainer):
    before_version = await served_version(stub)
    before = await served_prompt_logprobs(stub)
    with pytest.raises(RuntimeError, match="stopped after 1 buckets"):
        await trainer.push(trainer.perturbed(seed=2), stop_after=1)
    assert await served_version(stub) == before_version == trainer.version
    assert await served_prompt_logprobs(stub) == before


async def test_update_after_an_abort_serves_the_new_weights(stub, trainer):
    start = await served_version(stub)
    assert start == trainer.version
    old = await served_prompt_logprobs(stub)

    new = trainer.perturbed(seed=3)
    joined, committed = await trainer.push(new)
    assert joined, "after a failure the group is formed anew"
    assert committed.policy.version == start + 1 and committed.policy.step == 100 + start + 1
    assert await served_version(stub) == start + 1
    served = await served_prompt_logprobs(stub)
    assert served == pytest.approx(trainer.local_prompt_logprobs(new, SEQUENCE), abs=1e-4)
    assert served != pytest.approx(old, abs=1e-3)

    request = pb.GenerateRequest(
        input_ids=SEQUENCE, sampling_params=pb.SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True)
    )
    [response] = [r async for r in stub.Generate(request)]
    assert list(response.completion.output_ids) == trainer.local_greedy(new, SEQUENCE, 6)
    assert [(s.start_token, s.version) for s in response.completion.version_spans] == [(0, start + 1)]

    # The next update reuses the group.
    newer = trainer.perturbed(seed=4)
    joined, committed = await trainer.push(newer)
    assert not joined and committed.policy.version == start + 2
    assert await served_prompt_logprobs(stub) == pytest.approx(trainer.local_prompt_logprobs(newer, SEQUENCE), abs=1e-4)
