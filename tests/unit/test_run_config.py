"""`clotho up`'s run settings: a run file, flags over it, service sections, env commands."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from services.run_config import cuda_visible, env_command, env_names, flags, parse_args


def test_flags_override_the_run_file_and_sections_merge(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text(
        "steps: 50\nengine: torch\nshards: 2\nmodel_path: /m\n"
        "env: python a.py serve\n"
        "trainer:\n  lr: 1.0e-6\n  kl_coef: 0.1\n"
        "inference:\n  dtype: bfloat16\n"
    )
    args = parse_args(["--config", str(run), "--steps", "3", "--trainer.lr", "2e-6", "--trainer.normalize-std=false"])
    assert args.steps == 3 and args.shards == 2 and args.model_path == Path("/m")
    assert args.env == ["python a.py serve"]
    assert args.sections["trainer"] == {"lr": "2e-6", "kl_coef": 0.1, "normalize_std": "false"}
    assert args.sections["inference"] == {"dtype": "bfloat16"}
    # --env on the command line replaces the file's list.
    assert parse_args(["--config", str(run), "--env", "x.py serve"]).env == ["x.py serve"]


def test_unknown_settings_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--trainer.no_such_field", "1"])
    assert "unknown trainer setting" in capsys.readouterr().err
    run = tmp_path / "run.yaml"
    run.write_text("stepz: 3\n")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(run)])


def test_flags_render_settings_for_a_service():
    rendered = flags({"lr": 1e-4, "normalize_std": "false", "one_step_off": True, "inference": ["a:1"], "x": None})
    assert rendered == ["--lr", "0.0001", "--no-normalize-std", "--one-step-off", "--inference", '["a:1"]']


def test_env_command_fills_in_the_gateway_and_keeps_what_the_user_set():
    argv = env_command(
        "python gsm8k.py serve --openai.server_type openai --env.group_size 8 --x {openai_url}",
        "http://127.0.0.1:9",
        Path("/m"),
    )
    assert argv[:9] == [
        "python", "gsm8k.py", "serve", "--openai.server_type", "openai", "--env.group_size", "8",
        "--x", "http://127.0.0.1:9/v1",
    ]  # fmt: skip
    rest = argv[9:]
    assert rest == [
        "--env.rollout_server_url", "http://127.0.0.1:9",
        "--openai.base_url", "http://127.0.0.1:9/v1",
        "--env.tokenizer_name", "/m",
        "--openai.api_key", "clotho",
    ]  # fmt: skip
    assert env_command("{python} run.py", "http://h:1", Path("/m")) == [sys.executable, "run.py"]
    assert env_command("a.py serve", "http://h:1", Path("/m"), inference_token="t")[-2:] == ["--openai.api_key", "t"]


def test_env_names_and_gpu_lists():
    assert env_names(["python a/gsm8k.py serve", "python a/gsm8k.py serve", "python -m pkg.env serve"]) == [
        "env-gsm8k",
        "env-gsm8k-2",
        "env-pkg-env",
    ]
    assert cuda_visible(["cuda:1", "cuda:2"]) == "1,2" and cuda_visible(["cpu"]) is None
