"""`clotho up`: the whole mesh on this machine, training visibly.

Builds the tiny local model if needed, starts inference, gateway, trainer and the demo
environment as separate processes on loopback, prints one line per training step and a
summary, and stops everything on Ctrl-C or after `--steps`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path

from services import launcher


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clotho up", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200, help="trainer steps before stopping (0 = until Ctrl-C)")
    p.add_argument("--data-dir", type=Path, default=Path(".clotho"), help="model, logs and summary go here")
    p.add_argument("--model-path", type=Path, default=None, help="an HF model directory (default: build a tiny one)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per training batch")
    p.add_argument("--group-size", type=int, default=8, help="samples per prompt")
    p.add_argument("--lr", type=float, default=None, help="learning rate (trainer default if unset)")
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
        help="the gateway's inference_token (default: $CLOTHO_GATEWAY_INFERENCE_TOKEN); the demo "
        "environment is given it",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the last checkpoint and the gateway's stored queue in --data-dir "
        "(default: start fresh; --steps then counts the total)",
    )
    return p


class Progress:
    """Prints a row per step and keeps what the summary needs."""

    HEADER = f"{'step':>5} {'reward':>7} {'avg10':>7} {'version':>7} {'sync ms':>8} {'sync MB/s':>9} {'step s':>7}"

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.steps: list[dict] = []
        self.started = time.monotonic()
        self.done = asyncio.Event()
        self.target: int = 0

    def on_event(self, name: str, event: dict) -> None:
        if name != "trainer" or event.get("event") != "step":
            return
        self.steps.append(event)
        if not self.quiet:
            if len(self.steps) == 1:
                print(self.HEADER, flush=True)
            rewards = [s.get("mean_score", 0.0) for s in self.steps[-10:]]
            sync_s = event.get("sync_seconds") or 0.0
            sync_b = event.get("sync_bytes") or 0
            rate = sync_b / sync_s / 1e6 if sync_s > 0 else 0.0
            print(
                f"{event.get('step', 0):>5} {event.get('mean_score', 0.0):>7.3f} {statistics.fmean(rewards):>7.3f}"
                f" {event.get('policy_version', 0):>7} {sync_s * 1e3:>8.1f} {rate:>9.1f} {event.get('step_seconds', 0.0):>7.2f}",
                flush=True,
            )
        if self.target and len(self.steps) >= self.target:
            self.done.set()

    def summary(self) -> dict:
        rewards = [s.get("mean_score", 0.0) for s in self.steps]
        k = max(1, min(10, len(rewards) // 4)) if rewards else 1
        syncs = [s for s in self.steps if s.get("sync_seconds")]
        elapsed = time.monotonic() - self.started
        return {
            "steps": len(self.steps),
            "reward_start": statistics.fmean(rewards[:k]) if rewards else None,
            "reward_end": statistics.fmean(rewards[-k:]) if rewards else None,
            "policy_version": self.steps[-1].get("policy_version") if self.steps else 0,
            "steps_per_minute": len(self.steps) / elapsed * 60 if elapsed > 0 else 0.0,
            "sync_seconds_mean": statistics.fmean(s["sync_seconds"] for s in syncs) if syncs else None,
            "sync_bytes": syncs[-1].get("sync_bytes") if syncs else None,
            "sync_bytes_per_second": (
                statistics.fmean(s["sync_bytes"] / s["sync_seconds"] for s in syncs) if syncs else None
            ),
            "wall_seconds": elapsed,
        }


async def run_up(args: argparse.Namespace) -> dict:
    data_dir: Path = args.data_dir.resolve()
    log_dir = data_dir / "logs"
    model_path = args.model_path.resolve() if args.model_path else data_dir / "model"
    if not (model_path / "config.json").exists():
        from services.demo.tiny_model import build_tiny_model

        print(f"building the tiny demo model in {model_path}", flush=True)
        await asyncio.to_thread(build_tiny_model, model_path)

    if not args.resume:
        # A fresh run: no checkpoint to resume from and no queue left by an earlier run.
        for stale in (data_dir / "checkpoints", data_dir / "gateway"):
            shutil.rmtree(stale, ignore_errors=True)

    progress = Progress(args.quiet)
    progress.target = args.steps
    children: list[launcher.Child] = []
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, interrupted.set)

    # Tokens travel to the children in their environment, not on command lines (ps). The
    # service token, fresh for every run, guards InferenceService and TrainerService.
    traj, inf_token = args.trajectory_token or "", args.inference_token or ""
    service_token = secrets.token_urlsafe(32)
    child_env = {
        "inference": {"CLOTHO_INFERENCE_SERVICE_TOKEN": service_token},
        "gateway": {
            "CLOTHO_GATEWAY_TRAJECTORY_TOKEN": traj,
            "CLOTHO_GATEWAY_INFERENCE_TOKEN": inf_token,
            "CLOTHO_GATEWAY_SERVICE_TOKEN": service_token,
        },
        "trainer": {"CLOTHO_TRAINER_GATEWAY_TOKEN": traj, "CLOTHO_TRAINER_SERVICE_TOKEN": service_token},
        "env": {"CLOTHO_DEMO_TRAJECTORY_TOKEN": traj, "CLOTHO_DEMO_INFERENCE_TOKEN": inf_token},
    }

    async def start(name: str, module: str, argv: list[str]) -> dict:
        child = await launcher.start(name, module, argv, log_dir, on_event=progress.on_event, env=child_env.get(name))
        children.append(child)
        info = await launcher.wait_ready(child, args.ready_timeout)
        print(f"  {name:<9} ready {json.dumps({k: v for k, v in info.items() if k != 'event'})}", flush=True)
        return info

    try:
        print(f"starting the mesh (logs in {log_dir})", flush=True)
        inf = await start("inference", "services.inference", ["--model-path", str(model_path)])
        inference = f"127.0.0.1:{inf['grpc_port']}"
        gw = await start(
            "gateway",
            "services.gateway",
            [
                "--http-port",
                str(args.http_port),
                "--inference",
                json.dumps([inference]),
                "--tokenizer-path",
                str(model_path),
                "--data-dir",
                str(data_dir / "gateway"),
            ],
        )
        gateway_url = f"http://127.0.0.1:{gw['http_port']}"
        trainer_args = [
            "--model-path",
            str(model_path),
            "--gateway",
            f"127.0.0.1:{gw['grpc_port']}",
            "--inference",
            json.dumps([inference]),
            "--batch-size",
            str(args.batch_size),
            "--num-steps",
            str(args.steps),
            "--checkpoint-dir",
            str(data_dir / "checkpoints"),
        ]
        if args.lr is not None:
            trainer_args += ["--lr", str(args.lr)]
        await start("trainer", "services.trainer", trainer_args)
        await start(
            "env",
            "services.demo.env",
            ["--gateway-url", gateway_url, "--tokenizer-path", str(model_path), "--group-size", str(args.group_size)],
        )
        print(f"training: gateway at {gateway_url}; Ctrl-C stops", flush=True)
        waiters = [asyncio.create_task(progress.done.wait()), asyncio.create_task(interrupted.wait())]
        waiters += [asyncio.create_task(c.proc.wait()) for c in children]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()
        for c in children:
            if c.proc.returncode not in (None, 0):
                print(f"{c.name} exited with {c.proc.returncode}; see {c.log_path}", file=sys.stderr, flush=True)
    finally:
        for child in reversed(children):  # env first, inference last
            await launcher.stop(child)
    summary = progress.summary()
    (data_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({"event": "summary", **summary}), flush=True)
    if summary["steps"]:
        print(
            f"reward {summary['reward_start']:.3f} -> {summary['reward_end']:.3f} over {summary['steps']} steps"
            f" ({summary['steps_per_minute']:.1f} steps/min), policy version {summary['policy_version']}",
            flush=True,
        )
    return summary


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    summary = asyncio.run(run_up(args))
    return 0 if summary["steps"] else 1
