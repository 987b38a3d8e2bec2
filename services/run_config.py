"""What `clotho up` runs: its flags, its config file, and the children's arguments.

A run comes from flags, from one YAML file (`--config run.yaml`), or both; a flag given
on the command line overrides the file. The file's top-level keys are the flags' names
with underscores (`steps`, `model_path`, `engine`, `env`, ...), and three sections hold
any setting of one service by its field name:

    model_path: /models/my-model
    engine: torch
    env:
      - python gsm8k_server.py serve --env.group_size 8
    trainer:            # TrainerSettings fields
      lr: 1.0e-6
      kl_coef: 0.01
    inference:          # InferenceSettings fields
      dtype: bfloat16
    gateway:            # GatewaySettings fields
      max_staleness: 2

On the command line the same settings are `--trainer.lr 1e-6`, `--inference.dtype
bfloat16`, `--gateway.max-staleness 2` (dashes or underscores; a bare boolean flag
means true). A section's values win over what `clotho up` derives (a `trainer.lr`
over `--lr`, a `trainer.batch_size` over `--batch-size`).

Environment commands (`--env`, repeated) are the user's own Atropos environments. In
a command, `{gateway_url}` (the gateway's Atropos API), `{openai_url}` (its OpenAI and
SGLang routes, `{gateway_url}/v1`), `{model_path}` and `{python}` (this interpreter)
are filled in; an Atropos `serve` command is also given whichever of
`--env.rollout_server_url`, `--openai.base_url`, `--openai.server_type sglang`,
`--env.tokenizer_name` and `--openai.api_key` (the gateway's inference token, else a
placeholder: Atropos' OpenAI client wants one) it does not set itself. Every environment process also finds CLOTHO_GATEWAY_URL and
CLOTHO_OPENAI_URL in its environment.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from services.demo.task import TASKS

SECTIONS = ("trainer", "inference", "gateway")


def _section_fields(section: str) -> set[str]:
    """The settings fields a section may set (the service's settings class)."""
    if section == "trainer":
        from services.trainer.settings import TrainerSettings

        return set(TrainerSettings.model_fields)
    if section == "inference":
        from services.inference.settings import InferenceSettings

        return set(InferenceSettings.model_fields)
    from services.gateway.settings import GatewaySettings

    return set(GatewaySettings.model_fields)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="clotho up",
        allow_abbrev=False,
        description="The whole mesh on this machine, training visibly: the demo, or your model and Atropos environments.",
        epilog="Any service setting: --trainer.FIELD VALUE, --inference.FIELD VALUE, --gateway.FIELD VALUE.",
    )
    p.add_argument("--config", type=Path, default=None, help="a YAML run file (flags override it)")
    p.add_argument("--steps", type=int, default=200, help="trainer steps before stopping (0 = until Ctrl-C)")
    p.add_argument("--data-dir", type=Path, default=Path(".clotho"), help="model, logs and summary go here")
    p.add_argument("--model-path", type=Path, default=None, help="an HF model directory (default: build a tiny one)")
    p.add_argument(
        "--env",
        action="append",
        default=None,
        metavar="COMMAND",
        help="an Atropos environment command to run (repeat for several); none runs the demo environment",
    )
    p.add_argument("--engine", choices=("torch", "sglang"), default="torch", help="the inference engine")
    p.add_argument("--shards", type=int, default=1, help="inference shards (engines) behind the service")
    p.add_argument("--trainer-device", default="cpu", help="torch device of the trainer, e.g. cuda:0")
    p.add_argument(
        "--inference-devices",
        default="",
        help="devices of the inference shards, comma-separated (e.g. cuda:1,cuda:2); "
        "empty: every shard on cpu (torch) or GPUs 0.. (sglang)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="sequences per training batch")
    p.add_argument("--group-size", type=int, default=8, help="samples per prompt (demo environment)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (trainer default if unset)")
    p.add_argument("--seed", type=int, default=0, help="seed of the trainer and the demo environment")
    p.add_argument("--task", choices=TASKS, default="repeat", help="the demo environment's task")
    p.add_argument("--max-new-tokens", type=int, default=4, help="tokens per completion (demo environment)")
    p.add_argument(
        "--max-batches-offpolicy",
        type=int,
        default=1,
        help="trainer batches the demo environment keeps queued at the gateway or being generated, "
        "at most (Atropos' max_batches_offpolicy); above 1, it starts one ahead and keeps more only while "
        "the trainer waits for data and steps come faster for it (see --fixed-lead); the data's age in "
        "policy versions grows with the lead; 0: on-policy, each batch generated only from the weights of "
        "the step before it (no overlap of generation with training)",
    )
    p.add_argument(
        "--fixed-lead",
        action="store_true",
        help="the demo environment keeps --max-batches-offpolicy batches ahead always (default: one, "
        "more only while the trainer waits for data)",
    )
    p.add_argument(
        "--no-overlap",
        action="store_true",
        help="push each step's weights before the next step trains (default: while it trains)",
    )
    p.add_argument(
        "--cores",
        type=int,
        default=None,
        help="cores to divide among the processes (default: those this process may use); "
        "0 sets no thread budget (every process keeps its libraries' defaults)",
    )
    p.add_argument(
        "--thread-policy",
        choices=("auto", "share", "split"),
        default="auto",
        help="share: the trainer and the inference service may each use every core, the "
        "inference service at a lower priority (the trainer's step is the critical path; "
        "generation fills the cycles it leaves); split: they divide the cores; auto: share "
        "on up to 4 cores, split above",
    )
    p.add_argument("--http-port", type=int, default=0, help="gateway REST port (0 = a free one)")
    p.add_argument("--ready-timeout", type=float, default=180.0, help="seconds each service may take to start")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    p.add_argument(
        "--trajectory-token",
        default=os.environ.get("CLOTHO_GATEWAY_TRAJECTORY_TOKEN") or None,
        help="the gateway's trajectory_token (default: $CLOTHO_GATEWAY_TRAJECTORY_TOKEN); the "
        "trainer and the demo environment are given it",
    )
    p.add_argument(
        "--inference-token",
        default=os.environ.get("CLOTHO_GATEWAY_INFERENCE_TOKEN") or None,
        help="the gateway's inference_token (default: $CLOTHO_GATEWAY_INFERENCE_TOKEN); the environments are given it",
    )
    p.add_argument(
        "--wandb-project",
        default=None,
        help="log the trainer's metrics to this Weights & Biases project under Atropos' names (needs the "
        "wandb extra); environments get it from the gateway's /wandb_info",
    )
    p.add_argument("--wandb-group", default=None, help="the W&B group (default: clotho); implies W&B logging")
    p.add_argument(
        "--trace-ui",
        action="store_true",
        help="start a local trace viewer (Arize Phoenix, the trace-ui extra) and send every service's spans to it",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the last checkpoint and the gateway's stored queue in --data-dir "
        "(default: start fresh; --steps then counts the total)",
    )
    p.set_defaults(sections={s: {} for s in SECTIONS})
    return p


def _load_file(path: Path, parser: argparse.ArgumentParser) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """A run file's top-level flag values and its sections."""
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        parser.error(f"{path}: a run file is a mapping of settings")
    known = {a.dest for a in parser._actions} - {"help", "config", "sections"}
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name in SECTIONS:
            if not isinstance(value, dict):
                parser.error(f"{path}: {name} is a mapping of {name} settings")
            sections[name] = {str(k).replace("-", "_"): v for k, v in value.items()}
        elif name in known:
            if name == "env" and isinstance(value, str):
                value = [value]
            if name in ("model_path", "data_dir") and value is not None:
                value = Path(str(value))
            top[name] = value
        else:
            parser.error(f"{path}: unknown setting {key!r}")
    return top, sections


def _section_flags(rest: list[str], parser: argparse.ArgumentParser) -> dict[str, dict[str, Any]]:
    """`--trainer.lr 1e-4`, `--trainer.lr=1e-4`, `--trainer.normalize-std` (true)."""
    out: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    i = 0
    while i < len(rest):
        arg = rest[i]
        section, _, key = arg[2:].partition(".") if arg.startswith("--") else ("", "", "")
        if section not in SECTIONS or not key:
            parser.error(f"unrecognized argument: {arg}")
        key, eq, value = key.partition("=")
        if not eq:
            if i + 1 < len(rest) and not rest[i + 1].startswith("--"):
                value = rest[i + 1]
                i += 1
            else:
                value = "true"
        out[section][key.replace("-", "_")] = value
        i += 1
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """`clotho up`'s settings: defaults, then the run file, then the flags."""
    parser = _parser()
    pre, _ = parser.parse_known_args(argv)
    sections: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    file_envs = None
    if pre.config is not None:
        top, sections = _load_file(pre.config, parser)
        file_envs = top.pop("env", None)  # --env appends: the file's list is replaced, not extended
        parser.set_defaults(**top)
    args, rest = parser.parse_known_args(argv)
    if args.env is None:
        args.env = file_envs
    for section, values in _section_flags(rest, parser).items():
        sections[section].update(values)
    for section, values in sections.items():
        unknown = sorted(set(values) - _section_fields(section))
        if unknown:
            parser.error(f"unknown {section} setting(s): {', '.join(unknown)}")
    args.sections = sections
    return args


def flags(values: dict[str, Any]) -> list[str]:
    """A service's command-line flags for settings by field name (kebab-case; booleans
    as --x / --no-x; lists, tuples and mappings as JSON)."""
    out: list[str] = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (list, tuple, dict)):
            out += [flag, json.dumps(value)]
        else:
            out += [flag, str(value)]
    return out


