"""`clotho up` with a user's own Atropos environment and model directory.

The environment is the real `atroposlib` BaseEnv of test_atropos_env.py, given to
`clotho up` as a plain `serve` command; `clotho up` fills in the gateway's URLs and the
tokenizer. The run comes from a run file (with a `trainer:` section) whose step count a
flag overrides: the mesh trains exactly that many steps on the tiny model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ENV_SCRIPT = Path(__file__).with_name("test_atropos_env.py")
OFFLINE = {
    "WANDB_MODE": "disabled",
    "WANDB_SILENT": "true",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "DO_NOT_TRACK": "1",
    "NO_PROXY": "127.0.0.1,localhost",
    "OMP_NUM_THREADS": "1",
}


@pytest.mark.timeout(420)
def test_clotho_up_trains_on_a_real_atropos_env_from_a_run_file(tiny_model_dir, tmp_path):
    run_file = tmp_path / "run.yaml"
    run_file.write_text(
        "steps: 50\n"
        "batch_size: 4\n"
        "cores: 2\n"
        f"model_path: {tiny_model_dir}\n"
        "env:\n"
        f"  - '{{python}} {ENV_SCRIPT} serve --openai.model_name tiny --openai.tokenizer_name {{model_path}}'\n"
        "trainer:\n"
        "  lr: 0.002\n"
        "  checkpoint_keep: 1\n"
    )
    data_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "services.cli", "up", "--config", str(run_file), "--steps", "2"]
    argv += ["--data-dir", str(data_dir), "--ready-timeout", "240"]
    proc = subprocess.run(argv, env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=400, check=False)
    logs = "\n".join(
        f"---- {p.name} ----\n{p.read_text(errors='replace')[-3000:]}"
        for p in sorted((data_dir / "logs").glob("*.log"))
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + logs
    summary = json.loads((data_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["policy_version"] == 2 and summary["failed"] == []
    assert "env-test_atropos_env" in proc.stdout
    # The environment was told where the gateway is and what tokenizer to use.
    env_log = (data_dir / "logs" / "env-test_atropos_env.log").read_text(errors="replace")
    assert "Traceback" not in env_log, env_log[-3000:]


def test_a_child_that_dies_is_named_with_its_log_and_the_rest_stop(tiny_model_dir, tmp_path):
    data_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "services.cli", "up", "--model-path", str(tiny_model_dir), "--steps", "5"]
    argv += ["--data-dir", str(data_dir), "--cores", "2", "--quiet"]
    argv += ["--env", "{python} -c \"import sys; print('env says goodbye'); sys.exit(3)\""]
    proc = subprocess.run(argv, env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "env-cmd exited with 3" in proc.stderr and "env says goodbye" in proc.stderr
    summary = json.loads((data_dir / "summary.json").read_text())
    assert summary["failed"] == ["env-cmd"]
