"""A trainer process for the shared-memory transport tests: pushes perturbed weights
into one inference service through WeightSync, but stops writing after the first bucket,
prints "midway" and waits to be killed.

Usage: python shm_trainer_child.py <target> <model_dir> <version> <timeout_seconds>
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from transformers import AutoModelForCausalLM

from services.common.weight_wire import shm
from services.trainer.weight_push import WeightSync


def stalling_write(segment, manifest, tensors, buffer_set, abandoned: threading.Event, on_sent=None):
    out = segment.bucket(buffer_set, 0)
    from services.common.weight_wire import pack_bucket

    pack_bucket(manifest, 0, tensors, out=out)
    segment.publish(manifest.buckets[0].nbytes)
    print("midway", flush=True)
    while True:
        time.sleep(1)


async def main() -> None:
    target, model_dir, version, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    shm.write_buckets = stalling_write
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    weights = {n: p.detach() + 1.0 for n, p in model.named_parameters()}
    sync = WeightSync.for_targets([target], bucket_bytes=64 * 1024, timeout_seconds=timeout, run_id="child")
    await sync.push(weights, version, version)


if __name__ == "__main__":
    torch.set_num_threads(1)
    asyncio.run(main())
