"""Clotho against TRL's GRPOTrainer on one machine: same task, model, geometry and seed.

    python bench/vs_trl.py            # both sizes, full length
    python bench/vs_trl.py --quick    # a short run of each
    python bench/vs_trl.py --sizes tiny --before   # also Clotho with no thread budget
    python bench/vs_trl.py --sizes tiny --seeds 5  # every run over seeds 0..4, medians

Needs the bench extra (`pip install -e .[bench]`: trl). Two sizes:

- tiny: the demo (repeat a digit), the model `clotho build-model` writes, 4 new tokens,
  LR 1e-3.
- heavy: a generation-heavy workload, a ~25M-parameter model (hidden 512, 6 layers, 8
  heads), 32-token completions, the reverse task (the whole completion is judged), LR
  1e-4.

Both runs use 32 sequences per step (4 prompts x 8 samples), temperature 1, AdamW, a
constant LR, beta 0 (no KL), gradient clipping at 1.0 and the same seed. TRL runs in one
process (torch with every core); Clotho runs as `clotho up` does (four processes, the
cores divided among them). For each run it prints steps/min, the wall time until the
mean score (a 10-step moving average) first reaches each threshold, and for Clotho the
average step's critical path from the trainer's own timings (waiting for the batch,
training, weight update, the rest). Wall times count from the start of training: TRL's
`train()` call, and Clotho's mesh ready (its start-up, printed apart, excluded).

`--trl-threads 0,1` runs TRL with its default thread pool and with one thread (on a
machine shared with other work, a pool as wide as the machine stalls).
`--thread-policies share,split` runs Clotho once per thread policy (`clotho up
--thread-policy`: the trainer and inference sharing the cores, or dividing them).
`--before` adds a Clotho run with `--cores 0` (no thread budget: every process keeps
torch's default pool), the configuration before the budget existed; `--baseline-src DIR`
adds one from another checkout of the repository (e.g. `git archive` of an older commit),
run with its own `clotho up`.

`--seeds N` (seeds --seed .. --seed+N-1) or `--seeds 3,7,11` repeats every run once per
seed (the seed of TRL's run and of `clotho up`: its prompts, sampling and trainer), the
runs of one seed one after another, so load drifts over all of them alike. It prints each
seed's steps/min and (step, seconds) to each threshold, then per run the medians over the
seeds (a threshold not reached counts as never), how many seeds reached it, in how many
seeds the run's wall time to it was no worse than TRL's with the same seed, and the mean
smoothed score per step over the seeds with its range. TRL with a fixed seed is
deterministic; Clotho is not (asynchronous timing decides which policy version generates
which group), so one seed is not evidence of a difference in learning per step.

Internal: `vs_trl.py _trl ...` is the TRL run itself, in a child process.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {
    "tiny": {
        "model": {"hidden_size": 128, "num_layers": 2, "num_heads": 4},
        "task": "repeat",
        "max_new_tokens": 4,
        "lr": 1e-3,
        "steps": 250,
        "quick_steps": 80,
        "thresholds": (0.3, 0.45, 0.6),
    },
    "heavy": {
        "model": {"hidden_size": 512, "num_layers": 6, "num_heads": 8},
        "task": "reverse",
        "max_new_tokens": 32,
        "lr": 1e-4,
        "steps": 120,
        "quick_steps": 20,
        "thresholds": (0.15, 0.2, 0.25),
    },
}
PROMPTS_PER_STEP = 4
GROUP_SIZE = 8
SMOOTH = 10


# -- the TRL run (a child process) ------------------------------------------------------


def trl_run(args: argparse.Namespace) -> None:
    import random

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from services.demo.task import Task

    task = Task(args.task, args.max_new_tokens)
    rng = random.Random(args.seed)
    prompts = [task.prompt(rng) for _ in range(args.steps * PROMPTS_PER_STEP + PROMPTS_PER_STEP)]
    data = Dataset.from_dict(
        {
            "prompt": [p.text for p in prompts],
            "digit": [p.digit for p in prompts],
            "target": [p.target for p in prompts],
        }
    )

    def reward(prompts, completions, digit, target, **_):
        from services.demo.task import Prompt

        return [
            task.score(c, Prompt(text=p, digit=d, target=t)) for p, c, d, t in zip(prompts, completions, digit, target)
        ]

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    config = GRPOConfig(
        output_dir=str(args.out_dir),
        per_device_train_batch_size=PROMPTS_PER_STEP * GROUP_SIZE,
        num_generations=GROUP_SIZE,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",
        adam_beta1=0.9,
        adam_beta2=0.999,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=0.0,
        max_steps=args.steps,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=args.seed,
        shuffle_dataset=False,
        disable_tqdm=True,
    )
    steps: list[dict] = []

    class Timing(TrainerCallback):
        started = 0.0

        def on_train_begin(self, *a, **k):
            Timing.started = time.monotonic()

        def on_log(self, _args, state, _control, logs=None, **k):
            if logs and "reward" in logs:
                steps.append(
                    {
                        "step": state.global_step,
                        "mean_score": float(logs["reward"]),
                        "elapsed_seconds": time.monotonic() - Timing.started,
                    }
                )

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=config,
        train_dataset=data,
        processing_class=tok,
        callbacks=[Timing()],
    )
    trainer.train()
    print(json.dumps({"steps": steps, "threads": torch.get_num_threads()}))


# -- the driver -------------------------------------------------------------------------


def smoothed(scores: list[float]) -> list[float]:
    return [statistics.fmean(scores[max(0, i + 1 - SMOOTH) : i + 1]) for i in range(len(scores))]


def crossings(
    steps: list[dict], thresholds: tuple[float, ...], offset: float = 0.0
) -> dict[float, tuple[int, float] | None]:
    """Per threshold: (step, seconds) when the smoothed mean score first reaches it."""
    smooth = smoothed([s["mean_score"] for s in steps])
    out: dict[float, tuple[int, float] | None] = {}
    for t in thresholds:
        hit = next((i for i, v in enumerate(smooth) if v >= t), None)
        out[t] = None if hit is None else (hit + 1, steps[hit]["elapsed_seconds"] - offset)
    return out


def build_model(path: Path, model: dict) -> Path:
    from services.demo.tiny_model import build_tiny_model

    if not (path / "config.json").exists():
        build_tiny_model(path, model["hidden_size"], model["num_layers"], model["num_heads"])
    return path


def run_trl(size: dict, model: Path, steps: int, seed: int, work: Path, threads: int = 0) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "_trl",
        "--model",
        str(model),
        "--task",
        size["task"],
        "--max-new-tokens",
        str(size["max_new_tokens"]),
        "--lr",
        str(size["lr"]),
        "--steps",
        str(steps),
        "--seed",
        str(seed),
        "--out-dir",
        str(work / "trl"),
    ]
    started = time.monotonic()
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"the TRL run failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.monotonic() - started
    return result


def run_clotho(size: dict, model: Path, steps: int, seed: int, work: Path, extra: list[str], src: Path = ROOT) -> dict:
    """`clotho up` (from `src`), its step rows timed as they arrive on its stdout, from
    the moment it says the mesh is ready ("training: ...")."""
    data_dir = work / "clotho"
    cmd = [
        sys.executable,
        "-m",
        "services.cli",
        "up",
        "--steps",
        str(steps),
        "--data-dir",
        str(data_dir),
        "--model-path",
        str(model),
        "--lr",
        str(size["lr"]),
        "--batch-size",
        str(PROMPTS_PER_STEP * GROUP_SIZE),
        "--group-size",
        str(GROUP_SIZE),
    ]
    if src == ROOT or _has_flag(src, "--task"):
        cmd += ["--seed", str(seed), "--task", size["task"], "--max-new-tokens", str(size["max_new_tokens"])]
    elif size["task"] != "repeat" or size["max_new_tokens"] != 4:
        raise ValueError("an older checkout runs only the tiny size")
    env = {**os.environ, "PYTHONPATH": f"{src}:{src / 'clients' / 'python'}"}
    started = time.monotonic()
    training: float | None = None
    rows: list[dict] = []
    summary: dict | None = None
    proc = subprocess.Popen([*cmd, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=src, env=env)
    assert proc.stdout is not None
    for line in proc.stdout:
        now = time.monotonic()
        if line.startswith("training:"):
            training = now
        elif line.startswith('{"event": "summary"'):
            summary = json.loads(line)
        else:
            parts = line.split()
            if training is not None and len(parts) >= 7 and parts[0].isdigit():
                rows.append({"step": int(parts[0]), "mean_score": float(parts[1]), "elapsed_seconds": now - training})
    proc.wait()
    if proc.returncode != 0 or summary is None:
        raise RuntimeError(f"clotho up failed ({proc.returncode}):\n{proc.stderr.read()[-3000:]}")
    lines = data_dir / "steps.jsonl"
    events = [json.loads(x) for x in lines.read_text().splitlines() if x.strip()] if lines.exists() else []
    return {"summary": summary, "steps": rows, "startup_seconds": (training or now) - started, "events": events}


def _has_flag(src: Path, flag: str) -> bool:
    """Whether another checkout's `clotho up` takes `flag` (older ones take no --seed/--task)."""
    return any(f'"{flag}"' in path.read_text() for path in (src / "services").glob("*.py"))


