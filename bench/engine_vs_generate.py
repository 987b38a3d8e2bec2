"""The torch engine against transformers' `generate` on one GRPO step's generation: P
prompts x G samples, N new tokens, temperature 1, with the sampled tokens' logprobs,
at the same torch thread count, side by side in one process.

    OMP_NUM_THREADS=1 python bench/engine_vs_generate.py --model .clotho/bench-vs-trl/heavy/model
    python bench/engine_vs_generate.py --threads 1 --size heavy --rounds 5

- engine:   the clotho torch engine, the P requests (n=G each) submitted at once, as the
            demo environment does; logprobs come with the tokens.
- generate: one `generate` call on the P*G left-padded prompts (as TRL's GRPOTrainer
            does), do_sample, logits returned (output_logits) and the sampled tokens'
            logprobs taken from them.

Every arm is warmed up once; the median of --rounds rounds is printed: CPU seconds of
the process per step's generation (all threads; steadier than wall time on a machine
shared with other work) and tokens per CPU second.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {
    "tiny": ({"hidden_size": 128, "num_layers": 2, "num_heads": 4}, "repeat", 4),
    "heavy": ({"hidden_size": 512, "num_layers": 6, "num_heads": 8}, "reverse", 32),
}


def prompts(task_name: str, new_tokens: int, count: int, tokenizer, seed: int) -> list[list[int]]:
    from services.demo.task import Task

    task = Task(task_name, new_tokens)
    rng = random.Random(seed)
    return [tokenizer.encode(task.prompt(rng).text, add_special_tokens=False) for _ in range(count)]


async def engine_round(engine, batch: list[list[int]], group: int, new_tokens: int, seed: int) -> float:
    from services.inference.generation_types import GenerationRequest, SamplingOptions

    started = time.process_time()
    streams = [
        engine.submit(
            GenerationRequest(p, SamplingOptions(n=group, temperature=1.0, max_new_tokens=new_tokens, ignore_eos=True))
        )
        for p in batch
    ]
    for s in streams:
        await s.completions()
    return time.process_time() - started


def generate_round(model, batch: list[list[int]], group: int, new_tokens: int, pad: int, eos: int | None) -> float:
    started = time.process_time()
    rows = [p for p in batch for _ in range(group)]
    width = max(len(p) for p in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, p in enumerate(rows):
        ids[r, width - len(p) :] = torch.tensor(p)
        mask[r, width - len(p) :] = 1
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            pad_token_id=pad,
            eos_token_id=eos,
            return_dict_in_generate=True,
            output_logits=True,
        )
        logits = torch.stack(out.logits, dim=1).float()
        new = out.sequences[:, width:]
        torch.log_softmax(logits, dim=-1).gather(-1, new[..., None])
    return time.process_time() - started


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=SIZES, default="heavy")
    p.add_argument("--model", type=Path, default=None, help="model directory (default: built under --work-dir)")
    p.add_argument("--work-dir", type=Path, default=Path(".clotho/bench-engine-vs-generate"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arms", default="engine,generate")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec, task, default_new = SIZES[args.size]
    new_tokens = args.new_tokens or default_new
    model_dir = args.model
    if model_dir is None:
        from services.demo.tiny_model import build_tiny_model

        model_dir = args.work_dir / args.size
        if not (model_dir / "config.json").exists():
            build_tiny_model(model_dir, spec["hidden_size"], spec["num_layers"], spec["num_heads"])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    batches = [prompts(task, new_tokens, args.prompts, tok, args.seed + r) for r in range(args.rounds + 1)]
    results: dict[str, list[float]] = {}
    arms = args.arms.split(",")
    if "generate" in arms:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        # ignore eos (every row runs new_tokens): the same work as the engine with ignore_eos.
        results["generate"] = [generate_round(model, b, args.group, new_tokens, pad, None) for b in batches][1:]
    if "engine" in arms:
        from services.inference.torch_engine.engine import GenerationEngine

        engine = GenerationEngine(model_dir, seed=args.seed)

        async def run() -> list[float]:
            return [await engine_round(engine, b, args.group, new_tokens, args.seed) for b in batches]

        results["engine"] = asyncio.run(run())[1:]
        engine.close()
    tokens = args.prompts * args.group * new_tokens
    print(f"{args.size}: {args.prompts}x{args.group} sequences x {new_tokens} tokens, {args.threads} thread(s)")
    for arm, times in results.items():
        med = statistics.median(times)
        print(
            f"  {arm:<9} {med * 1e3:8.1f} CPU ms/step-generation  {tokens / med:8.0f} tokens/CPU-s  (rounds {[round(t * 1e3) for t in times]})"
        )


if __name__ == "__main__":
    main()
