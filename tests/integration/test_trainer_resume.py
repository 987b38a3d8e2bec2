"""Kill -9 the trainer mid-run and start it again: it resumes at the checkpoint's step
and policy version, and the real inference process is resynced to that version's
weights (its logprobs equal the checkpoint's) before training goes on."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from grpc import aio

from clotho.client import InferenceClient
from clotho.v1 import inference_service_pb2 as inf
from clotho.v1 import trainer_service_pb2 as tr_pb
from clotho.v1 import trainer_service_pb2_grpc as tr_grpc
from services import launcher
from trainer_fakes import FakeGateway, Servers, start_gateway, toy_batch

WAIT_SECONDS = 120.0
PROBE = [1, 12, 20, 33, 8, 15, 27, 9]


class Events:
    """Step lines of one trainer process, waited on by condition (no sleeps)."""

    def __init__(self) -> None:
        self.seen: list[dict] = []
        self.changed = asyncio.Condition()

    async def on_event(self, name: str, event: dict) -> None:
        async with self.changed:
            self.seen.append(event)
            self.changed.notify_all()

    async def wait_for(self, predicate) -> dict:
        async def find() -> dict:
            async with self.changed:
                while True:
                    for e in self.seen:
                        if predicate(e):
                            return e
                    await self.changed.wait()

        return await asyncio.wait_for(find(), WAIT_SECONDS)


async def start_trainer(args: list[str], log_dir: Path, events: Events) -> launcher.Child:
    child = await launcher.start("trainer", "services.trainer", args, log_dir, on_event=events.on_event)
    await launcher.wait_ready(child, WAIT_SECONDS)
    return child


def hf_logprobs(model_dir: Path, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


async def served(client: InferenceClient) -> tuple[torch.Tensor, int]:
    done = await client.generate(PROBE, return_prompt_logprobs=True, max_new_tokens=0)
    policy = await client.stub.GetServedPolicy(inf.GetServedPolicyRequest())
    return torch.tensor(list(done[0].prompt_logprobs)[1:]), policy.policy.version


@pytest.mark.timeout(300)
async def test_kill9_then_restart_resumes_step_version_and_resyncs_inference(tiny_model_dir, tmp_path, service_process):
    gateway = FakeGateway([toy_batch(seed=i) for i in range(3)])
    gateway.hold_when_empty = True
    servers = Servers()
    server, gateway_target = await start_gateway(gateway)
    servers.servers.append(server)
    ckpt = tmp_path / "ckpt"
    try:
        async with service_process(
            "services.inference", ["--model-path", str(tiny_model_dir)], tmp_path / "logs-inference"
        ) as (_inference, info):
            target = f"127.0.0.1:{info['grpc_port']}"
            client = InferenceClient(target)
            args = [
                "--model-path",
                str(tiny_model_dir),
                "--gateway",
                gateway_target,
                "--inference",
                target,
                "--batch-size",
                "4",
                "--credits",
                "1",
                "--checkpoint-dir",
                str(ckpt),
                "--checkpoint-interval",
                "2",
                "--grace-seconds",
                "1",
                "--lr",
                "0.01",
            ]
            first = Events()
            trainer = await start_trainer(args, tmp_path / "logs-1", first)
            await first.wait_for(lambda e: e.get("event") == "step" and e["step"] == 3)
            assert (await served(client))[1] == 3
            # Out of batches: the trainer waits for step 4. Kill it without warning.
            trainer.proc.kill()
            assert await trainer.proc.wait() == -9
            assert (ckpt / "latest").read_text().strip() == "step-2"

            second = Events()
            trainer = await start_trainer(args, tmp_path / "logs-2", second)
            try:
                resumed = await second.wait_for(lambda e: e.get("event") == "resumed")
                assert (resumed["step"], resumed["policy_version"]) == (2, 2)
                resync = await second.wait_for(lambda e: e.get("event") == "resync")
                assert resync["policy_version"] == 2 and resync["sync_bytes"] > 0

                # The shard went back from version 3 to the checkpoint's version 2, with its
                # weights: served logprobs are the checkpoint's.
                logprobs, version = await served(client)
                assert version == 2
                torch.testing.assert_close(logprobs, hf_logprobs(ckpt / "step-2", PROBE), atol=1e-4, rtol=1e-4)
                async with aio.insecure_channel(f"127.0.0.1:{trainer.info['grpc_port']}") as ch:
                    status = await tr_grpc.TrainerServiceStub(ch).GetTrainerStatus(tr_pb.GetTrainerStatusRequest())
                assert (status.step, status.policy.version) == (2, 2)
                assert gateway.registrations[-1].starting_step == 2

                # Training goes on from there: step 3 publishes version 3.
                gateway.add(toy_batch(seed=10))
                step = await second.wait_for(lambda e: e.get("event") == "step")
                assert (step["step"], step["policy_version"], step["sync_ok"]) == (3, 3, True)
                assert (await served(client))[1] == 3
            finally:
                # SIGTERM: a clean exit that checkpoints the step taken since the last save.
                assert await launcher.stop(trainer, grace=60) == 0
            assert (ckpt / "latest").read_text().strip() == "step-3"
            assert sorted(p.name for p in (ckpt / "step-3").iterdir()) == [
                "config.json",
                "generation_config.json",
                "model.safetensors",
                "optimizer.pt",
                "rng-rank0.pt",
                "scheduler.pt",
                "trainer_state.json",
            ]
            await client.close()
    finally:
        await servers.stop()
