"""Output tokens/s and time to first token of the torch engine (continuous batching)
against transformers' `generate` on the same model and prompts, at 1, 8 and 32
concurrent requests, in one run.

The model is a random-init Llama built locally from a config (nothing is downloaded).
Each concurrency level sends the same requests to three servers:

- engine:            the clotho torch engine; every request submitted at once, streamed.
- generate/request:  one `generate` call per request, in arrival order (what a plain
                     transformers server does with concurrent requests).
- generate/batch:    all concurrent prompts left-padded into one `generate` call that
                     runs until the longest request is done (static batching); only the
                     tokens each request asked for count as output.

Greedy decoding and ignore-eos everywhere, so every arm produces the same number of
tokens per request. Prints one JSON line, then a table.

    python bench/engine_throughput.py                  # about two minutes on 2 cores
    python bench/engine_throughput.py --concurrency 1,8 --hidden 256 --layers 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "clients" / "python"))


@dataclass
class Arm:
    tokens: int
    seconds: float
    cpu_seconds: float
    ttft_mean: float
    ttft_p50: float
    ttft_max: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds

    @property
    def tokens_per_cpu_second(self) -> float:
        """Output tokens per second of CPU the process used (all threads): steadier than
        wall time on a machine shared with other work."""
        return self.tokens / max(self.cpu_seconds, 1e-9)

    def as_json(self) -> dict:
        return {
            **{k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()},
            "tokens_per_second": round(self.tokens_per_second, 1),
            "tokens_per_cpu_second": round(self.tokens_per_cpu_second, 1),
        }


def build_model(out: Path, hidden: int, layers: int, vocab: int, seed: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from services.demo.tiny_model import build_tokenizer

    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    heads = max(1, hidden // 64)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(hidden * 8 / 3) // 32 * 32,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def workload(n: int, prompt_len: tuple[int, int], new_tokens: tuple[int, int], vocab: int, seed: int):
    rng = random.Random(seed * 1000 + n)
    return [
        (
            [1] + [rng.randrange(3, min(vocab, 4000)) for _ in range(rng.randint(*prompt_len) - 1)],
            rng.randint(*new_tokens),
        )
        for _ in range(n)
    ]


class Clock:
    def __init__(self) -> None:
        self.wall = time.perf_counter()
        self.cpu = time.process_time()

    def arm(self, tokens: int, ttfts: list[float]) -> Arm:
        return Arm(
            tokens,
            time.perf_counter() - self.wall,
            time.process_time() - self.cpu,
            statistics.fmean(ttfts),
            statistics.median(ttfts),
            max(ttfts),
        )


def best(runs: list[Arm]) -> Arm:
    return max(runs, key=lambda a: a.tokens_per_second)


async def run_engine(engine, requests) -> Arm:
    from services.inference.generation_types import Completion, GenerationRequest, SamplingOptions, TokenChunk

    clock = Clock()
    start = clock.wall
    first: list[float | None] = [None] * len(requests)
    tokens = 0

    async def one(i: int, prompt: list[int], new: int) -> None:
        nonlocal tokens
        stream = engine.submit(
            GenerationRequest(
                prompt, SamplingOptions(temperature=0.0, max_new_tokens=new, ignore_eos=True), stream=True
            )
        )
        async for event in stream:
            if isinstance(event, TokenChunk) and first[i] is None:
                first[i] = time.perf_counter() - start
            elif isinstance(event, Completion):
                tokens += len(event.output_ids)

    await asyncio.gather(*(one(i, p, n) for i, (p, n) in enumerate(requests)))
    return clock.arm(tokens, [f or 0.0 for f in first])


class FirstToken:
    """A generate streamer that notes when the first new token comes out (the first
    `put` carries the prompt)."""

    def __init__(self) -> None:
        self.calls = 0
        self.at: float | None = None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2 and self.at is None:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


def generate(model, prompts: list[list[int]], new: int, streamer: FirstToken) -> None:
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    with torch.inference_mode():
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            streamer=streamer,
        )


def run_generate_per_request(model, requests) -> Arm:
    clock = Clock()
    ttfts = []
    for prompt, new in requests:
        streamer = FirstToken()
        generate(model, [prompt], new, streamer)
        ttfts.append((streamer.at or time.perf_counter()) - clock.wall)
    return clock.arm(sum(n for _, n in requests), ttfts)


def run_generate_batched(model, requests) -> Arm:
    clock = Clock()
    streamer = FirstToken()
    generate(model, [p for p, _ in requests], max(n for _, n in requests), streamer)
    ttft = (streamer.at or time.perf_counter()) - clock.wall
    return clock.arm(sum(n for _, n in requests), [ttft] * len(requests))


def table(rows: list[dict]) -> str:
    head = (
        f"{'conc':>4}  {'arm':<18}{'out tok/s':>10}{'tok/cpu-s':>10}{'TTFT mean':>11}{'TTFT p50':>10}"
        f"{'TTFT max':>10}{'tokens':>8}{'seconds':>9}  engine speedup (wall, cpu)"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        for name in ("engine", "generate/request", "generate/batch"):
            a = r[name]
            e = r["engine"]
            ratio = (
                ""
                if name == "engine"
                else (
                    f"x{e['tokens_per_second'] / a['tokens_per_second']:.2f}, "
                    f"x{e['tokens_per_cpu_second'] / a['tokens_per_cpu_second']:.2f}"
                )
            )
            lines.append(
                f"{r['concurrency']:>4}  {name:<18}{a['tokens_per_second']:>10.1f}{a['tokens_per_cpu_second']:>10.1f}"
                f"{a['ttft_mean']:>10.2f}s{a['ttft_p50']:>9.2f}s{a['ttft_max']:>9.2f}s{a['tokens']:>8}"
                f"{a['seconds']:>9.1f}  {ratio}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prompt-len", default="16,96", help="min,max prompt tokens")
    parser.add_argument("--new-tokens", default="32,128", help="min,max new tokens per request")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--model-dir", default="", help="reuse or write the model here (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=1, help="runs per arm; the fastest counts (for shared machines)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from services.inference.torch_engine.engine import GenerationEngine

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    levels = [int(c) for c in args.concurrency.split(",")]
    prompt_len = tuple(int(x) for x in args.prompt_len.split(","))
    new_tokens = tuple(int(x) for x in args.new_tokens.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(
            Path(args.model_dir or tmp) / "bench-llama", args.hidden, args.layers, args.vocab, args.seed
        )
        hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        engine = GenerationEngine(model_dir, max_batch_size=max(64, max(levels)))
        params = sum(p.numel() for p in hf.parameters())
        try:
            warm = workload(2, (8, 8), (4, 4), args.vocab, seed=99)
            asyncio.run(run_engine(engine, warm))
            run_generate_per_request(hf, warm[:1])
            rows = []
            for c in levels:
                requests = workload(c, prompt_len, new_tokens, args.vocab, args.seed)
                runs: dict[str, list[Arm]] = {"engine": [], "request": [], "batch": []}
                for _ in range(args.repeat):
                    # Interleaved, so that a burst of load elsewhere hits every arm alike.
                    runs["engine"].append(asyncio.run(run_engine(engine, requests)))
                    runs["request"].append(run_generate_per_request(hf, requests))
                    runs["batch"].append(run_generate_batched(hf, requests))
                eng, per_request, batched = best(runs["engine"]), best(runs["request"]), best(runs["batch"])
                rows.append(
                    {
                        "concurrency": c,
                        "engine": eng.as_json(),
                        "generate/request": per_request.as_json(),
                        "generate/batch": batched.as_json(),
                        "speedup_vs_generate_per_request": round(
                            eng.tokens_per_second / per_request.tokens_per_second, 2
                        ),
                        "speedup_vs_generate_batch": round(eng.tokens_per_second / batched.tokens_per_second, 2),
                        "cpu_speedup_vs_generate_per_request": round(
                            eng.tokens_per_cpu_second / per_request.tokens_per_cpu_second, 2
                        ),
                        "cpu_speedup_vs_generate_batch": round(
                            eng.tokens_per_cpu_second / batched.tokens_per_cpu_second, 2
                        ),
                    }
                )
                print(f"# concurrency {c} done", file=sys.stderr, flush=True)
        finally:
            engine.close()
    result = {
        "event": "bench",
        "bench": "engine_throughput",
        "model": {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab, "parameters": params},
        "workload": {"prompt_len": prompt_len, "new_tokens": new_tokens, "decoding": "greedy, ignore_eos"},
        "threads": torch.get_num_threads(),
        "repeat": args.repeat,
        "results": rows,
    }
    print(json.dumps(result))
    print(table(rows))


if __name__ == "__main__":
    main()
