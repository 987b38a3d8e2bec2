"""`clotho up`: the whole mesh on this machine, training visibly.

Builds the tiny local model if needed (or takes the user's `--model-path`), starts
inference, gateway, trainer and the environments (the demo environment, or the user's
own Atropos environment commands, `--env`) as separate processes on loopback, prints
one line per training step and a summary, and stops everything on Ctrl-C or after
`--steps`. A child that dies is named with the tail of its log, and the rest stop.
What to run comes from flags and a run file (services/run_config.py).

Each process gets a `--threads` setting and OMP/MKL/tokenizer thread counts in its
environment (`thread_plan`), so four processes do not each run a torch pool as wide as
the machine: on a few cores the trainer and the inference service share them, the
inference service at a lower priority (`--nice`), so generation fills whatever the
trainer's step leaves; on more cores they divide them (`thread_budget`). OpenMP pools
sleep rather than spin when idle (OMP_WAIT_POLICY=PASSIVE). The summary says where
an average step's time went, from the trainer's own timings. Every service serves
Prometheus metrics (free ports, in the ready lines); the run ends with a plot beside the
summary (run_plot.py); `--wandb-project` logs the trainer to W&B and `--trace-ui` shows
the run's traces in a local viewer (trace_ui.py).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import secrets
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from services import launcher, trace_ui
from services.common.telemetry import setup_tracing, shutdown_tracing
from services.run_config import _parser, cuda_visible, device_list, env_command, env_names, flags, parse_args

__all__ = ["_parser", "run_up", "thread_budget", "thread_env", "thread_plan"]

# Processes that mostly wait on sockets (the gateway, the demo environment) get one
# thread; the trainer and the inference service share the rest.
LIGHT_PROCESSES = ("gateway", "env")


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def thread_budget(cores: int) -> dict[str, int]:
    """Threads per process for `cores` cores. The trainer and the inference service
    compute at the same time (generation of the next batch overlaps a step), so they
    split the cores; the light processes get one thread each, taken out of the split
    only where that leaves both heavy ones several cores."""
    if cores < 1:
        raise ValueError("cores must be at least 1")
    heavy = cores - len(LIGHT_PROCESSES) if cores >= 6 else cores
    trainer = max(1, heavy // 2)
    return {"inference": max(1, heavy - trainer), "trainer": trainer, **dict.fromkeys(LIGHT_PROCESSES, 1)}


# Below this many cores `clotho up` shares them between the trainer and the inference
# service (thread_plan's "auto"): with few cores, a core left to one side idles whenever
# that side waits for the other.
SHARE_BELOW_CORES = 5
# How much lower the inference service's CPU priority is when it shares the cores.
INFERENCE_NICE = 10
# OpenMP pools sleep when they run out of work instead of spinning: where processes
# share cores, a spinning pool would burn the cycles the other needs.
WAIT_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def thread_plan(cores: int, policy: str = "auto") -> tuple[dict[str, int], dict[str, int]]:
    """(threads per process, nice per process) for `cores` cores under `policy`.

    split: `thread_budget`, nobody niced. share: the trainer and the inference service
    may each use every core, the inference service at a lower priority. The trainer's
    step is the critical path (the environments keep batches generated ahead), so it
    takes the cores whenever it computes, and generation runs in what it leaves: while
    it waits for a batch, while its pool idles between operations, while weights go out;
    neither side leaves a core idle while the other has work. auto: share below
    SHARE_BELOW_CORES cores, split above (where each side's share is several cores)."""
    if policy == "auto":
        policy = "share" if cores < SHARE_BELOW_CORES else "split"
    if policy == "split":
        return thread_budget(cores), {}
    if policy != "share":
        raise ValueError(f"unknown thread policy {policy!r}")
    if cores < 1:
        raise ValueError("cores must be at least 1")
    threads = {"inference": cores, "trainer": cores, **dict.fromkeys(LIGHT_PROCESSES, 1)}
    return threads, {"inference": INFERENCE_NICE}


def thread_env(threads: int) -> dict[str, str]:
    """The environment that sizes a child's library thread pools."""
    from services.common.settings import THREAD_ENV_VARS

    return {name: str(threads) for name in THREAD_ENV_VARS}


# Rewards averaged at each end of a run for its summary (and shown as avg10).
SUMMARY_WINDOW = 10


class Progress:
    """Prints a row per step and keeps what the summary needs: running totals and the
    first and last SUMMARY_WINDOW rewards, never every step (a run may be endless)."""

    HEADER = f"{'step':>5} {'reward':>7} {'avg10':>7} {'version':>7} {'sync ms':>8} {'sync MB/s':>9} {'step s':>7}"

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.step_count = 0
        self.first_rewards: list[float] = []
        self.last_rewards: collections.deque[float] = collections.deque(maxlen=SUMMARY_WINDOW)
        self.policy_version = 0
        self.syncs = 0
        self.sync_seconds_total = 0.0
        self.sync_rate_total = 0.0
        self.sync_bytes: int | None = None
        self.started = time.monotonic()
        self.done = asyncio.Event()
        self.target: int = 0
        self.threads: dict[str, int] | None = None
        self.log: TextIO | None = None  # every step line, with its time since the start
        self.training_started: float | None = None  # seconds after the start
        # Sums over the steps whose line carries a cycle time (all but the first).
        self.cycles = 0
        self.cycle_totals = dict.fromkeys(("wait", "train", "update", "cycle"), 0.0)

    def on_event(self, name: str, event: dict) -> None:
        if name != "trainer" or event.get("event") != "step":
            return
        event["elapsed_seconds"] = time.monotonic() - self.started
        if self.log is not None:
            self.log.write(json.dumps(event) + "\n")
            self.log.flush()
        self.step_count += 1
        reward = event.get("mean_score", 0.0)
        if len(self.first_rewards) < SUMMARY_WINDOW:
            self.first_rewards.append(reward)
        self.last_rewards.append(reward)
        self.policy_version = event.get("policy_version", 0)
        if event.get("sync_seconds"):
            self.syncs += 1
            self.sync_seconds_total += event["sync_seconds"]
            self.sync_bytes = event.get("sync_bytes")
            self.sync_rate_total += event["sync_bytes"] / event["sync_seconds"]
        if "cycle_seconds" in event:
            self.cycles += 1
            for key in self.cycle_totals:
                self.cycle_totals[key] += event.get(f"{key}_seconds", 0.0)
        if not self.quiet:
            if self.step_count == 1:
                print(self.HEADER, flush=True)
            rewards = list(self.last_rewards)
            sync_s = event.get("sync_seconds") or 0.0
            sync_b = event.get("sync_bytes") or 0
            rate = sync_b / sync_s / 1e6 if sync_s > 0 else 0.0
            print(
                f"{event.get('step', 0):>5} {event.get('mean_score', 0.0):>7.3f} {statistics.fmean(rewards):>7.3f}"
                f" {event.get('policy_version', 0):>7} {sync_s * 1e3:>8.1f} {rate:>9.1f} {event.get('step_seconds', 0.0):>7.2f}",
                flush=True,
            )
        if self.target and self.step_count >= self.target:
            self.done.set()

    def breakdown(self) -> dict[str, float] | None:
        """Where an average step's time went, in seconds: waiting for the batch, the
        optimizer step, the weight update, and the rest of the cycle between two step
        lines (the first step, which also waits for the mesh to warm up, is left out)."""
        if not self.cycles:
            return None
        mean = {k: total / self.cycles for k, total in self.cycle_totals.items()}
        mean["other"] = max(mean["cycle"] - mean["wait"] - mean["train"] - mean["update"], 0.0)
        return mean

    def summary(self) -> dict:
        n = self.step_count
        k = max(1, min(SUMMARY_WINDOW, n // 4)) if n else 1
        last = list(self.last_rewards)
        elapsed = time.monotonic() - self.started
        return {
            "steps": n,
            "reward_start": statistics.fmean(self.first_rewards[:k]) if n else None,
            "reward_end": statistics.fmean(last[-k:]) if n else None,
            "policy_version": self.policy_version,
            "steps_per_minute": n / elapsed * 60 if elapsed > 0 else 0.0,
            # The rate once training runs (the mesh's start-up left out).
            "training_steps_per_minute": (
                60 * self.cycles / self.cycle_totals["cycle"]
                if self.cycles and self.cycle_totals["cycle"] > 0
                else None
            ),
            "sync_seconds_mean": self.sync_seconds_total / self.syncs if self.syncs else None,
            "sync_bytes": self.sync_bytes if self.syncs else None,
            "sync_bytes_per_second": self.sync_rate_total / self.syncs if self.syncs else None,
            "wall_seconds": elapsed,
            "startup_seconds": self.training_started,
            "step_breakdown_seconds": self.breakdown(),
            "threads": self.threads,
        }


def report_death(child: launcher.Child) -> None:
    """Name a child that died and show the end of its log."""
    tail = launcher.log_tail(child)
    print(
        f"{child.name} exited with {child.proc.returncode}; last lines of {child.log_path}:\n{tail}",
        file=sys.stderr,
        flush=True,
    )


def _died(child: launcher.Child, done: bool) -> bool:
    """Whether a child's exit is a failure: any non-zero status, or an exit before the
    run is done (the trainer alone may finish on its own, after its last step)."""
    rc = child.proc.returncode
    if rc is None:
        return False
    return rc != 0 or (child.name != "trainer" and not done)


def inference_settings(args: argparse.Namespace, model_path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The inference service's settings and the environment its engine needs."""
    devices = device_list(getattr(args, "inference_devices", ""))
    values: dict[str, Any] = {
        "model_path": str(model_path),
        "engine": getattr(args, "engine", "torch"),
        "shards": getattr(args, "shards", 1),
    }
    env: dict[str, str] = {}
    if values["engine"] == "sglang":
        visible = cuda_visible(devices)
        if visible is not None:
            env["CUDA_VISIBLE_DEVICES"] = visible
    elif len(devices) == 1:
        values["device"] = devices[0]
    elif devices:
        values["shard_devices"] = devices
    return values, env


async def run_up(args: argparse.Namespace) -> dict:
    data_dir: Path = args.data_dir.resolve()
    log_dir = data_dir / "logs"
    model_path = args.model_path.resolve() if args.model_path else data_dir / "model"
    sections: dict[str, dict[str, Any]] = getattr(args, "sections", None) or {}
    env_commands: list[str] = list(getattr(args, "env", None) or [])
    if not (model_path / "config.json").exists():
        if args.model_path:
            raise SystemExit(f"clotho up: {model_path} has no config.json (a Hugging Face model directory)")
        from services.demo.tiny_model import build_tiny_model

        print(f"building the tiny demo model in {model_path}", flush=True)
        await asyncio.to_thread(build_tiny_model, model_path)

    if not args.resume:
        # A fresh run: no checkpoint to resume from and no queue left by an earlier run.
        for stale in (data_dir / "checkpoints", data_dir / "gateway"):
            shutil.rmtree(stale, ignore_errors=True)

    progress = Progress(args.quiet)
    progress.target = args.steps
    data_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before anything starts
    progress.log = open(data_dir / "steps.jsonl", "w")  # noqa: SIM115, ASYNC230 - closed after the run
    children: list[launcher.Child] = []
    failed: list[str] = []
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, interrupted.set)

    traces: trace_ui.TraceUI | None = None
    if args.trace_ui:
        traces = await trace_ui.start(data_dir / "trace-ui", launcher.free_port(), launcher.free_port(), log_dir)
        print(f"traces: {traces.ui_url} (OTLP/gRPC at {traces.otlp_grpc_endpoint})", flush=True)
    child_env = child_envs(args, traces.otlp_grpc_endpoint if traces is not None else None)
    cores = available_cores() if args.cores is None else args.cores
    threads, nice = thread_plan(cores, getattr(args, "thread_policy", "auto")) if cores > 0 else (None, {})
    progress.threads = threads
    if threads is not None:
        for name, n in threads.items():
            child_env[name].update(thread_env(n), **WAIT_ENV)

    def with_threads(name: str, values: dict[str, Any]) -> dict[str, Any]:
        """`values` with the process's thread budget and priority, then the run's section
        for it."""
        if threads is not None:
            values["threads"] = threads[name]
        if nice.get(name):
            values["nice"] = nice[name]
        return {**values, **sections.get(name, {})}

    async def start(name: str, module: str, argv: list[str]) -> dict:
        child = await launcher.start(name, module, argv, log_dir, on_event=progress.on_event, env=child_env.get(name))
        children.append(child)
        try:
            info = await launcher.wait_ready(child, args.ready_timeout)
        except RuntimeError:
            await asyncio.sleep(0.2)  # let the log receive the child's last words
            failed.append(name)
            report_death(child)
            raise
        print(f"  {name:<9} ready {json.dumps({k: v for k, v in info.items() if k != 'event'})}", flush=True)
        return info

    try:
        print(f"starting the mesh (logs in {log_dir})", flush=True)
        if threads is not None:
            niced = f", nice {json.dumps(nice)}" if nice else ""
            print(f"threads per process ({cores} cores): {json.dumps(threads)}{niced}", flush=True)
        inf_values, inf_env = inference_settings(args, model_path)
        child_env["inference"].update(inf_env)
        inf = await start(
            "inference",
            "services.inference",
            flags(with_threads("inference", {**inf_values, "metrics_port": launcher.free_port()})),
        )
        inference = f"127.0.0.1:{inf['grpc_port']}"
        gateway_values = {
            "http_port": args.http_port,
            "inference": [inference],
            "tokenizer_path": str(model_path),
            "data_dir": str(data_dir / "gateway"),
        }
        gw = await start("gateway", "services.gateway", flags(with_threads("gateway", gateway_values)))
        gateway_url = f"http://127.0.0.1:{gw['http_port']}"
        trainer_values: dict[str, Any] = {
            "model_path": str(model_path),
            "gateway": f"127.0.0.1:{gw['grpc_port']}",
            "inference": [inference],
            "batch_size": args.batch_size,
            "num_steps": args.steps,
            "checkpoint_dir": str(data_dir / "checkpoints"),
            "seed": args.seed,
            "device": getattr(args, "trainer_device", "cpu"),
            # One step off (the trainer's default): the next batch is generated while a step
            # trains, and the step's weights are pushed while the next one trains. The next
            # batch is asked for once the optimizer step is done: the environment's batch
            # ahead is then refilled with the newest weights (data ~1 version old, not 2).
            "overlap_weight_update": not args.no_overlap,
            "next_batch": "after_step",
            "lr": args.lr,
            "metrics_port": launcher.free_port(),
            **wandb_settings(args),
        }
        tr = await start("trainer", "services.trainer", flags(with_threads("trainer", trainer_values)))
        print(
            f"metrics: {gateway_url}/metrics http://127.0.0.1:{inf['metrics_port']}/metrics"
            f" http://127.0.0.1:{tr['metrics_port']}/metrics",
            flush=True,
        )
        if env_commands:
            env_vars = {
                **child_env["env"],
                "CLOTHO_GATEWAY_URL": gateway_url,
                "CLOTHO_OPENAI_URL": f"{gateway_url}/v1",
            }
            for name, template in zip(env_names(env_commands), env_commands):
                argv = env_command(template, gateway_url, model_path, args.inference_token)
                children.append(await launcher.start_command(name, argv, log_dir, env=env_vars))
                print(f"  {name:<9} started: {template}", flush=True)
        else:
            demo = {
                "gateway_url": gateway_url,
                "tokenizer_path": str(model_path),
                "group_size": args.group_size,
                "task": args.task,
                "max_new_tokens": args.max_new_tokens,
                "max_batches_offpolicy": getattr(args, "max_batches_offpolicy", 1),
                "adaptive_lead": not getattr(args, "fixed_lead", False),
                "seed": args.seed,
            }
            await start("env", "services.demo.env", flags(demo))
        progress.training_started = time.monotonic() - progress.started
        print(f"training: gateway at {gateway_url}; Ctrl-C stops", flush=True)
        waiters: list[asyncio.Task[Any]] = [
            asyncio.create_task(progress.done.wait()),
            asyncio.create_task(interrupted.wait()),
        ]
        waiters += [asyncio.create_task(c.proc.wait()) for c in children]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()
        await asyncio.sleep(0.2)  # a trainer's last step line, or a dying child's last log lines
        for c in children:
            if _died(c, progress.done.is_set() or interrupted.is_set()):
                failed.append(c.name)
                report_death(c)
    except RuntimeError as err:
        print(f"clotho up: {err}", file=sys.stderr, flush=True)
    finally:
        for child in reversed(children):  # environments first, inference last
            await launcher.stop(child)
        if traces is not None:
            await traces.stop()
    progress.log.close()
    summary = progress.summary()
    summary["failed"] = failed
    (data_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({"event": "summary", **summary}), flush=True)
    if progress.step_count:
        title = (
            f"clotho up: {summary['steps']} steps, reward {summary['reward_start']:.3f} -> {summary['reward_end']:.3f}"
        )
        # The step lines come back from steps.jsonl: the run keeps none of them in memory.
        steps = [json.loads(line) for line in (data_dir / "steps.jsonl").read_text().splitlines() if line.strip()]
        plot = write_run_plot(steps, data_dir / "summary.png", title)
        if plot is not None:
            print(f"plot: {plot}", flush=True)
        if traces is not None:
            print(f"traces were at {traces.ui_url}; the spans stay in {data_dir / 'trace-ui'}", flush=True)
    if summary["steps"]:
        print(
            f"reward {summary['reward_start']:.3f} -> {summary['reward_end']:.3f} over {summary['steps']} steps"
            f" ({summary['steps_per_minute']:.1f} steps/min), policy version {summary['policy_version']}",
            flush=True,
        )
    breakdown = summary["step_breakdown_seconds"]
    if breakdown:
        print(format_breakdown(breakdown), flush=True)
    return summary


def format_breakdown(b: dict[str, float]) -> str:
    """One line: an average step's time and its parts (ms and share)."""
    cycle = b["cycle"] or 1e-12
    parts = " / ".join(
        f"{label} {b[key] * 1e3:.1f} ms ({b[key] / cycle:.0%})"
        for key, label in (
            ("wait", "wait for batch"),
            ("train", "train"),
            ("update", "weight update"),
            ("other", "other"),
        )
    )
    return f"average step {b['cycle'] * 1e3:.1f} ms: {parts}"


def child_envs(args: argparse.Namespace, otlp_endpoint: str | None) -> dict[str, dict[str, str]]:
    """Each child's extra environment: its tokens (in the environment, not on command
    lines, where ps shows them) and, with a trace receiver, the OTEL_* variables."""
    # The service token, fresh for every run, guards InferenceService and TrainerService.
    traj, inf_token = args.trajectory_token or "", args.inference_token or ""
    service_token = secrets.token_urlsafe(32)
    envs = {
        "inference": {"CLOTHO_INFERENCE_SERVICE_TOKEN": service_token},
        "gateway": {
            "CLOTHO_GATEWAY_TRAJECTORY_TOKEN": traj,
            "CLOTHO_GATEWAY_INFERENCE_TOKEN": inf_token,
            "CLOTHO_GATEWAY_SERVICE_TOKEN": service_token,
        },
        "trainer": {"CLOTHO_TRAINER_GATEWAY_TOKEN": traj, "CLOTHO_TRAINER_SERVICE_TOKEN": service_token},
        "env": {"CLOTHO_DEMO_TRAJECTORY_TOKEN": traj, "CLOTHO_DEMO_INFERENCE_TOKEN": inf_token},
    }
    if otlp_endpoint is not None:
        otel = trace_ui.otel_env(otlp_endpoint)
        for name, env in envs.items():
            env.update(otel, OTEL_SERVICE_NAME=f"clotho-{name}")
    return envs


def wandb_args(args: argparse.Namespace) -> list[str]:
    """The trainer's W&B flags: logging on when a project or a group was given."""
    return flags(wandb_settings(args))


def wandb_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The trainer's W&B settings: logging on when a project or a group was given."""
    if args.wandb_project is None and args.wandb_group is None:
        return {}
    out: dict[str, Any] = {"wandb": True}
    if args.wandb_project is not None:
        out["wandb_project"] = args.wandb_project
    if args.wandb_group is not None:
        out["wandb_group"] = args.wandb_group
    return out


def write_run_plot(steps: list[dict], path: Path, title: str = "clotho up") -> Path | None:
    """The plot beside the summary; a failure to draw is reported, never fatal."""
    from services.run_plot import write_plot

    try:
        return write_plot(steps, path, title)
    except Exception as exc:  # noqa: BLE001 - the run's results are already written
        print(f"could not write the plot {path}: {exc!r}", file=sys.stderr, flush=True)
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.trace_ui and not trace_ui.available():
        print(f"clotho up: {trace_ui.INSTALL_HINT}", file=sys.stderr, flush=True)
        return 2
    # The children read the same OTEL_* variables; `up` itself traces the mesh's start.
    tracer = setup_tracing("clotho-up")
    try:
        with tracer.start_as_current_span("clotho.up") as span:
            summary = asyncio.run(run_up(args))
            span.set_attribute("clotho.steps", summary["steps"])
    finally:
        shutdown_tracing()
    return 0 if summary["steps"] and not summary.get("failed") else 1