def rate(steps: list[dict], offset: float = 0.0) -> float | None:
    if not steps:
        return None
    last = steps[-1]["elapsed_seconds"] - offset
    return len(steps) / last * 60 if last > 0 else None


def report(name: str, size: dict, results: dict[str, dict]) -> None:
    thresholds = size["thresholds"]
    print(
        f"\n## {name}: task {size['task']}, {size['max_new_tokens']} new tokens, model {size['model']}, lr {size['lr']}"
    )
    head = (
        f"| run | steps | steps/min | mean score (first {SMOOTH} -> last {SMOOTH}) | "
        + " | ".join(f"to {t} (step, s)" for t in thresholds)
        + " |"
    )
    print(head)
    print("|" + " --- |" * (head.count("|") - 1))
    for run, r in results.items():
        steps = r["steps"]
        offset = 0.0
        scores = [s["mean_score"] for s in steps]
        hits = crossings(steps, thresholds, offset) if steps else dict.fromkeys(thresholds)
        spm = rate(steps, offset) if steps else r.get("steps_per_minute")
        cells = [f"{h[0]}, {h[1]:.1f}" if h else "not reached" for h in hits.values()]
        score = (
            f"{statistics.fmean(scores[:SMOOTH]):.3f} -> {statistics.fmean(scores[-SMOOTH:]):.3f}"
            if scores
            else f"{r.get('reward_start', 0):.3f} -> {r.get('reward_end', 0):.3f}"
        )
        print(f"| {run} | {len(steps) or r.get('n', 0)} | {spm:.1f} | {score} | " + " | ".join(cells) + " |")
    # The curve per step: the smoothed mean score at every tenth step, and for Clotho how
    # old its data was (policy versions) and how much of it PPO clipped.
    marks = [
        m for m in (10, 20, 30, 40, 60, 80, 120, 160, 200, 250) if m <= max(len(r["steps"]) for r in results.values())
    ]
    head = "| run | " + " | ".join(f"step {m}" for m in marks) + " | staleness mean | clip fraction (steps 1-10, all) |"
    print()
    print(head)
    print("|" + " --- |" * (head.count("|") - 1))
    for run, r in results.items():
        smooth = smoothed([s["mean_score"] for s in r["steps"]])
        cells = [f"{smooth[m - 1]:.3f}" if m <= len(smooth) else "" for m in marks]
        events = r.get("events") or []
        stale = clip = ""
        if events:
            stale = f"{statistics.fmean(e.get('staleness_mean', 0.0) for e in events):.2f}"
            clips = [e.get("clip_fraction", 0.0) for e in events]
            clip = f"{statistics.fmean(clips[:10]):.3f}, {statistics.fmean(clips):.3f}"
        print(f"| {run} | " + " | ".join(cells) + f" | {stale} | {clip} |")
    for run, r in results.items():
        b = r.get("breakdown")
        if b:
            from services.up import format_breakdown

            print(f"- {run}: {format_breakdown(b)}; start-up {r.get('startup', 0.0):.1f} s; threads {r.get('threads')}")