def device_list(devices: str) -> list[str]:
    return [d.strip() for d in devices.split(",") if d.strip()]


def cuda_visible(devices: list[str]) -> str | None:
    """CUDA_VISIBLE_DEVICES for SGLang shards on `devices` (cuda:N or N); None when no
    device names a GPU index."""
    ids = [d.split(":", 1)[1] if d.startswith("cuda:") else d for d in devices]
    return ",".join(ids) if ids and all(i.isdigit() for i in ids) else None


def _has_flag(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def env_command(
    template: str,
    gateway_url: str,
    model_path: Path,
    inference_token: str | None = None,
) -> list[str]:
    """The argv of one environment command, with the gateway's URLs filled in."""
    values = {
        "{gateway_url}": gateway_url,
        "{openai_url}": f"{gateway_url}/v1",
        "{model_path}": str(model_path),
        "{python}": sys.executable,
    }
    argv = shlex.split(template)
    argv = [_fill(a, values) for a in argv]
    if "serve" in argv:
        extra = {
            "--env.rollout_server_url": gateway_url,
            "--openai.base_url": f"{gateway_url}/v1",
            "--openai.server_type": "sglang",
            "--env.tokenizer_name": str(model_path),
        }
        # The OpenAI client of an Atropos server refuses to start without a key; the gateway
        # checks it only when it has an inference token.
        extra["--openai.api_key"] = inference_token or "clotho"
        for flag, value in extra.items():
            if not _has_flag(argv, flag):
                argv += [flag, value]
    return argv


def _fill(arg: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        arg = arg.replace(key, value)
    return arg


def env_names(commands: list[str]) -> list[str]:
    """A name per environment command (its script's stem, numbered when repeated)."""
    names: list[str] = []
    for cmd in commands:
        words = shlex.split(cmd)
        script = next((Path(w).stem for w in words if w.endswith(".py")), None)
        if script is None and "-m" in words and words.index("-m") + 1 < len(words):
            script = words[words.index("-m") + 1]
        base = "env-" + (script or "cmd").replace(".", "-")
        name, n = base, 2
        while name in names:
            name, n = f"{base}-{n}", n + 1
        names.append(name)
    return names
