"""The trainer's own step against a TRL-style step on the same batch, model and threads.

    python bench/trainer_step.py                        # tiny and heavy, 1 and 2 threads
    python bench/trainer_step.py --sizes heavy --threads 1 --rounds 3
    python bench/trainer_step.py --baseline-src /tmp/main-src   # also an older checkout
    python bench/trainer_step.py --sizes heavy --profile        # + where Clotho's step goes
    python bench/trainer_step.py --sizes heavy --layouts rows,shared_prefix   # both layouts

One batch as `bench/vs_trl.py` trains on: 32 sequences (4 prompts x 8 samples) of a
prompt and a completion (tiny: the repeat task's 10-token prompt, 4 new tokens; heavy:
the reverse task's 42-token prompt, 32 new tokens), scores in [0, 1] and sampling
log-probs near the model's own. Models are built by the project's builder
(`clotho build-model`: tiny = hidden 128, 2 layers, 4 heads; heavy = hidden 512, 6
layers, 8 heads, ~25M parameters).

Two steps, timed in interleaved rounds in one process (torch at `--threads`):

- clotho: `TrainerCore.train(groups, version)`, the trainer's whole step (checks,
  advantages, the micro-batch plan, forward/backward, clip, AdamW, scheduler), as
  rank 0 runs it in its torch thread; one per `--layouts` entry (`batch_layout`:
  shared_prefix, rows, packed; empty: the default only), each its own model copy;
- trl: what TRL's GRPOTrainer does for the same batch (trl 1.16, beta 0): one padded
  forward over the 32 sequences with logits for the completion positions only,
  log-softmax gather and entropy, the clipped GRPO loss (DAPO token mean), backward,
  clip at 1.0, fused AdamW (transformers' default optimizer).

Each child process (one per source tree and thread count) prints the medians; the
table gives both and clotho / trl. `--baseline-src DIR` runs the same children with
the trainer of another checkout (e.g. `git archive` of an older commit): its clotho
column is "before", measured minutes apart, each against its own trl column.

Internal: `trainer_step.py _child ...` is one child.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SIZES = {
    "tiny": {"model": (128, 2, 4), "prompt": 10, "completion": 4, "lr": 1e-3},
    "heavy": {"model": (512, 6, 8), "prompt": 42, "completion": 32, "lr": 1e-4},
}
PROMPTS, SAMPLES = 4, 8


# -- the child ----------------------------------------------------------------------------


def make_groups(vocab: int, prompt: int, completion: int, seed: int = 0) -> list:
    """4 groups of 8 sequences: a shared prompt, random completions, scores, sampling
    log-probs near the uniform policy's (the ratio test has work to do)."""
    import random

    from clotho.v1 import scored_data_pb2 as sd

    rng = random.Random(seed)
    groups = []
    for _ in range(PROMPTS):
        head = [1] + [rng.randrange(3, vocab) for _ in range(prompt - 1)]
        seqs = []
        for _ in range(SAMPLES):
            tail = [rng.randrange(3, vocab) for _ in range(completion)]
            logp = [-rng.uniform(2.0, 4.0) for _ in tail]
            seqs.append(
                sd.ScoredSequence(
                    tokens=head + tail,
                    masks=[-100] * prompt + tail,
                    score=rng.random(),
                    inference_logprobs=[1.0] * prompt + logp,
                    policy_version=0,
                )
            )
        groups.append(sd.ScoredGroup(env_id=0, sequences=seqs))
    return groups


