"""The clients side by side against one gateway, in one run:

1. StreamBatches consumption rate (batches/s, MB/s) of the Python, Go and TypeScript
   consumers. Before each consumer the gateway is reset and its queue filled with the
   same `--batches` batches (one group of `--batch-size` sequences of `--seq-len`
   tokens, masks and inference logprobs each); the consumer registers as the trainer
   and takes them all with `--ahead` credits outstanding. Timed from the first batch
   received to the last (process start-up excluded). MB counts the batches' protobuf
   size.
2. Generate through the gateway (GatewayService.Generate) against Generate directly
   on the InferenceService (tiny model, CPU, one new token): p50 and p90 latency of
   `--calls` calls each, alternating, and the p50 the gateway adds.

Real processes on loopback: an inference service (services.inference, a tiny
random-init model built locally) and a gateway (memory store). Needs the client
toolchains (`make setup-clients`). Prints one JSON line, then a table.

    python bench/clients.py                       # about a minute on 2 cores
    python bench/clients.py --batches 500 --seq-len 2048 --calls 400
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "clients" / "python"))
sys.path.insert(0, str(REPO / "tests"))

from clotho.client import GatewayClient, InferenceClient
from clotho.v1 import gateway_service_pb2 as gw
from clotho.v1 import inference_service_pb2 as inf
from clotho.v1 import scored_data_pb2 as sd
from services import launcher

GO_DIR = REPO / "clients" / "go"
TS_DIR = REPO / "clients" / "typescript"


def build_consumers(out: Path) -> dict[str, list[str]]:
    env = dict(os.environ, GOFLAGS="-mod=mod", GOPROXY="off", CGO_ENABLED="0")
    go_bin = out / "consumer"
    subprocess.run(
        ["go", "build", "-modfile=offline/go.debian.mod", "-o", str(go_bin), "./examples/consumer"],
        cwd=GO_DIR,
        env=env,
        check=True,
    )
    subprocess.run([str(TS_DIR / "node_modules" / ".bin" / "tsc"), "-p", "tsconfig.json"], cwd=TS_DIR, check=True)
    return {
        "go": [str(go_bin)],
        "typescript": [shutil.which("node") or "node", str(TS_DIR / "dist" / "examples" / "consumer.js")],
    }


def make_group(i: int, batch_size: int, seq_len: int) -> sd.ScoredGroup:
    prompt = seq_len // 4
    return sd.ScoredGroup(
        sequences=[
            sd.ScoredSequence(
                tokens=[(i * 7 + k * 13 + j) % 50000 for j in range(seq_len)],
                masks=[-100] * prompt + [(i * 7 + k * 13 + j) % 50000 for j in range(prompt, seq_len)],
                score=float(k % 2),
                inference_logprobs=[1.0] * prompt + [-0.125 * (j % 17) for j in range(prompt, seq_len)],
                policy_version=0,
            )
            for k in range(batch_size)
        ]
    )


async def fill(client: GatewayClient, groups: list[sd.ScoredGroup]) -> None:
    await client.stub.ResetData(gw.ResetDataRequest())
    for start in range(0, len(groups), 50):
        await client.submit(groups[start : start + 50])


async def python_consumer(target: str, batches: int, batch_size: int, ahead: int) -> dict:
    async with GatewayClient(target) as client:
        await client.stub.RegisterTrainer(gw.RegisterTrainerRequest(batch_size=batch_size, max_token_len=1 << 20))
        seen, first, size = 0, 0.0, 0
        async for batch in client.batches(ahead):
            if seen == 0:
                first = time.perf_counter()
            size += batch.ByteSize()
            seen += 1
            if seen == batches:
                break
        return {"batches": seen, "bytes": size, "seconds": time.perf_counter() - first}


async def process_consumer(argv: list[str], target: str, batches: int, batch_size: int, ahead: int, go: bool) -> dict:
    d = "-" if go else "--"
    proc = await asyncio.create_subprocess_exec(
        *argv,
        f"{d}target",
        target,
        f"{d}batches",
        str(batches),
        f"{d}batch-size",
        str(batch_size),
        f"{d}ahead",
        str(ahead),
        f"{d}quiet",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{argv}: {err.decode()}")
    return json.loads(out.decode().strip().splitlines()[-1])


async def generate_latency(gateway: str, inference: str, calls: int) -> dict:
    request = inf.GenerateRequest(
        input_ids=[1, 10, 20, 30], sampling_params=inf.SamplingParams(max_new_tokens=1, temperature=0.0)
    )
    direct_ms, through_ms = [], []
    async with GatewayClient(gateway) as via:
        direct = InferenceClient(inference)
        for i in range(calls + 10):
            t0 = time.perf_counter()
            async for _ in direct.stub.Generate(request):
                pass
            t1 = time.perf_counter()
            async for _ in via.stub.Generate(gw.GatewayServiceGenerateRequest(request=request)):
                pass
            t2 = time.perf_counter()
            if i >= 10:  # warm-up: channels, first compiles
                direct_ms.append((t1 - t0) * 1e3)
                through_ms.append((t2 - t1) * 1e3)
        await direct.close()

    def pct(xs: list[float], q: float) -> float:
        return statistics.quantiles(xs, n=100)[q - 1] if len(xs) > 1 else xs[0]

    return {
        "calls": calls,
        "direct_p50_ms": statistics.median(direct_ms),
        "direct_p90_ms": pct(direct_ms, 90),
        "gateway_p50_ms": statistics.median(through_ms),
        "gateway_p90_ms": pct(through_ms, 90),
        "added_p50_ms": statistics.median(through_ms) - statistics.median(direct_ms),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--ahead", type=int, default=4)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()

    from services.demo.tiny_model import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        consumers = build_consumers(tmp)
        model = build_tiny_model(tmp / "model")
        children: list[launcher.Child] = []
        try:
            inference = await launcher.start(
                "inference", "services.inference", ["--model-path", str(model)], tmp / "logs"
            )
            children.append(inference)
            inf_addr = f"127.0.0.1:{(await launcher.wait_ready(inference, 180))['grpc_port']}"
            gateway = await launcher.start(
                "gateway",
                "services.gateway",
                ["--http-port", "0", "--inference", inf_addr, "--store", "memory"],
                tmp / "logs",
            )
            children.append(gateway)
            target = f"127.0.0.1:{(await launcher.wait_ready(gateway, 120))['grpc_port']}"

            groups = [make_group(i, args.batch_size, args.seq_len) for i in range(args.batches)]
            consumption = {}
            async with GatewayClient(target) as client:
                for name in ("python", "go", "typescript"):
                    await fill(client, groups)
                    if name == "python":
                        result = await python_consumer(target, args.batches, args.batch_size, args.ahead)
                    else:
                        result = await process_consumer(
                            consumers[name], target, args.batches, args.batch_size, args.ahead, go=name == "go"
                        )
                    # The TypeScript consumer does not re-encode to measure: same batches, same size.
                    size = result.get("bytes") or consumption["python"]["bytes"]
                    seconds = result["seconds"]
                    consumption[name] = {
                        "batches": result["batches"],
                        "bytes": size,
                        "seconds": seconds,
                        "batches_per_s": (result["batches"] - 1) / seconds,
                        "mb_per_s": size * (result["batches"] - 1) / result["batches"] / seconds / 1e6,
                    }
            latency = await generate_latency(target, inf_addr, args.calls)
        finally:
            for child in reversed(children):
                await launcher.stop(child)

    print(json.dumps({"config": vars(args), "stream_batches": consumption, "generate": latency}))
    print(f"\nStreamBatches: {args.batches} batches of {args.batch_size} x {args.seq_len} tokens, ahead={args.ahead}")
    print(f"{'consumer':<12}{'batches/s':>12}{'MB/s':>10}")
    for name, r in consumption.items():
        print(f"{name:<12}{r['batches_per_s']:>12.1f}{r['mb_per_s']:>10.1f}")
    print(f"\nGenerate (1 new token), {args.calls} calls each   p50 ms    p90 ms")
    print(f"{'direct InferenceService':<37}{latency['direct_p50_ms']:>7.2f}{latency['direct_p90_ms']:>10.2f}")
    print(f"{'through GatewayService':<37}{latency['gateway_p50_ms']:>7.2f}{latency['gateway_p90_ms']:>10.2f}")
    print(f"{'added by the gateway (p50)':<37}{latency['added_p50_ms']:>7.2f}")


if __name__ == "__main__":
    asyncio.run(main())
