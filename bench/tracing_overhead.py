"""What tracing costs: gateway ingest (`/scored_data`) and `/generate` throughput with
tracing off, on and exporting, in one run.

Three stacks (an inference process with the tiny model and a gateway in front of it,
memory store) run side by side, differing only in their OTEL_* variables:
  off        none set: no SDK is installed (the default)
  on         OTEL_TRACES_EXPORTER=none: every span recorded and sampled, exported nowhere
  exporting  OTLP/gRPC to an in-process receiver (opentelemetry-proto's TraceService,
             tests/otlp_receiver.py), 100% sampling (parentbased_always_on)
The load alternates between the stacks round by round (so drift on a shared machine
hits all three alike): for `--seconds` each, `--connections` keep-alive HTTP/1.1
connections post small `/scored_data` groups (2 sequences x 16 tokens: the per-request
cost is the point), then the same for `/generate` (3 prompt tokens, n=1,
`--new-tokens` tokens). Each figure is the median over `--rounds` rounds of requests
per second; the cost is the drop against `off`. The client is a raw asyncio HTTP/1.1
loop (pre-built request bytes), cheap next to the server.

    .venv/bin/python bench/tracing_overhead.py [--rounds 5] [--seconds 3] [--connections 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from otlp_receiver import export_env, otlp_receiver

from services import launcher
from services.demo.tiny_model import build_tiny_model

MODES = ("off", "on", "exporting")


def mode_env(mode: str, endpoint: str) -> dict[str, str]:
    cleared = {k: "" for k in os.environ if k.startswith("OTEL_")}
    if mode == "off":
        return {**cleared, "OMP_NUM_THREADS": "1"}
    if mode == "on":
        return {**cleared, "OTEL_TRACES_EXPORTER": "none", "OMP_NUM_THREADS": "1"}
    # The batch processor's defaults but for the delay: spans leave within 0.5 s.
    return {**cleared, **export_env(endpoint, OTEL_BSP_SCHEDULE_DELAY="500"), "OMP_NUM_THREADS": "1"}


def request_bytes(path: str, body: dict, port: int) -> bytes:
    data = json.dumps(body, separators=(",", ":")).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    ).encode()
    return head + data


async def one_connection(port: int, request: bytes, until: float, counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < until:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            if status != 200:
                raise RuntimeError(f"HTTP {status}: {head!r}")
            counts[0] += 1
    finally:
        writer.close()


async def throughput(port: int, request: bytes, seconds: float, connections: int) -> float:
    counts = [0]
    # A short warm-up on the same connections' path, not counted.
    await asyncio.gather(*(one_connection(port, request, time.perf_counter() + 0.3, [0]) for _ in range(2)))
    start = time.perf_counter()
    until = start + seconds
    await asyncio.gather(*(one_connection(port, request, until, counts) for _ in range(connections)))
    return counts[0] / (time.perf_counter() - start)


async def start_stack(mode: str, endpoint: str, model: Path, workdir: Path) -> tuple[list[launcher.Child], int]:
    env = mode_env(mode, endpoint)
    inf = await launcher.start(
        f"inference-{mode}",
        "services.inference",
        ["--model-path", str(model), "--grpc-port", "0", "--grace-seconds", "1", "--max-batch-size", "64"],
        workdir / mode,
        env=env,
    )
    inf_ready = await launcher.wait_ready(inf, 180)
    gw = await launcher.start(
        f"gateway-{mode}",
        "services.gateway",
        [
            "--http-port",
            "0",
            "--grpc-port",
            "0",
            "--grace-seconds",
            "1",
            "--store",
            "memory",
            "--max-stored-groups",
            "100000000",
            "--max-stored-bytes",
            str(1 << 40),
            "--inference",
            f"127.0.0.1:{inf_ready['grpc_port']}",
        ],
        workdir / mode,
        env=env,
    )
    gw_ready = await launcher.wait_ready(gw, 180)
    return [gw, inf], int(gw_ready["http_port"])


async def main_async(args: argparse.Namespace) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="clotho-tracing-bench-"))
    model = build_tiny_model(workdir / "model")
    group = {
        "tokens": [[7 + (i + j) % 30 for i in range(16)] for j in range(2)],
        "masks": [[-100] * 8 + [7 + (i + j) % 30 for i in range(8, 16)] for j in range(2)],
        "scores": [0.0, 1.0],
    }
    generate = {"input_ids": [7, 8, 9], "sampling_params": {"max_new_tokens": args.new_tokens, "temperature": 1.0}}
    results: dict[str, dict[str, list[float]]] = {m: {"ingest": [], "generate": []} for m in MODES}
    with otlp_receiver() as (receiver, endpoint):
        stacks: dict[str, tuple[list[launcher.Child], int]] = {}
        try:
            for mode in MODES:
                stacks[mode] = await start_stack(mode, endpoint, model, workdir)
            for r in range(args.rounds):
                order = MODES[r % 3 :] + MODES[: r % 3]
                for mode in order:
                    port = stacks[mode][1]
                    results[mode]["ingest"].append(
                        await throughput(
                            port, request_bytes("/scored_data", group, port), args.seconds, args.connections
                        )
                    )
                for mode in order:
                    port = stacks[mode][1]
                    results[mode]["generate"].append(
                        await throughput(
                            port, request_bytes("/generate", generate, port), args.seconds, args.connections
                        )
                    )
                print(json.dumps({"round": r, **{m: {k: v[-1] for k, v in results[m].items()} for m in MODES}}))
        finally:
            for children, _ in stacks.values():
                for child in children:
                    await launcher.stop(child)
        spans = len(receiver.find(lambda s: True))
    medians = {m: {k: statistics.median(v) for k, v in results[m].items()} for m in MODES}
    return {"medians_rps": medians, "rounds": results, "exported_spans": spans}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=4)
    args = p.parse_args()
    out = asyncio.run(main_async(args))
    print(json.dumps(out))
    medians = out["medians_rps"]
    print(f"\n| workload | {' | '.join(MODES)} | on cost | exporting cost |")
    print("|---|" + "---|" * (len(MODES) + 2))
    for work in ("ingest", "generate"):
        base = medians["off"][work]
        cells = " | ".join(f"{medians[m][work]:.0f}/s" for m in MODES)
        costs = " | ".join(f"{(1 - medians[m][work] / base) * 100:+.1f}%" for m in ("on", "exporting"))
        print(f"| {work} | {cells} | {costs} |")
    print(f"\nspans received by the OTLP receiver: {out['exported_spans']}")


if __name__ == "__main__":
    main()
