"""Weight sync at the link's speed: the full versioned protocol beside its baselines.

A ~0.5B-parameter Qwen2-style model in bfloat16 (random init from a config built here;
nothing is downloaded; ~1 GB) is saved locally and served by a real inference process
(`python -m services.inference --dtype bfloat16`). Then, in interleaved rounds so that
load from anything else on the machine hits every method alike:

  raw gloo     one broadcast of the same bytes from this process to a peer process
               (the floor of any transfer over gloo on this machine)
  protocol     WeightSync.push into the inference process: prepare, pipelined bucket
               broadcast with a CRC-32 per bucket, await, commit (the engine switches to
               the new weights), from parameters laid out as the buckets, as the trainer
               keeps them when they travel in their own dtype (nothing to pack)
  protocol, packing    the same from separate parameter tensors, packed (and checksummed)
               into the next bucket while one is on the wire, as when casting float32
               master weights to bfloat16 or after an FSDP gather
  shm protocol WeightSync.push through the same-host transport into a second inference
               process: the trainer packs (and checksums) each bucket straight into a
               shared-memory segment, the shard checksums it in place and adopts it at
               commit (prepare, await and commit included)
  memcpy       one copy of the same bytes into a buffer already faulted in (the floor
               of any transfer through memory: the shm protocol makes one copy too)
  disk         safetensors save_file of the weights, then load_file and a copy into
               the model in the peer process (page cache, no fsync: disk's best case)

Prints one JSON line and a table. Usage:
  python bench/weight_sync.py [--rounds 7] [--bucket-mb 64]

Other processes on a small shared machine make single timings noisy, so the rounds are
interleaved and "vs raw" ("vs memcpy") is the median over rounds of raw's time divided by the
method's time in the same round (a paired comparison); best and median times are shown
too, and the load average before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch

from services.common.weight_wire import DEFAULT_BUCKET_BYTES

# Qwen2.5-0.5B's shape.
QWEN2_05B = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
)


def build_model(out: Path, layers: int) -> None:
    """Random-init Qwen2 model in bf16 plus the tiny char tokenizer (ids < vocab)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from services.demo.tiny_model import build_tokenizer

    config = Qwen2Config(**{**QWEN2_05B, "num_hidden_layers": layers}, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    build_tokenizer(out)
    del model


# -- the peer process: raw gloo receiver and disk loader ----------------------------------


def peer(conn, model_dir: str) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from services.common.weight_wire import CollectiveGroup

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    params = dict(model.named_parameters())
    group = None
    buf = None
    conn.send("ready")
    while True:
        cmd, arg = conn.recv()
        if cmd == "join":
            port, nbytes = arg
            group = CollectiveGroup("gloo", "127.0.0.1", port, 2, 1, "bench-raw", 120.0)
            group.connect()
            buf = torch.empty(nbytes, dtype=torch.uint8)
            buf.fill_(0)  # fault the pages in once, as a long-lived receiver would have
            conn.send("joined")
        elif cmd == "raw":
            group.broadcast(buf, root=0)
            conn.send("done")
        elif cmd == "disk":
            loaded = load_file(arg)
            with torch.no_grad():
                for name, t in loaded.items():
                    params[name].copy_(t)
            del loaded
            conn.send("done")
        elif cmd == "stop":
            if group is not None:
                group.close()
            conn.send("bye")
            return


async def ask(conn, message, expect: str) -> None:
    conn.send(message)
    reply = await asyncio.to_thread(conn.recv)
    assert reply == expect, reply


# -- main -----------------------------------------------------------------------------------


def lay_out(manifest, named: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Copy the weights into one contiguous buffer carved into the manifest's buckets."""
    from services.common.weight_wire import unpack_bucket

    total = manifest.total_bytes
    big = torch.empty(total, dtype=torch.uint8)
    views: dict[str, torch.Tensor] = {}
    offset = 0
    for i, b in enumerate(manifest.buckets):
        flat = big[offset : offset + b.nbytes].view(b.dtype)
        for name, view in unpack_bucket(manifest, i, flat):
            view.copy_(named[name])
            views[name] = view
        offset += b.nbytes
    return big, views


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7, help="measured rounds per method (after warmup)")
    parser.add_argument(
        "--bucket-mb",
        type=float,
        default=DEFAULT_BUCKET_BYTES / 2**20,
        help="weight-sync bucket size in MiB (default: the trainer's)",
    )
    parser.add_argument("--layers", type=int, default=24, help="decoder layers (24 = Qwen2.5-0.5B)")
    parser.add_argument("--keep", type=Path, default=None, help="model directory to reuse (built if missing)")
    args = parser.parse_args()

    from safetensors.torch import save_file

    from services import launcher
    from services.common.weight_wire import CollectiveGroup, build_manifest
    from services.trainer.weight_push import WeightSync

    work = Path(tempfile.mkdtemp(prefix="clotho-bench-ws-"))
    model_dir = args.keep or work / "model"
    if not (model_dir / "config.json").exists():
        t0 = time.perf_counter()
        build_model(model_dir, args.layers)
        print(f"built the model in {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    named = {n: p.detach() for n, p in model.named_parameters()}
    params = sum(t.numel() for t in named.values())
    bucket_bytes = int(args.bucket_mb * 1024 * 1024)
    manifest = build_manifest(named.items(), bucket_bytes)
    nbytes = manifest.total_bytes
    big, laid_out = lay_out(manifest, named)

    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    peer_proc = ctx.Process(target=peer, args=(child_conn, str(model_dir)), daemon=True)
    peer_proc.start()
    serve_args = ["--model-path", str(model_dir), "--dtype", "bfloat16", "--weight-update-timeout-seconds", "300"]
    # One inference process per transport, so neither's buffers depend on the other's rounds.
    inference = await launcher.start("inference", "services.inference", serve_args, work / "logs")
    inference_shm = await launcher.start("inference-shm", "services.inference", serve_args, work / "logs")
    load_before = os.getloadavg()
    raw_group = None
    sync = None
    shm_sync = None
    try:
        ready = await launcher.wait_ready(inference, 600)
        ready_shm = await launcher.wait_ready(inference_shm, 600)
        assert await asyncio.to_thread(conn.recv) == "ready"
        raw_group = CollectiveGroup.host("gloo", "127.0.0.1", 2, "bench-raw", 120.0)
        conn.send(("join", (raw_group.port, nbytes)))
        await asyncio.to_thread(raw_group.connect)
        assert await asyncio.to_thread(conn.recv) == "joined"
        sync = WeightSync.for_targets(
            [f"127.0.0.1:{ready['grpc_port']}"], bucket_bytes=bucket_bytes, timeout_seconds=300, transport="collective"
        )
        shm_sync = WeightSync.for_targets(
            [f"127.0.0.1:{ready_shm['grpc_port']}"], bucket_bytes=bucket_bytes, timeout_seconds=300, transport="shm"
        )
        version = 0
        shm_version = 0
        times: dict[str, list[float]] = {
            "raw gloo": [],
            "protocol": [],
            "protocol, packing": [],
            "shm protocol": [],
            "memcpy": [],
            "disk": [],
        }
        stages: list[dict[str, float]] = []
        shm_stages: list[dict[str, float]] = []
        cold = None
        copy_dst = torch.empty_like(big)
        copy_dst.fill_(0)  # faulted in once, as the shard's buffers are after the first updates

        async def raw() -> float:
            start = time.perf_counter()
            conn.send(("raw", None))
            await asyncio.to_thread(raw_group.broadcast, big)
            assert await asyncio.to_thread(conn.recv) == "done"
            return time.perf_counter() - start

        async def protocol(weights) -> float:
            nonlocal version
            version += 1
            report = await sync.push(weights, version, version)
            stages.append(report.stages)
            return report.seconds

        async def shm_protocol(weights) -> float:
            nonlocal shm_version
            shm_version += 1
            report = await shm_sync.push(weights, shm_version, shm_version)
            assert report.group_name.startswith("clotho-wt-"), report.group_name
            shm_stages.append(report.stages)
            return report.seconds

        async def memcpy() -> float:
            start = time.perf_counter()
            await asyncio.to_thread(copy_dst.copy_, big)
            return time.perf_counter() - start

        async def disk() -> float:
            path = work / "weights.safetensors"
            start = time.perf_counter()
            await asyncio.to_thread(save_file, named, str(path))
            await ask(conn, ("disk", str(path)), "done")
            elapsed = time.perf_counter() - start
            path.unlink()
            return elapsed

        # Warmup: the group forms, and the shard's two buffer sets (served + receiving)
        # are allocated by the first two updates.
        cold = await protocol(laid_out)
        await protocol(named)
        await raw()
        # Both sets of the segment are faulted in by the first two updates.
        cold_shm = await shm_protocol(named)
        await shm_protocol(named)
        await memcpy()
        stages.clear()
        shm_stages.clear()
        for _ in range(args.rounds):
            times["raw gloo"].append(await raw())
            times["protocol"].append(await protocol(laid_out))
            times["protocol, packing"].append(await protocol(named))
            times["shm protocol"].append(await shm_protocol(named))
            times["memcpy"].append(await memcpy())
            times["disk"].append(await disk())

        # The inference process really serves the last update.
        from clotho.v1 import inference_service_pb2 as pb
        from clotho.v1 import inference_service_pb2_grpc as pb_grpc
        from services.common.server import channel

        async with channel(f"127.0.0.1:{ready['grpc_port']}") as ch:
            served = (
                await pb_grpc.InferenceServiceStub(ch).GetServedPolicy(pb.GetServedPolicyRequest())
            ).policy.version
        assert served == version, (served, version)
        async with channel(f"127.0.0.1:{ready_shm['grpc_port']}") as ch:
            served = (
                await pb_grpc.InferenceServiceStub(ch).GetServedPolicy(pb.GetServedPolicyRequest())
            ).policy.version
        assert served == shm_version, (served, shm_version)
    finally:
        if sync is not None:
            await sync.close()
        if shm_sync is not None:
            await shm_sync.close()
        with_stop = peer_proc.is_alive()
        if with_stop:
            conn.send(("stop", None))
            await asyncio.to_thread(conn.recv)
        if raw_group is not None:
            raw_group.close()
        await launcher.stop(inference, grace=60)
        await launcher.stop(inference_shm, grace=60)
        peer_proc.join(30)
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    best = {k: min(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    raw_best = best["raw gloo"]
    paired = {k: statistics.median(r / t for r, t in zip(times["raw gloo"], v)) for k, v in times.items()}
    vs_copy = {k: statistics.median(c / t for c, t in zip(times["memcpy"], v)) for k, v in times.items()}
    stage_med = {k: statistics.median(s[k] for s in stages) for k in stages[0]} if stages else {}
    shm_stage_med = {k: statistics.median(s[k] for s in shm_stages) for k in shm_stages[0]} if shm_stages else {}
    load_after = os.getloadavg()
    result = {
        "bench": "weight_sync",
        "params": params,
        "bytes": nbytes,
        "bucket_bytes": bucket_bytes,
        "buckets": len(manifest.buckets),
        "rounds": args.rounds,
        "cpu_count": os.cpu_count(),
        "cold_first_push_s": round(cold, 3),
        "seconds_best": {k: round(v, 3) for k, v in best.items()},
        "seconds_median": {k: round(v, 3) for k, v in med.items()},
        "GBps_best": {k: round(nbytes / v / 1e9, 3) for k, v in best.items()},
        "fraction_of_raw_best": {k: round(raw_best / v, 3) for k, v in best.items()},
        "fraction_of_raw_paired_median": {k: round(v, 3) for k, v in paired.items()},
        "fraction_of_memcpy_paired_median": {k: round(v, 3) for k, v in vs_copy.items()},
        "protocol_stage_seconds_median": {k: round(v, 3) for k, v in stage_med.items()},
        "shm_protocol_stage_seconds_median": {k: round(v, 3) for k, v in shm_stage_med.items()},
        "cold_first_shm_push_s": round(cold_shm, 3),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in load_after],
    }
    print(json.dumps(result), flush=True)
    print(
        f"\n{params / 1e6:.0f}M parameters, {nbytes / 1e9:.2f} GB bf16, {len(manifest.buckets)} buckets of "
        f"{bucket_bytes / 2**20:.0f} MiB, best / median of {args.rounds} rounds"
    )
    print(
        f"{'method':<20}{'best s':>8}{'median s':>10}{'GB/s (median)':>15}{'vs raw (paired)':>17}"
        f"{'vs raw (best)':>15}{'vs memcpy (paired)':>20}"
    )
    for k in times:
        print(
            f"{k:<20}{best[k]:>8.3f}{med[k]:>10.3f}{nbytes / med[k] / 1e9:>15.2f}{paired[k]:>17.0%}"
            f"{raw_best / best[k]:>15.0%}{vs_copy[k]:>20.0%}"
        )
    if stage_med:
        print(
            "protocol stages, median over both variants (s): " + ", ".join(f"{k} {v:.3f}" for k, v in stage_med.items())
        )
    if shm_stage_med:
        print("shm protocol stages, median (s): " + ", ".join(f"{k} {v:.3f}" for k, v in shm_stage_med.items()))
    print(
        f"first push (group formed, buffers allocated): {cold:.3f}s; first shm push (segment created): {cold_shm:.3f}s"
    )
    print(f"load average (1, 5, 15 min) before {load_before}, after {load_after} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    asyncio.run(main())
