"""The pieces behind metrics, W&B and `clotho up`'s extras, without processes: the
trainer's Prometheus families, the Atropos W&B names, the run plot, the `--trace-ui`
message when Phoenix is missing and the OTEL_* wiring of the children, and the
environment names a batch carries."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services import trace_ui, up
from services.gateway.rpc.convert import env_names
from services.gateway.trajectory.queue_index import Group
from services.gateway.trajectory.records import EnvRecord
from services.run_plot import PNG_SIGNATURE, write_plot
from services.trainer.metrics import TrainerMetrics
from services.trainer.wandb_log import atropos_metrics


def step_record(step: int, **extra: object) -> dict:
    record = {
        "event": "step",
        "step": step,
        "policy_version": step,
        "mean_score": 0.25 * step,
        "loss": 1.0 / step,
        "kl": 0.01,
        "clip_fraction": 0.1,
        "sync_seconds": 0.02,
        "sync_bytes": 4_000_000,
        "step_seconds": 0.5,
        "sync_ok": True,
        "ratio_mean": 1.0,
        "ratio_max": 1.5,
        "ratio_min": 0.7,
        "grad_norm": 2.0,
        "lr": 1e-3,
        "tokens": 100,
        "sequences": 8,
        "staleness_mean": 0.5,
        "staleness_max": 1,
        "stale_dropped": 0,
        "atropos/env_0/mean_score": 0.5,
        "env_mean_scores": {"gsm8k_0": 0.5, "env_3": 0.1},
    }
    record.update(extra)
    return record


def samples(metrics: TrainerMetrics) -> dict[tuple[str, tuple], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_trainer_metrics_follow_the_step_records() -> None:
    metrics = TrainerMetrics()
    assert samples(metrics)[("clotho_trainer_step", ())] == 0
    metrics.observe(step_record(1))
    metrics.observe(step_record(2))
    got = samples(metrics)
    assert got[("clotho_trainer_step", ())] == 2
    assert got[("clotho_trainer_loss", ())] == pytest.approx(0.5)
    assert got[("clotho_trainer_env_mean_score", (("env", "gsm8k_0"),))] == pytest.approx(0.5)
    assert got[("clotho_trainer_is_ratio", (("stat", "max"),))] == pytest.approx(1.5)
    assert got[("clotho_trainer_staleness", (("stat", "max"),))] == 1
    assert got[("clotho_trainer_step_seconds_count", ())] == 2
    assert got[("clotho_trainer_sync_bytes_per_second", ())] == pytest.approx(2e8)
    assert got[("clotho_trainer_sync_bytes_total", ())] == 8_000_000
    metrics.observe(step_record(3, sync_ok=False, sync_seconds=0.0, sync_bytes=0, sync_error="shard down"))
    assert samples(metrics)[("clotho_trainer_sync_failures_total", ())] == 1


def test_wandb_names_are_atroposs() -> None:
    logged = atropos_metrics(step_record(2))
    assert logged["train/loss"] == pytest.approx(0.5)
    assert logged["train/grad_norm"] == 2.0
    assert logged["train/learning_rate"] == 1e-3
    assert logged["grpo/kl_penalty"] == 0.01
    assert logged["grpo/mean_ratio"] == 1.0
    assert logged["grpo/clipped_fraction"] == 0.1
    assert logged["train/step_time"] == 0.5
    assert logged["train/sync_time"] == 0.02
    assert logged["atropos/gsm8k_0/mean_score"] == 0.5
    assert logged["atropos/env_3/mean_score"] == 0.1
    assert logged["clotho/sync_bytes_per_second"] == pytest.approx(2e8)
    assert all(isinstance(v, float) for v in logged.values())


def test_run_plot_is_a_png(tmp_path: Path) -> None:
    steps = [step_record(i, env_mean_scores={"a_0": 0.1 * i, "b_0": 0.05 * i}) for i in range(1, 30)]
    path = write_plot(steps, tmp_path / "out" / "summary.png")
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert width > 600 and height > 400
    import matplotlib.image

    assert matplotlib.image.imread(str(path)).shape[:2] == (height, width)


def test_up_writes_the_plot_beside_the_summary_and_survives_a_failure(tmp_path: Path, capsys) -> None:
    assert up.write_run_plot([step_record(1), step_record(2)], tmp_path / "summary.png") == tmp_path / "summary.png"
    assert (tmp_path / "summary.png").read_bytes()[:8] == PNG_SIGNATURE
    (tmp_path / "blocked").write_text("a file where the plot's folder should be")
    assert up.write_run_plot([step_record(1)], tmp_path / "blocked" / "summary.png") is None
    assert "could not write the plot" in capsys.readouterr().err


def test_trace_ui_without_phoenix_says_how_to_install_it(monkeypatch, capsys) -> None:
    monkeypatch.setattr(trace_ui, "available", lambda: False)
    assert up.main(["--trace-ui", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'clotho[trace-ui]'" in err and "arize-phoenix" in err


def test_trace_ui_wires_every_child_to_the_receiver() -> None:
    args = up._parser().parse_args(["--trace-ui", "--trajectory-token", "t"])
    wired = up.child_envs(args, "http://127.0.0.1:4317")
    assert set(wired) == {"inference", "gateway", "trainer", "env"}
    for name, env in wired.items():
        assert env["OTEL_TRACES_EXPORTER"] == "otlp"
        assert env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] == "http://127.0.0.1:4317"
        assert env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] == "grpc"
        assert env["OTEL_SERVICE_NAME"] == f"clotho-{name}"
    assert wired["trainer"]["CLOTHO_TRAINER_GATEWAY_TOKEN"] == "t"
    plain = up.child_envs(up._parser().parse_args([]), None)
    assert not any(k.startswith("OTEL_") for env in plain.values() for k in env)


def test_up_passes_wandb_flags_only_when_asked() -> None:
    parse = up._parser().parse_args
    assert up.wandb_args(parse([])) == []
    assert up.wandb_args(parse(["--wandb-project", "p"])) == ["--wandb", "--wandb-project", "p"]
    assert up.wandb_args(parse(["--wandb-group", "g"])) == ["--wandb", "--wandb-group", "g"]


def test_a_batch_names_its_environments() -> None:
    envs = [
        EnvRecord(
            registered_id=i,
            desired_name=n,
            real_name=f"{n}_0",
            max_context_len=64,
            weight=1.0,
            group_size=2,
            min_batch_allocation=None,
        )
        for i, n in enumerate(["gsm8k", "code"])
    ]
    batch = [Group(id=i, size=2, env_id=e, body=b"{}") for i, e in enumerate([1, 1, None, 7])]
    assert env_names(batch, envs) == {1: "code_0"}


def test_gateway_route_latency_buckets_and_labels() -> None:
    from services.gateway.http.metrics import RouteLatency

    latency = RouteLatency(buckets=(0.01, 0.1))
    latency.set_routes(["/scored_data", "/v1/models/{model_id:path}"])
    for seconds in (0.005, 0.01, 0.05, 2.0):
        latency.observe({"method": "POST", "path": "/scored_data"}, seconds)
    latency.observe(
        {"method": "GET", "path": "/v1/models/x", "route": type("R", (), {"path": "/v1/models/{m}"})()}, 0.2
    )
    latency.observe({"method": "GET", "path": "/no/such/route"}, 0.001)
    text = generate_latest(latency.registry).decode()
    got = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    name = "clotho_gateway_http_request_duration_seconds"
    ingest = (("method", "POST"), ("route", "/scored_data"))
    assert got[(f"{name}_bucket", (("le", "0.01"), *ingest))] == 2  # le is inclusive
    assert got[(f"{name}_bucket", (("le", "0.1"), *ingest))] == 3
    assert got[(f"{name}_bucket", (("le", "+Inf"), *ingest))] == 4
    assert got[(f"{name}_count", ingest)] == 4
    assert got[(f"{name}_sum", ingest)] == pytest.approx(2.065)
    assert got[(f"{name}_count", (("method", "GET"), ("route", "/v1/models/{m}")))] == 1
    assert got[(f"{name}_count", (("method", "GET"), ("route", "other")))] == 1