def parse_seeds(seeds: str | None, seed: int) -> list[int]:
    """`--seeds`: None -> [seed]; "N" -> seed .. seed+N-1; "a,b,c" -> those."""
    if seeds is None:
        return [seed]
    if "," in seeds:
        return [int(x) for x in seeds.split(",") if x.strip()]
    n = int(seeds)
    if n <= 0:
        raise ValueError("--seeds N needs N >= 1")
    return [seed + i for i in range(n)]


def _median(values: list[float]) -> float:
    """The median, a threshold never reached counting as infinity."""
    return statistics.median(values) if values else float("inf")


def _cell(v: float, fmt: str) -> str:
    return "never" if v == float("inf") else format(v, fmt)


def report_seeds(name: str, size: dict, per_seed: dict[int, dict[str, dict]]) -> None:
    """Several seeds: each seed's figures, then per run the medians over the seeds, and
    how often its wall time to each threshold was no worse than TRL's same seed."""
    thresholds = size["thresholds"]
    seeds = list(per_seed)
    labels = list(dict.fromkeys(label for results in per_seed.values() for label in results))
    trl = next((label for label in labels if label.startswith("TRL")), None)
    print(
        f"\n## {name}: task {size['task']}, {size['max_new_tokens']} new tokens, model {size['model']}, "
        f"lr {size['lr']}; seeds {', '.join(map(str, seeds))}"
    )
    head = (
        "| run | seed | steps | steps/min | "
        + " | ".join(f"to {t} (step, s)" for t in thresholds)
        + " | staleness mean |"
    )
    print(head)
    print("|" + " --- |" * (head.count("|") - 1))
    # (label) -> per threshold: steps and seconds per seed; steps/min per seed
    hit_steps: dict[str, dict[float, list[float]]] = {k: {t: [] for t in thresholds} for k in labels}
    hit_secs: dict[str, dict[float, list[float]]] = {k: {t: [] for t in thresholds} for k in labels}
    wins: dict[str, dict[float, int]] = {k: dict.fromkeys(thresholds, 0) for k in labels}
    rates: dict[str, list[float]] = {k: [] for k in labels}
    curves: dict[str, list[list[float]]] = {k: [] for k in labels}
    for seed, results in per_seed.items():
        trl_hits = crossings(results[trl]["steps"], thresholds) if trl in results else None
        for label, r in results.items():
            steps = r["steps"]
            hits = crossings(steps, thresholds) if steps else dict.fromkeys(thresholds)
            spm = (rate(steps) if steps else r.get("steps_per_minute")) or 0.0
            rates[label].append(spm)
            curves[label].append(smoothed([s["mean_score"] for s in steps]))
            for t, h in hits.items():
                hit_steps[label][t].append(float(h[0]) if h else float("inf"))
                hit_secs[label][t].append(h[1] if h else float("inf"))
                if trl_hits is not None:
                    theirs = trl_hits[t]
                    mine = h[1] if h else float("inf")
                    if theirs is None or mine <= theirs[1]:
                        wins[label][t] += 1
            events = r.get("events") or []
            stale = f"{statistics.fmean(e.get('staleness_mean', 0.0) for e in events):.2f}" if events else ""
            cells = [f"{h[0]}, {h[1]:.1f}" if h else "not reached" for h in hits.values()]
            print(f"| {label} | {seed} | {len(steps)} | {spm:.1f} | " + " | ".join(cells) + f" | {stale} |")
    print()
    head = (
        f"| run (median of {len(seeds)} seeds) | steps/min | "
        + " | ".join(f"to {t}: steps | to {t}: s" for t in thresholds)
        + " | reached | wall <= TRL's (same seed) |"
    )
    print(head)
    print("|" + " --- |" * (head.count("|") - 1))
    for label in labels:
        cells = [
            f"{_cell(_median(hit_steps[label][t]), '.0f')} | {_cell(_median(hit_secs[label][t]), '.1f')}"
            for t in thresholds
        ]
        reached = " / ".join(f"{sum(v != float('inf') for v in hit_steps[label][t])}" for t in thresholds)
        won = "" if label == trl or trl is None else " / ".join(f"{wins[label][t]}" for t in thresholds)
        print(f"| {label} | {_median(rates[label]):.1f} | " + " | ".join(cells) + f" | {reached} | {won} |")
    # The curve per step over the seeds: mean of the smoothed score (min-max).
    longest = max(len(c) for cs in curves.values() for c in cs)
    marks = [m for m in (10, 20, 40, 60, 80, 100, 120, 140, 160, 200, 250) if m <= longest]
    head = "| run: smoothed score, mean over seeds (min-max) | " + " | ".join(f"step {m}" for m in marks) + " |"
    print()
    print(head)
    print("|" + " --- |" * (head.count("|") - 1))
    for label in labels:
        cells = []
        for m in marks:
            vals = [c[m - 1] for c in curves[label] if len(c) >= m]
            cells.append(f"{statistics.fmean(vals):.3f} ({min(vals):.2f}-{max(vals):.2f})" if vals else "")
        print(f"| {label} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short runs (a smoke test of the bench)")
    p.add_argument("--sizes", default="tiny,heavy", help="comma-separated: tiny, heavy")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default per size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--seeds",
        default=None,
        help="repeat every run per seed: N (seeds --seed .. --seed+N-1) or a comma-separated list; "
        "prints each seed's figures and the medians",
    )
    p.add_argument("--work-dir", type=Path, default=Path(".clotho/bench-vs-trl"))
    p.add_argument(
        "--clotho-variant",
        action="append",
        default=[],
        help="extra `clotho up` arguments for one more Clotho run (repeatable), e.g. '--thread-policy share --inference.nice 0'",
    )
    p.add_argument("--before", action="store_true", help="also run Clotho with no thread budget (--cores 0)")
    p.add_argument("--baseline-src", type=Path, default=None, help="also run `clotho up` from this checkout")
    p.add_argument("--skip-trl", action="store_true")
    p.add_argument(
        "--save", type=Path, default=None, help="also write each size's runs (every step) as JSON: PATH-<size>.json"
    )
    p.add_argument(
        "--trl-from",
        type=Path,
        default=None,
        help="with --skip-trl: show TRL's runs from a --save file of an earlier run (its curve per step is deterministic per seed)",
    )
    p.add_argument(
        "--thread-policies",
        default="auto",
        help="comma-separated `clotho up --thread-policy` values, one Clotho run each (e.g. share,split)",
    )
    p.add_argument(
        "--trl-threads",
        default="0",
        help="comma-separated torch thread counts for TRL runs; 0: its default (every core)",
    )
    args = p.parse_args(argv)
    seeds = parse_seeds(args.seeds, args.seed)
    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    for name in args.sizes.split(","):
        size = SIZES[name]
        steps = args.steps or (size["quick_steps"] if args.quick else size["steps"])
        work = args.work_dir.resolve() / name
        model = build_model(work / "model", size["model"])
        saved: dict = {}
        if args.trl_from is not None:
            saved = json.loads(
                args.trl_from.with_name(f"{args.trl_from.stem}-{name}{args.trl_from.suffix}").read_text()
            )
        per_seed: dict[int, dict[str, dict]] = {}
        for seed in seeds:
            results = per_seed.setdefault(seed, {})
            if saved:
                # A multi-seed file keeps each seed's runs; a one-seed file its own seed's.
                runs_of = saved.get("seeds", {}).get(str(seed)) if "seeds" in saved else saved
                results.update({k: v for k, v in (runs_of or {}).items() if k.startswith("TRL")})
            seed_work = work if len(seeds) == 1 else work / f"seed{seed}"
            for threads in [] if args.skip_trl else [int(x) for x in args.trl_threads.split(",")]:
                r = run_trl(size, model, steps, seed, seed_work, threads)
                label = "TRL GRPOTrainer" + (f" (OMP_NUM_THREADS={threads})" if threads else "")
                results[label] = {"steps": r["steps"], "threads": r["threads"]}
                _progress(name, seed, label, r["steps"], size["thresholds"], len(seeds))
            runs = [
                ("clotho up" + (f" --thread-policy {tp}" if tp != "auto" else ""), ["--thread-policy", tp], ROOT)
                for tp in args.thread_policies.split(",")
                if tp  # --thread-policies '': only the --clotho-variant runs
            ]
            for variant in args.clotho_variant:
                runs.append((f"clotho up {variant}", shlex.split(variant), ROOT))
            if args.before:
                runs.append(("clotho up --cores 0 (no thread budget)", ["--cores", "0"], ROOT))
            if args.baseline_src:
                runs.append((f"clotho up ({args.baseline_src.name})", [], args.baseline_src.resolve()))
            for label, extra, src in runs:
                r = run_clotho(size, model, steps, seed, seed_work / f"run{len(results)}", extra, src)
                s = r["summary"]
                entry = {
                    "steps": r["steps"],
                    "startup": r["startup_seconds"],
                    "breakdown": s.get("step_breakdown_seconds"),
                    "threads": s.get("threads"),
                    "steps_per_minute": s.get("steps_per_minute"),
                    "reward_start": s.get("reward_start"),
                    "reward_end": s.get("reward_end"),
                    "n": s.get("steps"),
                    "events": r["events"],
                }
                results[label] = entry
                _progress(name, seed, label, r["steps"], size["thresholds"], len(seeds))
        if len(seeds) == 1:
            report(name, size, per_seed[seeds[0]])
        else:
            report_seeds(name, size, per_seed)
        print(flush=True)
        if args.save:
            args.save.parent.mkdir(parents=True, exist_ok=True)
            out = args.save.with_name(f"{args.save.stem}-{name}{args.save.suffix}")
            body = (
                {"load_average": load, **per_seed[seeds[0]]}
                if len(seeds) == 1
                else {"load_average": load, "seeds": {str(k): v for k, v in per_seed.items()}}
            )
            out.write_text(json.dumps(body))
            print(f"saved {out}", flush=True)


def _progress(name: str, seed: int, label: str, steps: list[dict], thresholds: tuple[float, ...], n: int) -> None:
    """With several seeds, a line per finished run (to stderr: the tables stay clean)."""
    if n == 1:
        return
    hits = crossings(steps, thresholds) if steps else dict.fromkeys(thresholds)
    cells = ", ".join(f"{t}: " + (f"step {h[0]} {h[1]:.1f} s" if h else "-") for t, h in hits.items())
    print(f"[{name} seed {seed}] {label}: {len(steps)} steps, {cells}", file=sys.stderr, flush=True)


def _trl_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--task", required=True)
    p.add_argument("--max-new-tokens", type=int, required=True)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, required=True)
    trl_run(p.parse_args(argv))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_trl":
        _trl_main(sys.argv[2:])
    else:
        main()
