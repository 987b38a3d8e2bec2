"""Traces across real service processes, collected by an in-process OTLP receiver:
one /generate through the gateway is one trace from the gateway to the engine; one
training step is one trace holding the trainer's stages and every shard's weight-update
spans, linked (through the gateway's hand-out span) to the submissions it trained on;
a service stopped with SIGTERM right after a request still delivers its spans."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import httpx
import pytest
from otlp_receiver import Span, export_env, otlp_receiver
from service_args import gateway_args

from services import launcher

pytestmark = pytest.mark.asyncio

REPO = Path(__file__).resolve().parents[2]


def by_id(spans: list[Span]) -> dict[str, Span]:
    return {s.span_id: s for s in spans}


def ancestry(span: Span, spans: list[Span]) -> list[Span]:
    """`span` and its ancestors, innermost first (as far as they were received)."""
    index = by_id(spans)
    chain = [span]
    while chain[-1].parent_id and chain[-1].parent_id in index:
        chain.append(index[chain[-1].parent_id])
    return chain


def group_json(seed: int) -> dict:
    prompt = [7 + (seed + i) % 30 for i in range(5)]
    tokens, masks = [], []
    for j in range(2):
        completion = [8 + (seed * 3 + j + k) % 30 for k in range(4 + j)]
        tokens.append(prompt + completion)
        masks.append([-100] * len(prompt) + completion)
    return {"tokens": tokens, "masks": masks, "scores": [0.0, 1.0]}


async def test_generate_is_one_trace_from_gateway_to_engine(tiny_model_dir, tmp_path, monkeypatch, service_process):
    with otlp_receiver() as (receiver, endpoint):
        for key, value in export_env(endpoint).items():
            monkeypatch.setenv(key, value)
        inference_args = ["--model-path", str(tiny_model_dir), "--grpc-port", "0", "--grace-seconds", "1"]
        async with service_process("services.inference", inference_args, tmp_path / "inf") as (_, inf):
            args = gateway_args(tmp_path / "gw", f"127.0.0.1:{inf['grpc_port']}")
            async with service_process("services.gateway", args, tmp_path / "gw") as (_, gw):
                caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
                headers = {"traceparent": f"00-{caller_trace}-00f067aa0ba902b7-01"}
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw['http_port']}", timeout=60) as client:
                    r = await client.post(
                        "/generate",
                        json={"input_ids": [7, 8, 9], "sampling_params": {"max_new_tokens": 3, "n": 2}},
                        headers=headers,
                    )
                    r.raise_for_status()
                (engine,) = await receiver.wait_for(lambda s: s.name == "engine.generate")
                await receiver.wait_for(lambda s: s.name == "engine.decode", count=2)
                await receiver.wait_for(lambda s: s.service == "clotho-gateway" and s.parent_id == "00f067aa0ba902b7")
        spans = receiver.find(lambda s: s.trace_id == caller_trace)
        assert {s.trace_id for s in receiver.find(lambda s: s.name.startswith("engine."))} == {caller_trace}
        chain = ancestry(engine, spans)
        services = [s.service for s in chain]
        # engine -> inference's Generate server span -> the gateway's gRPC client span ->
        # the gateway's route spans, whose root continues the caller's traceparent.
        assert services[0] == "clotho-inference" and services[-1] == "clotho-gateway", chain
        assert any(s.service == "clotho-inference" and s.name.endswith("InferenceService/Generate") for s in chain)
        assert chain[-1].parent_id == "00f067aa0ba902b7"
        assert engine.attributes["clotho.prompt_tokens"] == 3
        assert engine.attributes["clotho.output_tokens"] == 6
        assert engine.attributes["clotho.finish_reason"] == "length"
        assert engine.attributes["clotho.shard"].startswith("torch-0")
        assert "first_token" in engine.events
        children = {s.name for s in spans if s.parent_id == engine.span_id}
        assert {"engine.queue", "engine.prefill", "engine.decode"} <= children
        decodes = [s for s in spans if s.name == "engine.decode"]
        assert sorted(s.attributes["clotho.sample"] for s in decodes) == [0, 1]
        assert all(s.attributes["clotho.policy_version"] == 0 for s in decodes)
        # Both services sent them from their event loop (grpc.aio), no exporter thread.
        assert "grpc-python-asyncio/" in engine.user_agent, engine.user_agent
        assert "grpc-python-asyncio/" in chain[-1].user_agent, chain[-1].user_agent


async def test_training_step_is_one_trace_to_every_shard_linked_to_its_submissions(
    tiny_model_dir, tmp_path, monkeypatch, service_process
):
    with otlp_receiver() as (receiver, endpoint):
        for key, value in export_env(endpoint).items():
            monkeypatch.setenv(key, value)
        inference_args = [
            "--model-path",
            str(tiny_model_dir),
            "--grpc-port",
            "0",
            "--grace-seconds",
            "1",
            "--shards",
            "2",
        ]
        async with service_process("services.inference", inference_args, tmp_path / "inf") as (_, inf):
            async with service_process("services.gateway", gateway_args(tmp_path / "gw"), tmp_path / "gw") as (_, gw):
                trainer_args = [
                    "--model-path",
                    str(tiny_model_dir),
                    "--gateway",
                    f"127.0.0.1:{gw['grpc_port']}",
                    "--inference",
                    f"127.0.0.1:{inf['grpc_port']}",
                    "--batch-size",
                    "4",
                    "--num-steps",
                    "1",
                    "--grace-seconds",
                    "1",
                    "--checkpoint-dir",
                    str(tmp_path / "ckpt"),
                ]
                trainer = await launcher.start("trainer", "services.trainer", trainer_args, tmp_path / "trainer")
                try:
                    await launcher.wait_ready(trainer, 120)
                    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw['http_port']}", timeout=60) as c:
                        for seed in range(2):
                            (await c.post("/scored_data", json=group_json(seed))).raise_for_status()
                    (step,) = await receiver.wait_for(lambda s: s.name == "trainer.step" and bool(s.links), timeout=120)
                    await receiver.wait_for(lambda s: s.name == "shard.commit", count=2, timeout=60)
                    # One step is all it was asked for: it stops by itself.
                    await asyncio.wait_for(trainer.proc.wait(), 60)
                finally:
                    code = await launcher.stop(trainer, grace=30)
                assert code == 0, trainer.log_path.read_text()[-3000:]
    spans = receiver.find(lambda s: s.trace_id == step.trace_id)
    assert not step.parent_id
    names = {s.name for s in spans if s.service == "clotho-trainer"}
    assert {
        "trainer.wait_batch",
        "trainer.prepare_batch",
        "trainer.forward_backward",
        "trainer.optimizer_step",
        "weight_sync.push",
        "weight_sync.prepare",
        "weight_sync.transfer",
        "weight_sync.await",
        "weight_sync.commit",
    } <= names, names
    transfer = next(s for s in spans if s.name == "weight_sync.transfer")
    assert transfer.events and set(transfer.events) == {"bucket_sent"}
    for stage in ("prepare", "await", "commit"):
        on_shards = [s for s in spans if s.name == f"shard.{stage}"]
        assert sorted(s.attributes["clotho.shard"] for s in on_shards) == ["torch-0@cpu", "torch-1@cpu"], stage
        for s in on_shards:
            chain = ancestry(s, spans)
            assert chain[-1].span_id == step.span_id and s.service == "clotho-inference"
            assert any(c.name.endswith("WeightUpdate") or c.name.endswith("WeightTransfer") for c in chain)
    # The step links to the gateway's hand-out span, which links to both submissions.
    (batch_link,) = step.links
    (handout,) = receiver.find(lambda s: (s.trace_id, s.span_id) == batch_link)
    assert handout.name == "gateway.batch" and handout.service == "clotho-gateway"
    submissions = receiver.find(lambda s: s.name == "POST /scored_data")
    assert len(submissions) == 2
    assert sorted(handout.links) == sorted((s.trace_id, s.span_id) for s in submissions)


async def test_sigterm_right_after_a_request_still_delivers_its_spans(tmp_path, monkeypatch):
    with otlp_receiver() as (receiver, endpoint):
        # Spans would wait a minute in the batch processor: only the shutdown flush sends them.
        env = export_env(endpoint, OTEL_BSP_SCHEDULE_DELAY="60000")
        child = await launcher.start(
            "gateway", "services.gateway", gateway_args(tmp_path / "gw"), tmp_path / "gw", env=env
        )
        try:
            ready = await launcher.wait_ready(child, 120)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ready['http_port']}", timeout=30) as client:
                (await client.post("/scored_data", json=group_json(0))).raise_for_status()
                (await client.get("/status")).raise_for_status()
            assert not receiver.find(lambda s: True)
        finally:
            code = await launcher.stop(child, grace=30)
        assert code == 0
        await receiver.wait_for(lambda s: s.name == "POST /scored_data", timeout=5)
        await receiver.wait_for(lambda s: s.name == "GET /status", timeout=5)


async def test_demo_env_flushes_on_sigterm(tmp_path):
    """The demo environment (no run_service) flushes its spans when SIGTERM stops it."""
    with otlp_receiver() as (receiver, endpoint):
        env = {**os.environ, **export_env(endpoint, OTEL_BSP_SCHEDULE_DELAY="60000"), "PYTHONUNBUFFERED": "1"}
        code = (
            "import time\n"
            "from services.common.telemetry import flush_on_sigterm, setup_tracing\n"
            "tracer = setup_tracing('probe'); flush_on_sigterm()\n"
            "tracer.start_span('before-sigterm').end()\n"
            "print('ready', flush=True); time.sleep(60)\n"
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, cwd=REPO, env=env, stdout=asyncio.subprocess.PIPE
        )
        assert proc.stdout is not None
        assert (await asyncio.wait_for(proc.stdout.readline(), 60)).strip() == b"ready"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == -signal.SIGTERM
        await receiver.wait_for(lambda s: s.name == "before-sigterm", timeout=5)
