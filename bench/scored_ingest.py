"""The cost of taking in one `/scored_data` group: the pydantic path against the C fast
path (services/gateway/trajectory/_scored_fast.c), side by side in one run.

Both produce the canonical compact JSON the group is kept and served as:
  pydantic  encode_group(parse_scored_data(body))
  C         _scored_fast.canonical_group(body, want_completions)[0]
(checked equal before timing). Bodies, as ../shared/bench/atropos_load.py sends them
(8 sequences x 256 tokens, half of each masked as prompt, scores 0.0/1.0):
  load       its group: inference_logprobs all -0.5, json.dumps default separators
  f32        inference_logprobs drawn from float32 (17-digit shortest floats), compact
  f32-spaced the f32 group with json.dumps default separators (", ", ": ")
  basenv-default  the load group as Atropos' BaseEnv default collect_trajectories sends
             it: no inference_logprobs; advantages, ref_logprobs, messages, overrides
             and images [], group_overrides {} (default separators)
Each figure is the best of --repeat medians of --number calls (microseconds per group);
"+completions" also asks for the completion token ids (the receipts lookup needs them).

    .venv/bin/python bench/scored_ingest.py [--sequences 8] [--tokens 256] [--number 2000] [--repeat 5]

Needs the extension built (`.venv/bin/pip install --no-deps -e .` with a C compiler).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.gateway.trajectory.scored_data import encode_group, parse_scored_data

try:
    from services.gateway.trajectory import _scored_fast
except ImportError:
    sys.exit("the C fast path was not built: needs a C compiler and Python headers (pip install --no-deps -e .)")


def load_group(rng: random.Random, g: int, t: int) -> dict:
    """The group ../shared/bench/atropos_load.py posts."""
    toks = [[rng.randrange(32000) for _ in range(t)] for _ in range(g)]
    masks = [[-100] * (t // 2) + x[t // 2 :] for x in toks]
    return {
        "tokens": toks,
        "masks": masks,
        "scores": [rng.choice([0.0, 1.0]) for _ in range(g)],
        "inference_logprobs": [[-0.5] * t for _ in range(g)],
    }


def basenv_default(group: dict) -> dict:
    """`group` as BaseEnv's default collect_trajectories builds it: the optional
    per-sequence lists start as [] and stay empty, group_overrides merges the items'."""
    out = {k: v for k, v in group.items() if k != "inference_logprobs"}
    out.update(advantages=[], ref_logprobs=[], messages=[], overrides=[], images=[], group_overrides={})
    return out


def f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def per_call_us(fn, body: bytes, number: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        samples = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(number // 5):
                fn(body)
            samples.append((time.perf_counter() - t0) / (number // 5))
        best = min(best, statistics.median(samples))
    return best * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--number", type=int, default=2000, help="calls per timing (C); pydantic gets a tenth")
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()

    rng = random.Random(0)
    load = load_group(rng, a.sequences, a.tokens)
    f32_group = dict(
        load, inference_logprobs=[[f32(-rng.expovariate(1.0)) for _ in range(a.tokens)] for _ in range(a.sequences)]
    )
    bodies = {
        "load": json.dumps(load).encode(),
        "f32": json.dumps(f32_group, separators=(",", ":")).encode(),
        "f32-spaced": json.dumps(f32_group).encode(),
        "basenv-default": json.dumps(basenv_default(load)).encode(),
    }

    def pydantic_path(body: bytes) -> bytes:
        return encode_group(parse_scored_data(body))

    def c_path(body: bytes) -> bytes:
        return _scored_fast.canonical_group(body, False)

    def c_path_completions(body: bytes) -> bytes:
        return _scored_fast.canonical_group(body, True)

    print(f"{'body':<16}{'KB':>7}{'pydantic us':>13}{'C us':>9}{'ratio':>8}{'C+completions us':>18}{'ratio':>8}")
    results = {}
    for name, body in bodies.items():
        fast = _scored_fast.canonical_group(body, True)
        assert fast is not None and fast[0] == pydantic_path(body), f"{name}: the paths disagree"
        py = per_call_us(pydantic_path, body, max(a.number // 10, 5), a.repeat)
        c = per_call_us(c_path, body, a.number, a.repeat)
        cc = per_call_us(c_path_completions, body, a.number, a.repeat)
        results[name] = {
            "bytes": len(body),
            "pydantic_us": round(py, 1),
            "c_us": round(c, 1),
            "c_completions_us": round(cc, 1),
        }
        print(f"{name:<16}{len(body) / 1000:>7.1f}{py:>13.1f}{c:>9.1f}{py / c:>7.1f}x{cc:>18.1f}{py / cc:>7.1f}x")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
