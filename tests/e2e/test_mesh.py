"""The whole loop for real: inference, gateway, trainer and the demo environment as
separate processes on loopback. Every update must reach the inference engine: after
training, the served logprobs of a fixed sequence equal the trainer's own under its
final weights, and the policy version advanced by exactly one per update."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import pytest
import torch
from grpc import aio

from clotho.client import InferenceClient
from clotho.v1 import inference_service_pb2 as inf
from clotho.v1 import trainer_service_pb2 as tr
from clotho.v1 import trainer_service_pb2_grpc as tr_grpc
from services import launcher

STEPS = 3
FIXED_TEXT = "repeat 4: 4444"


def _hf_prompt_logprobs(model_dir: Path, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    return logp.gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)


async def _served_prompt_logprobs(client: InferenceClient, ids: list[int]) -> tuple[torch.Tensor, int]:
    done = await client.generate(ids, return_prompt_logprobs=True, max_new_tokens=0)
    policy = await client.stub.GetServedPolicy(inf.GetServedPolicyRequest())
    return torch.tensor(list(done[0].prompt_logprobs)[1:]), policy.policy.version


@pytest.mark.timeout(420)
async def test_training_updates_reach_inference(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(tiny_model_dir)).encode(FIXED_TEXT, add_special_tokens=False)
    logs = tmp_path / "logs"
    children: list[launcher.Child] = []

    async def start(name: str, module: str, argv: list[str]) -> dict:
        child = await launcher.start(name, module, argv, logs)
        children.append(child)
        return await launcher.wait_ready(child, 120)

    versions_seen: list[int] = []
    watcher = None
    try:
        inf_ready = await start("inference", "services.inference", ["--model-path", str(tiny_model_dir)])
        inference = f"127.0.0.1:{inf_ready['grpc_port']}"
        client = InferenceClient(inference)
        before, v0 = await _served_prompt_logprobs(client, ids)
        assert v0 == 0

        gw_ready = await start(
            "gateway",
            "services.gateway",
            # The inference service names its model but never hands out its local path,
            # so the gateway is told where the tokenizer is.
            [
                "--http-port",
                "0",
                "--inference",
                inference,
                "--tokenizer-path",
                str(tiny_model_dir),
                "--data-dir",
                str(tmp_path / "gateway"),
            ],
        )
        tr_ready = await start(
            "trainer",
            "services.trainer",
            [
                "--model-path",
                str(tiny_model_dir),
                "--gateway",
                f"127.0.0.1:{gw_ready['grpc_port']}",
                "--inference",
                inference,
                "--batch-size",
                "16",
                "--num-steps",
                str(STEPS),
                "--checkpoint-dir",
                str(tmp_path / "ckpt"),
                "--lr",
                "0.01",
            ],
        )
        trainer = children[-1]

        channel = aio.insecure_channel(f"127.0.0.1:{tr_ready['grpc_port']}")

        async def watch() -> None:
            with contextlib.suppress(aio.AioRpcError):
                async for msg in tr_grpc.TrainerServiceStub(channel).WatchPolicy(tr.WatchPolicyRequest()):
                    versions_seen.append(msg.policy.version)

        watcher = asyncio.create_task(watch())
        await start(
            "env",
            "services.demo.env",
            [
                "--gateway-url",
                f"http://127.0.0.1:{gw_ready['http_port']}",
                "--tokenizer-path",
                str(tiny_model_dir),
                "--group-size",
                "8",
            ],
        )
        assert await asyncio.wait_for(trainer.proc.wait(), 300) == 0, (logs / "trainer.log").read_text()[-3000:]
        await asyncio.wait_for(watcher, 30)
        await channel.close()

        steps = [e for e in trainer.events if e.get("event") == "step"]
        assert [e["step"] for e in steps] == list(range(1, STEPS + 1))
        assert all(e["sync_ok"] for e in steps), steps
        # Exactly one version per update, none skipped, none repeated.
        assert [e["policy_version"] for e in steps] == list(range(1, STEPS + 1))
        assert versions_seen == list(range(STEPS + 1))

        served, version = await _served_prompt_logprobs(client, ids)
        assert version == STEPS
        ckpt = tmp_path / "ckpt" / (tmp_path / "ckpt" / "latest").read_text().strip()
        assert json.loads((ckpt / "trainer_state.json").read_text())["policy_version"] == STEPS
        trainer_logprobs = _hf_prompt_logprobs(ckpt, ids)
        torch.testing.assert_close(served, trainer_logprobs, atol=1e-4, rtol=1e-4)
        # The weights did move: the old logprobs are not the new ones.
        assert (before - served).abs().max() > 1e-3
        await client.close()
    finally:
        if watcher is not None:
            watcher.cancel()
        for child in reversed(children):
            await launcher.stop(child)