class TrlStep:
    """TRL GRPOTrainer's training step for a batch of equal-geometry sequences."""

    def __init__(self, model_path: str, lr: float, groups: list) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, fused=True)
        seqs = [s for g in groups for s in g.sequences]
        prompt = sum(1 for m in seqs[0].masks if m == -100)
        self.completion = len(seqs[0].tokens) - prompt
        self.ids = torch.tensor([list(s.tokens) for s in seqs])
        self.attention = torch.ones_like(self.ids)
        self.completion_ids = self.ids[:, prompt:]
        self.mask = torch.ones_like(self.completion_ids, dtype=torch.float32)
        self.old = torch.tensor([list(s.inference_logprobs)[prompt:] for s in seqs])
        scores = torch.tensor([[s.score for s in g.sequences] for g in groups])
        adv = (scores - scores.mean(1, keepdim=True)) / (scores.std(1, keepdim=True) + 1e-4)
        self.adv = adv.reshape(-1, 1)

    def step(self) -> None:
        torch = self.torch
        out = self.model(input_ids=self.ids, attention_mask=self.attention, logits_to_keep=self.completion + 1)
        logits = out.logits[:, :-1, :]
        # TRL's selective_log_softmax (float32: gather minus logsumexp) and entropy.
        logp = torch.gather(logits, -1, self.completion_ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
        with torch.no_grad():
            p = torch.softmax(logits, -1)
            _entropy = torch.logsumexp(logits, -1) - (p * logits).sum(-1)
        ratio = torch.exp(logp - self.old)
        loss1 = ratio * self.adv
        loss2 = torch.clamp(ratio, 0.8, 1.2) * self.adv
        per_token = -torch.min(loss1, loss2)
        loss = (per_token * self.mask).sum() / self.mask.sum().clamp(min=1.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def child(args: argparse.Namespace) -> None:
    sys.path[:0] = [str(args.src), str(Path(args.src) / "clients" / "python")]
    import torch

    torch.set_num_threads(args.threads)
    from services.trainer.core import TrainerCore
    from services.trainer.settings import TrainerSettings

    size = SIZES[args.size]
    steps = {}
    cores = []
    for layout in args.layouts.split(",") if args.layouts else [""]:
        extra = {"batch_layout": layout} if layout else {}
        settings = TrainerSettings(
            model_path=args.model, lr=size["lr"], grad_clip=1.0, checkpoint_dir="", device="cpu", **extra
        )
        core = TrainerCore(settings)
        core.load()
        cores.append(core)
        steps[f"clotho:{layout}" if layout else "clotho"] = core
    vocab = cores[0].batching.vocab_size or 16
    groups = make_groups(vocab, size["prompt"], size["completion"])
    trl = TrlStep(args.model, size["lr"], groups)

    def clotho_step(core=cores[-1]) -> None:  # profiled: the last layout
        core.train(groups, 0)

    order = [(name, lambda c=c: c.train(groups, 0)) for name, c in steps.items()] + [("trl", trl.step)]
    times: dict[str, list[float]] = {name: [] for name, _ in order}
    for _ in range(args.warmup):
        for _, fn in order:
            fn()
    for r in range(args.rounds):
        # Interleaved, each one first in turn.
        k = r % len(order)
        for name, fn in order[k:] + order[:k]:
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    result = {k: statistics.median(v) for k, v in times.items()}
    result["tokens"] = sum(len(s.tokens) for g in groups for s in g.sequences)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            clotho_step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile), file=sys.stderr)
    print(json.dumps(result))


# -- the parent ---------------------------------------------------------------------------


def build(size: str, work: Path) -> Path:
    sys.path[:0] = [str(ROOT), str(ROOT / "clients" / "python")]
    from services.demo.tiny_model import build_tiny_model

    path = work / size
    if not (path / "config.json").exists():
        hidden, layers, heads = SIZES[size]["model"]
        build_tiny_model(path, hidden, layers, heads)
    return path


def run_child(src: Path, size: str, model: Path, threads: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "_child", "--src", str(src), "--size", size]
    cmd += ["--model", str(model), "--threads", str(threads), "--rounds", str(args.rounds)]
    cmd += ["--warmup", str(args.warmup), "--profile", str(args.profile if src == ROOT or args.profile_baseline else 0)]
    if src == ROOT and args.layouts:
        cmd += ["--layouts", args.layouts]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=src, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({src}):\n{proc.stderr[-4000:]}")
    if args.profile:
        print(f"\n== profile of clotho's step: {size}, {threads} thread(s), {src} ==")
        print("\n".join(line for line in proc.stderr.splitlines() if not line.startswith(("WARNING", "INFO"))))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="tiny,heavy")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--baseline-src", type=Path, default=None, help="another checkout: its trainer is 'before'")
    p.add_argument("--profile", type=int, default=0, help="print the top N ops of one clotho step")
    p.add_argument("--profile-baseline", action="store_true", help="profile the baseline's step too")
    p.add_argument("--work", type=Path, default=Path("/tmp/clotho-bench-trainer-step"))
    p.add_argument(
        "--layouts",
        default="rows,shared_prefix",
        help="this tree's trainer with each batch_layout (comma-separated; empty: its default only)",
    )
    args = p.parse_args(argv)
    rows = []
    print(f"load average at start: {os.getloadavg()}")
    for size in args.sizes.split(","):
        model = build(size, args.work)
        for threads in (int(t) for t in args.threads.split(",")):
            srcs = ([("before", args.baseline_src.resolve())] if args.baseline_src else []) + [("after", ROOT)]
            for label, src in srcs:
                r = run_child(src, size, model, threads, args)
                rows.append((size, threads, label if args.baseline_src else "clotho", r))
    print(f"load average at end: {os.getloadavg()}")
    print(f"\n{'size':6} {'threads':>7} {'clotho':22} {'tokens':>6} {'clotho s':>9} {'trl s':>8} {'clotho/trl':>10}")
    for size, threads, label, r in rows:
        for key in (k for k in r if k.startswith("clotho")):
            name = f"{label} {key.partition(':')[2]}".strip()
            print(
                f"{size:6} {threads:>7} {name:22} {r['tokens']:>6} {r[key]:>9.3f} {r['trl']:>8.3f} "
                f"{r[key] / r['trl']:>10.2f}"
            )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        c = argparse.ArgumentParser()
        c.add_argument("_child")
        c.add_argument("--src", type=Path, required=True)
        c.add_argument("--size", required=True)
        c.add_argument("--model", required=True)
        c.add_argument("--threads", type=int, default=1)
        c.add_argument("--rounds", type=int, default=5)
        c.add_argument("--warmup", type=int, default=1)
        c.add_argument("--profile", type=int, default=0)
        c.add_argument("--layouts", default="")
        child(c.parse_args())
    else:
        main()
