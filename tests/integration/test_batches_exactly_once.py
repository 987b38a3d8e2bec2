"""Acknowledged groups are trained exactly once across crashes, with real processes
(gateway with its SQLite store, inference, trainer) on loopback.

Each group carries a unique token sequence; the trainer's batch log (`--batch-log`)
records the gateway step and a digest of every group it trained. After a trainer
restart the weights are the checkpoint's, so what counts is what the first life
trained up to its checkpoint plus everything the second life trained."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import sqlite3
import zlib
from array import array
from pathlib import Path

import httpx
import pytest

from services import launcher

WAIT_SECONDS = 120.0
GROUP_SIZE = 2
BATCH_SIZE = 4  # sequences: two groups per batch


def group(tag: int) -> dict:
    """A group whose tokens no other tag shares (ids inside the tiny vocabulary)."""
    prompt = [8 + tag // 25, 8 + tag % 25, 10, 11]
    completions = [[12, 13 + j] for j in range(GROUP_SIZE)]
    return {
        "tokens": [prompt + c for c in completions],
        "masks": [[-100] * len(prompt) + c for c in completions],
        "scores": [float(j) for j in range(GROUP_SIZE)],
    }


def digest(g: dict) -> int:
    crc = 0
    for tokens in g["tokens"]:
        crc = zlib.crc32(array("q", tokens).tobytes(), crc)
    return crc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def batch_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def metric(http: httpx.AsyncClient, name: str) -> float:
    text = (await http.get("/metrics")).text
    m = re.search(rf"^clotho_gateway_{name} (\S+)$", text, re.MULTILINE)
    assert m, name
    return float(m.group(1))


async def wait_metric(http: httpx.AsyncClient, name: str, value: float) -> None:
    async def check() -> None:
        while await metric(http, name) != value:
            await asyncio.sleep(0.1)

    await asyncio.wait_for(check(), WAIT_SECONDS)


async def start_gateway(log_dir: Path, data_dir: Path, grpc_port: int) -> tuple[launcher.Child, str]:
    args = ["--http-port", "0", "--grpc-port", str(grpc_port), "--grace-seconds", "1", "--data-dir", str(data_dir)]
    child = await launcher.start("gateway", "services.gateway", args, log_dir)
    ready = await launcher.wait_ready(child, WAIT_SECONDS)
    return child, f"http://127.0.0.1:{ready['http_port']}"


async def start_trainer(args: list[str], log_dir: Path) -> tuple[launcher.Child, asyncio.Queue]:
    steps: asyncio.Queue = asyncio.Queue()

    async def on_event(name: str, event: dict) -> None:
        if event.get("event") == "step":
            await steps.put(event["step"])

    child = await launcher.start("trainer", "services.trainer", args, log_dir, on_event=on_event)
    await launcher.wait_ready(child, WAIT_SECONDS)
    return child, steps


async def wait_step(steps: asyncio.Queue, step: int) -> None:
    async def find() -> None:
        while await steps.get() != step:
            pass

    await asyncio.wait_for(find(), WAIT_SECONDS)


async def submit(http: httpx.AsyncClient, tags: range) -> list[int]:
    acked = []
    for tag in tags:
        r = await http.post("/scored_data", json=group(tag))
        assert r.json() == {"status": "received"}, r.text
        acked.append(digest(group(tag)))
    return acked


def trainer_args(model: Path, gateway: str, inference: str, ckpt: Path, log: Path, interval: int) -> list[str]:
    return [
        "--model-path",
        str(model),
        "--gateway",
        gateway,
        "--inference",
        inference,
        "--batch-size",
        str(BATCH_SIZE),
        "--credits",
        "1",
        "--checkpoint-dir",
        str(ckpt),
        "--checkpoint-interval",
        str(interval),
        "--num-steps",
        "6",
        "--grace-seconds",
        "1",
        "--lr",
        "0.01",
        "--batch-log",
        str(log),
    ]


@pytest.mark.timeout(420)
async def test_trainer_kill9_beyond_its_checkpoint_trains_every_acked_group_once(
    tiny_model_dir, tmp_path, service_process
):
    grpc_port = free_port()
    gateway, http_url = await start_gateway(tmp_path / "logs-gateway", tmp_path / "store", grpc_port)
    ckpt, log1, log2 = tmp_path / "ckpt", tmp_path / "batches-1.jsonl", tmp_path / "batches-2.jsonl"
    try:
        async with (
            service_process(
                "services.inference", ["--model-path", str(tiny_model_dir)], tmp_path / "logs-inference"
            ) as (_inference, info),
            httpx.AsyncClient(base_url=http_url, timeout=30) as http,
        ):
            inference = f"127.0.0.1:{info['grpc_port']}"
            gateway_target = f"127.0.0.1:{grpc_port}"
            acked = await submit(http, range(8))  # batches 1-4
            trainer, steps = await start_trainer(
                trainer_args(tiny_model_dir, gateway_target, inference, ckpt, log1, 3), tmp_path / "logs-1"
            )
            await wait_step(steps, 4)
            # Batch 5 goes out at once (the trainer credited it when batch 4 came); the
            # checkpoint of step 3 released batches 1-3. Killed with 4 and 5 taken.
            acked += await submit(http, range(8, 10))
            await wait_metric(http, "kept_batches", 2)
            assert await metric(http, "checkpointed_step") == 3
            trainer.proc.kill()
            assert await trainer.proc.wait() == -9
            await launcher.stop(trainer)
            assert (ckpt / "latest").read_text().strip() == "step-3"

            acked += await submit(http, range(10, 12))  # batch 6
            trainer, steps = await start_trainer(
                trainer_args(tiny_model_dir, gateway_target, inference, ckpt, log2, 3), tmp_path / "logs-2"
            )
            # It trains steps 4-6 (batches 4 and 5 again, then 6) and exits.
            assert await asyncio.wait_for(trainer.proc.wait(), WAIT_SECONDS * 2) == 0
            await launcher.stop(trainer)
            await wait_metric(http, "kept_batches", 0)
            assert await metric(http, "kept_replayed_total") == 2

        first, second = batch_lines(log1), batch_lines(log2)
        assert [line["batch_step"] for line in first][:4] == [1, 2, 3, 4]
        assert [line["batch_step"] for line in second] == [4, 5, 6]
        assert [line["step"] for line in second] == [4, 5, 6]
        trained = [d for line in first if line["batch_step"] <= 3 for d in line["groups"]]
        trained += [d for line in second for d in line["groups"]]
        assert sorted(trained) == sorted(acked) and len(set(acked)) == 12
    finally:
        await launcher.stop(gateway, grace=30)


@pytest.mark.timeout(420)
async def test_gateway_kill9_keeps_batches_handed_out_but_not_checkpointed(tiny_model_dir, tmp_path, service_process):
    grpc_port = free_port()
    data_dir = tmp_path / "store"
    ckpt, log = tmp_path / "ckpt", tmp_path / "batches.jsonl"
    gateway, http_url = await start_gateway(tmp_path / "logs-gateway-1", data_dir, grpc_port)
    trainer = None
    try:
        async with service_process(
            "services.inference", ["--model-path", str(tiny_model_dir)], tmp_path / "logs-inference"
        ) as (_inference, info):
            inference = f"127.0.0.1:{info['grpc_port']}"
            async with httpx.AsyncClient(base_url=http_url, timeout=30) as http:
                acked = await submit(http, range(6))  # batches 1-3
                trainer, steps = await start_trainer(
                    trainer_args(tiny_model_dir, f"127.0.0.1:{grpc_port}", inference, ckpt, log, 4),
                    tmp_path / "logs-trainer",
                )
                await wait_step(steps, 3)
                await wait_metric(http, "kept_batches", 3)  # no checkpoint yet
            gateway.proc.send_signal(signal.SIGKILL)
            assert await gateway.proc.wait() == -signal.SIGKILL
            await launcher.stop(gateway)
            # The three batches the trainer holds only in memory are on disk.
            with sqlite3.connect(data_dir / "trajectories.sqlite3") as db:
                assert [r[0] for r in db.execute("SELECT step FROM kept ORDER BY step")] == [1, 2, 3]

            gateway, http_url = await start_gateway(tmp_path / "logs-gateway-2", data_dir, grpc_port)
            async with httpx.AsyncClient(base_url=http_url, timeout=30) as http:
                acked += await submit(http, range(6, 12))  # batches 4-6
                # The trainer reconnects with resume_step 3: nothing is sent twice; its
                # checkpoints at steps 4 and 6 release everything.
                assert await asyncio.wait_for(trainer.proc.wait(), WAIT_SECONDS * 2) == 0
                await launcher.stop(trainer)
                await wait_metric(http, "kept_batches", 0)
                assert await metric(http, "kept_replayed_total") == 0

        lines = batch_lines(log)
        assert [line["batch_step"] for line in lines] == [1, 2, 3, 4, 5, 6]
        trained = [d for line in lines for d in line["groups"]]
        assert sorted(trained) == sorted(acked) and len(set(acked)) == 12
    finally:
        if trainer is not None:
            await launcher.stop(trainer)
        await launcher.stop(gateway, grace=30)
