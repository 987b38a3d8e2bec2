"""What tracing costs the inference process alone: Generate over gRPC, no gateway.

/generate's served throughput (bench/tracing_overhead.py) is decided by the inference
process (the gateway is well under one core busy), so its tracing cost is what shows
there; this bench measures that process by itself, faster (minutes) and without the
gateway's and HTTP client's share of the noise. One inference process per mode (the
tiny model, torch on one thread) runs at once:
  off        no OTEL_* set
  off-again  the same: the A/A pair, the run's noise floor
  on         OTEL_TRACES_EXPORTER=none: spans recorded and sampled, exported nowhere
  exporting  OTLP/gRPC, 100% sampling, to a receiver process
and `--baseline-src DIR` adds on@base and exporting@base (another checkout, its C
extensions built in place) in the same cycles. A gRPC client in this process keeps
`--concurrency` Generate calls in flight (3 prompt tokens, 4 new), sending the
gateway's `traceparent` to traced modes, and the load alternates between the
processes in `--seconds` slices over `--rounds` cycles (a cycle's order rotates), so
drift hits every mode alike. With 2+ CPUs the inference processes run on the first
and this client and the receiver on the last. Figures per mode over every slice: req/s
and the process's CPU (all threads, from schedstat) per request, each against off; and
each session's own req/s cost (`--sessions`, fresh processes each: a process's layout
moves it by a few percent).

    .venv/bin/python bench/tracing_inference.py [--sessions 4] [--rounds 24] [--seconds 0.3]
        [--concurrency 8] [--baseline-src DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench"), str(REPO / "tests")]

from grpc import aio
from tracing_overhead import cpu_seconds, mode_env, start_receiver, stop_receiver

from clotho.v1 import inference_service_pb2 as pb
from clotho.v1 import inference_service_pb2_grpc as pb_grpc
from services import launcher
from services.demo.tiny_model import build_tiny_model

TRACEPARENT = (("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),)
REQUEST = pb.GenerateRequest(input_ids=[7, 8, 9], sampling_params=pb.SamplingParams(max_new_tokens=4, temperature=1.0))


async def start(mode: str, endpoint: str, model: Path, workdir: Path, baseline: Path | None, cpus: set[int] | None):
    """An inference process for `mode` (its name ends in @base for the baseline's code)."""
    env = mode_env(mode.removesuffix("@base"), endpoint)
    if mode.endswith("@base"):
        assert baseline is not None
        env = {**env, "PYTHONPATH": str(baseline), "PYTHONSAFEPATH": "1"}
    child = await launcher.start(
        f"inference-{mode}",
        "services.inference",
        ["--model-path", str(model), "--grpc-port", "0", "--grace-seconds", "1", "--max-batch-size", "64"],
        workdir,
        env=env,
    )
    ready = await launcher.wait_ready(child, 180)
    if cpus is not None:
        for task in os.listdir(f"/proc/{child.proc.pid}/task"):
            os.sched_setaffinity(int(task), cpus)
    channel = aio.insecure_channel(f"127.0.0.1:{ready['grpc_port']}")
    return child, channel, pb_grpc.InferenceServiceStub(channel)


async def load(stub: pb_grpc.InferenceServiceStub, metadata, until: float, done: list[int]) -> None:
    while time.perf_counter() < until:
        async for _ in stub.Generate(REQUEST, metadata=metadata):
            pass
        done[0] += 1


async def main_async(args: argparse.Namespace) -> None:
    modes = ["off", "off-again", "on", "exporting"]
    if args.baseline_src is not None:
        modes += ["on@base", "exporting@base"]
    cpus = sorted(os.sched_getaffinity(0))
    inference_cpus = {cpus[0]} if len(cpus) >= 2 else None
    if inference_cpus is not None:  # this client, and the receiver it starts
        os.sched_setaffinity(0, {cpus[-1]})
    receiver, endpoint = start_receiver()
    workdir = Path(tempfile.mkdtemp(prefix="clotho-tracing-inference-"))
    model = build_tiny_model(workdir / "model")
    totals = {m: [0, 0.0, 0.0] for m in modes}  # requests, seconds, CPU seconds
    sessions: dict[str, list[float]] = {m: [] for m in modes}
    try:
        for session in range(args.sessions):
            procs = {}
            for m in modes:
                procs[m] = await start(
                    m, endpoint, model, workdir / f"session-{session}", args.baseline_src, inference_cpus
                )
            metadata = {m: None if m.startswith("off") else TRACEPARENT for m in modes}
            for m in modes:  # warm-up, not counted
                until = time.perf_counter() + 1.0
                await asyncio.gather(*[load(procs[m][2], metadata[m], until, [0]) for _ in range(args.concurrency)])
            own = {m: [0, 0.0] for m in modes}
            for r in range(args.rounds):
                for m in modes[r % len(modes) :] + modes[: r % len(modes)]:
                    pid = procs[m][0].proc.pid
                    done = [0]
                    c0, t0 = cpu_seconds(pid), time.perf_counter()
                    until = t0 + args.seconds
                    await asyncio.gather(
                        *[load(procs[m][2], metadata[m], until, done) for _ in range(args.concurrency)]
                    )
                    t1, c1 = time.perf_counter(), cpu_seconds(pid)
                    for acc in (totals[m], own[m]):
                        acc[0] += done[0]
                        acc[1] += t1 - t0
                    totals[m][2] += c1 - c0
            for m in modes:
                sessions[m].append(own[m][0] / own[m][1])
                await procs[m][1].close()
                await launcher.stop(procs[m][0])
            print(f"session {session}: " + " ".join(f"{m} {sessions[m][-1]:.0f}" for m in modes) + " req/s", flush=True)
    finally:
        stop_receiver(receiver)
    off_rps = totals["off"][0] / totals["off"][1]
    off_cpu = totals["off"][2] / totals["off"][0]
    print(
        f"\nGenerate over gRPC to the inference process alone; {args.sessions} sessions x {args.rounds} cycles x "
        f"{args.seconds} s per mode, {args.concurrency} calls in flight"
    )
    print("| mode | req/s | over off | CPU us/request | over off | req/s over off, each session |")
    print("|---|---|---|---|---|---|")
    for m in modes:
        n, seconds, cpu = totals[m]
        rps, per = n / seconds, cpu / n
        each = " ".join(f"{a / b - 1:+.1%}" for a, b in zip(sessions[m], sessions["off"]))
        print(f"| {m} | {rps:.0f} | {rps / off_rps - 1:+.1%} | {per * 1e6:.0f} | {per / off_cpu - 1:+.1%} | {each} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=4, help="fresh processes per mode, one session after another")
    p.add_argument("--rounds", type=int, default=24, help="cycles over the modes in each session")
    p.add_argument("--seconds", type=float, default=0.3, help="one slice of load on one mode")
    p.add_argument("--concurrency", type=int, default=8, help="Generate calls in flight")
    p.add_argument("--baseline-src", type=Path, default=None, help="another checkout, its C extensions built")
    args = p.parse_args()
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
