"""`clotho up` with access on: a fresh service token per run reaches inference, gateway
and trainer through their environment (never their command lines), the trainer and the
gateway present it, and the mesh trains and syncs every step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services import launcher, up


@pytest.mark.timeout(420)
async def test_up_trains_with_a_service_token(tiny_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    started: list[tuple[list[str], dict[str, str], launcher.Child]] = []
    real_start = launcher.start

    async def recording_start(name, module, args, log_dir, on_event=None, env=None):
        child = await real_start(name, module, args, log_dir, on_event=on_event, env=env)
        started.append((list(args), dict(env or {}), child))
        return child

    monkeypatch.setattr(launcher, "start", recording_start)
    args = up._parser().parse_args(
        [
            "--steps",
            "2",
            "--batch-size",
            "8",
            "--group-size",
            "4",
            "--data-dir",
            str(tmp_path),
            "--model-path",
            str(tiny_model_dir),
            "--quiet",
        ]
    )
    summary = await up.run_up(args)
    assert summary["steps"] == 2 and summary["policy_version"] == 2

    by_name = {child.name: (argv, env, child) for argv, env, child in started}
    token = by_name["inference"][1]["CLOTHO_INFERENCE_SERVICE_TOKEN"]
    assert len(token) >= 32
    assert by_name["trainer"][1]["CLOTHO_TRAINER_SERVICE_TOKEN"] == token
    assert by_name["gateway"][1]["CLOTHO_GATEWAY_SERVICE_TOKEN"] == token
    assert all(token not in " ".join(argv) for argv, _env, _child in started)
    # Every update reached the (guarded) inference service.
    # The trainer's step lines, as `clotho up` wrote them (it keeps none in memory).
    lines = (tmp_path / "steps.jsonl").read_text().splitlines()
    steps = [e for e in map(json.loads, lines) if e.get("event") == "step"]
    assert [e["step"] for e in steps] == [1, 2] and all(e["sync_ok"] for e in steps), steps
