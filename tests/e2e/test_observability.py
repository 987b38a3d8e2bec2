"""Metrics and W&B from real processes: inference, gateway, trainer and the demo
environment on loopback. Each service's Prometheus endpoint is scraped and parsed with
prometheus-client's own parser while the mesh works, and the named metrics move with
the work; the trainer's offline W&B run holds its metrics under Atropos' names."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services import launcher
from waiting import wait_until

ATROPOS_KEYS = {
    "train/loss",
    "train/grad_norm",
    "train/learning_rate",
    "grpo/kl_penalty",
    "grpo/mean_ratio",
    "grpo/clipped_fraction",
    "train/step_time",
    "train/sync_time",
}


async def scrape(client: httpx.AsyncClient, url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the endpoint: (name, sorted labels) -> value."""
    response = await client.get(url)
    assert response.status_code == 200, response.text
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def total(samples: dict, name: str, **labels: str) -> float:
    """The sum over every sample of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def read_wandb_history(run_file: Path) -> list[dict]:
    """The history rows of an offline run's .wandb file (a LevelDB-style log of
    wandb_internal_pb2.Record messages after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, payloads = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            payloads.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            payloads.append(pending + chunk)
    rows = []
    for payload in payloads:
        record = wandb_internal_pb2.Record()  # type: ignore[attr-defined]
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
    return rows


@pytest.mark.timeout(420)
async def test_metrics_move_with_the_work_and_wandb_holds_atropos_names(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb").mkdir()
    logs = tmp_path / "logs"
    children: list[launcher.Child] = []

    async def start(name: str, module: str, argv: list[str]) -> dict:
        child = await launcher.start(name, module, argv, logs)
        children.append(child)
        return await launcher.wait_ready(child, 120)

    http = httpx.AsyncClient(timeout=30)
    try:
        inf = await start(
            "inference",
            "services.inference",
            ["--model-path", str(tiny_model_dir), "--metrics-port", str(launcher.free_port())],
        )
        inference = f"127.0.0.1:{inf['grpc_port']}"
        inf_metrics = f"http://127.0.0.1:{inf['metrics_port']}/metrics"
        gw = await start(
            "gateway",
            "services.gateway",
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
        gateway_url = f"http://127.0.0.1:{gw['http_port']}"

        # Inference: tokens, time to first token and per-token latency move with a /generate.
        before = await scrape(http, inf_metrics)
        assert value(before, "clotho_inference_policy_version") == 0
        assert total(before, "clotho_inference_generated_tokens_total") == 0
        reply = await http.post(
            f"{gateway_url}/generate",
            json={"input_ids": [1, 20, 21, 22], "sampling_params": {"max_new_tokens": 6, "ignore_eos": True}},
        )
        assert reply.status_code == 200, reply.text
        after = await scrape(http, inf_metrics)
        assert total(after, "clotho_inference_generated_tokens_total") == 6
        assert value(after, "clotho_inference_time_to_first_token_seconds_count") == 1
        assert value(after, "clotho_inference_time_per_output_token_seconds_count") == 1
        assert value(after, "clotho_inference_requests_total", outcome="ok") == 1
        assert total(after, "clotho_inference_kv_cache_rows") == 0  # nothing running now
        # Gateway: the same request's latency under its route.
        gw_samples = await scrape(http, f"{gateway_url}/metrics")
        assert (
            value(gw_samples, "clotho_gateway_http_request_duration_seconds_count", method="POST", route="/generate")
            == 1
        )

        tr = await start(
            "trainer",
            "services.trainer",
            [
                "--model-path",
                str(tiny_model_dir),
                "--gateway",
                f"127.0.0.1:{gw['grpc_port']}",
                "--inference",
                inference,
                "--batch-size",
                "16",
                "--num-steps",
                "0",
                "--checkpoint-dir",
                str(tmp_path / "ckpt"),
                "--metrics-port",
                str(launcher.free_port()),
                "--wandb",
                "--wandb-project",
                "clotho-test",
                "--wandb-group",
                "observability",
            ],
        )
        trainer = children[-1]
        tr_metrics = f"http://127.0.0.1:{tr['metrics_port']}/metrics"
        assert value(await scrape(http, tr_metrics), "clotho_trainer_step") == 0
        # The trainer registers its W&B project and group (once it is serving): the
        # gateway's /wandb_info hands them to environments.
        wandb_info: dict = {}

        async def registered() -> bool:
            wandb_info.update((await http.get(f"{gateway_url}/wandb_info")).json())
            return wandb_info.get("project") is not None

        deadline = asyncio.get_running_loop().time() + 60
        while not await registered():
            assert asyncio.get_running_loop().time() < deadline, "the trainer never registered"
            await asyncio.sleep(0.05)
        assert wandb_info == {"group": "observability", "project": "clotho-test"}

        await start(
            "env",
            "services.demo.env",
            ["--gateway-url", gateway_url, "--tokenizer-path", str(tiny_model_dir), "--group-size", "8"],
        )

        def steps_done() -> int:
            return sum(1 for e in trainer.events if e.get("event") == "step")

        await wait_until(lambda: steps_done() >= 2, timeout=240)
        samples = await scrape(http, tr_metrics)
        assert value(samples, "clotho_trainer_step") >= 2
        assert value(samples, "clotho_trainer_policy_version") >= 2
        assert value(samples, "clotho_trainer_step_seconds_count") >= 2
        assert value(samples, "clotho_trainer_sync_seconds_count") >= 2
        assert value(samples, "clotho_trainer_sync_bytes_per_second") > 0
        for name in ("clotho_trainer_loss", "clotho_trainer_kl", "clotho_trainer_clip_fraction"):
            assert (name, ()) in samples
        assert {stat for (n, ls), _ in samples.items() if n == "clotho_trainer_is_ratio" for _, stat in ls} == {
            "mean",
            "min",
            "max",
        }
        assert ("clotho_trainer_staleness", (("stat", "max"),)) in samples
        envs = [dict(ls)["env"] for (n, ls) in samples if n == "clotho_trainer_env_mean_score"]
        assert envs and all(e.startswith("repeat_digit_") for e in envs), envs

        # Inference after commits: the served version moved, commits counted.
        served = await scrape(http, inf_metrics)
        assert value(served, "clotho_inference_policy_version") >= 2
        assert value(served, "clotho_inference_weight_commits_total") >= 2
        assert total(served, "clotho_inference_generated_tokens_total") > 6

        await launcher.stop(children[-1])  # the environment
        # The trainer finishes its W&B run on SIGTERM and exits cleanly.
        assert await launcher.stop(trainer, grace=60.0) == 0, trainer.log_path.read_text()[-3000:]
        steps = [e for e in trainer.events if e.get("event") == "step"]

        runs = list((tmp_path / "wandb").glob("wandb/offline-run-*/run-*.wandb"))
        assert len(runs) == 1, runs
        rows = [r for r in read_wandb_history(runs[0]) if "train/loss" in r]
        assert [r["_step"] for r in rows] == [e["step"] for e in steps]
        for row, step in zip(rows, steps):
            assert row.keys() >= ATROPOS_KEYS
            assert row["train/loss"] == pytest.approx(step["loss"])
            assert row["grpo/clipped_fraction"] == pytest.approx(step["clip_fraction"])
            env_keys = [k for k in row if k.startswith("atropos/") and k.endswith("/mean_score")]
            assert env_keys and all(k.startswith("atropos/repeat_digit_") for k in env_keys), env_keys
    finally:
        await http.aclose()
        for child in reversed(children):
            await launcher.stop(child)
