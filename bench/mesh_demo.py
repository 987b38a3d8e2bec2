"""The demo mesh's figures beside this machine's raw gloo broadcast of the same bytes.

Runs `clotho up` (tiny model, demo environment) for --steps steps and prints the reward
curve (start vs end), steps per minute and weight-sync seconds and bytes/s; then, in the
same run, a raw gloo broadcast of the same number of bytes between two processes (the
floor any weight sync over gloo pays), and the ratio between the two.

Usage: python bench/mesh_demo.py [--steps 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_rank(rank: int, port: int, nbytes: int, repeats: int, out) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    t = torch.empty(nbytes // 4, dtype=torch.float32)
    if rank == 0:
        t.fill_(1.0)
    dist.barrier()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dist.broadcast(t, 0)
        dist.barrier()
        times.append(time.perf_counter() - t0)
    if rank == 0:
        out.put(sorted(times)[len(times) // 2])
    dist.destroy_process_group()


def raw_gloo_seconds(nbytes: int, repeats: int = 20) -> float:
    """Median seconds of one gloo broadcast of `nbytes` between two processes."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_gloo_rank, args=(r, port, nbytes, repeats, q)) for r in range(2)]
    for p in procs:
        p.start()
    seconds = q.get(timeout=300)
    for p in procs:
        p.join()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    from services.up import _parser, run_up

    with tempfile.TemporaryDirectory() as d:
        up_args = _parser().parse_args(
            ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--data-dir", d, "--quiet"]
        )
        summary = asyncio.run(run_up(up_args))
    nbytes = int(summary["sync_bytes"] or 0)
    raw = raw_gloo_seconds(nbytes) if nbytes else float("nan")
    result = {
        "bench": "mesh_demo",
        "steps": summary["steps"],
        "reward_start": summary["reward_start"],
        "reward_end": summary["reward_end"],
        "steps_per_minute": summary["steps_per_minute"],
        "sync_bytes": nbytes,
        "sync_seconds": summary["sync_seconds_mean"],
        "sync_MBps": (summary["sync_bytes_per_second"] or 0) / 1e6,
        "raw_gloo_seconds": raw,
        "raw_gloo_MBps": nbytes / raw / 1e6 if nbytes else None,
    }
    result["sync_over_raw_time"] = (result["sync_seconds"] or 0) / raw if nbytes else None
    print(json.dumps(result))
    print(f"{'':28}{'clotho sync':>14}{'raw gloo':>14}")
    print(f"{'seconds per update':28}{result['sync_seconds']:>14.4f}{raw:>14.4f}")
    print(f"{'MB/s':28}{result['sync_MBps']:>14.1f}{result['raw_gloo_MBps']:>14.1f}")
    print(
        f"reward {result['reward_start']:.3f} -> {result['reward_end']:.3f} over {result['steps']} steps, "
        f"{result['steps_per_minute']:.1f} steps/min"
    )


if __name__ == "__main__":
    main()
