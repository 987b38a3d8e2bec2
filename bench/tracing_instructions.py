"""What tracing costs the gateway per ingest request, counted in instructions.

bench/tracing_overhead.py measures what a user sees (throughput, CPU per request) and
needs a quiet machine: on a shared one its quartiles span tens of percent. This bench
counts instructions instead, which repeat to within a fraction of a percent whatever
else runs: each stack's gateway runs under valgrind's callgrind (instrumentation off
until the load starts), an inference process with the tiny model behind it (not
measured), memory store. After a warm-up (and the gateway's start-up work), `--requests`
small `/scored_data` groups are posted over `--connections` keep-alive connections
while callgrind counts; the figure is the gateway's instructions (every thread, and
its main thread apart) per request. Modes, as tracing_overhead.py's:
  off        no OTEL_* set (the default)
  on         OTEL_TRACES_EXPORTER=none: spans recorded and sampled, exported nowhere
  exporting  OTLP/gRPC, 100% sampling, to a receiver (its own process, not counted);
             OTEL_BSP_SCHEDULE_DELAY is long, so batches leave full (2048 spans), as
             they do at the rates tracing_overhead.py drives (a batch fills in ~150 ms)
             and not at the rate valgrind allows.
`--baseline-src DIR` runs the same for another checkout of the repository (its C
extensions built in place: `python -c "from setuptools import setup; setup()"
build_ext --inplace` there) in the same run, side by side.

Instructions are not time: cache misses and IPC are not in them, so a cost here is a
lower bound of the CPU cost, and the relation to throughput is tracing_overhead.py's
to show. `--cache-sim` adds callgrind's simulated cache misses per request (first
level data, last level): the memory side of the cost, which in a served request (its
caches cooled by the HTTP server, the kernel and the client between two requests)
weighs more than in a tight loop. Needs valgrind (`apt-get install valgrind`).

    .venv/bin/python bench/tracing_instructions.py [--requests 4096] [--connections 16]
        [--modes off,on,exporting] [--baseline-src DIR] [--cache-sim] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))

from tracing_overhead import (
    GENERATE,
    GROUP,
    mode_env,
    read_response,
    request_bytes,
    settle,
    start_receiver,
    stop_receiver,
)

from services import launcher
from services.demo.tiny_model import build_tiny_model


def totals(path: Path) -> dict[str, int]:
    """The event counts of one callgrind output file (its `totals:` line, named by its
    `events:` line: Ir, and with --cache-sim the cache events; the `summary:` line is
    written at start-up, before any counting)."""
    names: list[str] = []
    found = None
    for line in path.read_text().splitlines():
        if line.startswith("events:"):
            names = line.split()[1:]
        elif line.startswith("totals:"):
            found = [int(x) for x in line.split()[1:]]
    if found is None:
        raise RuntimeError(f"no totals in {path}")
    return dict(zip(names, found, strict=False))


async def post_all(port: int, request: bytes, per_connection: int, connections: int) -> None:
    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for _ in range(per_connection):
                writer.write(request)
                status, head, _ = await read_response(reader)
                if status != 200:
                    raise RuntimeError(f"HTTP error: {head!r}")
        finally:
            writer.close()

    await asyncio.gather(*(one() for _ in range(connections)))


async def instrument(pid: int, state: str) -> None:
    """Turn callgrind's counting in process `pid` on or off."""
    proc = await asyncio.create_subprocess_exec(
        "callgrind_control", "-i", state, str(pid), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    if await proc.wait() != 0:
        raise RuntimeError(f"callgrind_control -i {state} {pid} failed")


async def start_counted(
    name: str,
    module: str,
    module_args: list[str],
    out_dir: Path,
    env: dict[str, str],
    tree: Path,
    args: argparse.Namespace,
) -> tuple[subprocess.Popen, dict]:
    """`python -m module` of `tree` under callgrind (counting off until `instrument`),
    and its ready event."""
    argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes"]
    if args.cache_sim:
        argv.append("--cache-sim=yes")
    argv += [f"--callgrind-out-file={out_dir / name}.callgrind.out", sys.executable, "-m", module, *module_args]
    with open(out_dir / f"{name}.log", "wb") as log:
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=log,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            cwd=tree,
            text=True,
        )
    assert proc.stdout is not None
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, proc.stdout.readline)
        if not line:
            raise RuntimeError(f"the {name} of {tree} exited; see {out_dir / name}.log")
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "ready":
            return proc, event


def counted(out_dir: Path, name: str) -> list[dict[str, int]]:
    """The event totals of each thread of a process start_counted ran (main thread first)."""
    return [totals(t) for t in sorted(out_dir.glob(f"{name}.callgrind.out-*"))]


async def measure(tree: Path, mode: str, endpoint: str, model: Path, work: Path, args: argparse.Namespace) -> dict:
    """Instructions per request of the gateway of `tree` in `mode`: all threads, main;
    with `--work generate` the inference process's too (all threads)."""
    env = mode_env(mode, endpoint)
    if mode == "exporting":
        env["OTEL_BSP_SCHEDULE_DELAY"] = "600000"  # batches leave when full (2048, the default)
        if args.work == "generate":
            # Full batches must leave inside the counted window (a /generate ends ~7
            # spans over the two processes; what waits at the end is not counted).
            env["OTEL_BSP_MAX_EXPORT_BATCH_SIZE"] = str(args.generate_batch)
    env["PYTHONPATH"] = str(tree)
    out_dir = work / f"{tree.name}-{mode}"
    out_dir.mkdir(parents=True, exist_ok=True)
    inference_args = ["--model-path", str(model), "--grpc-port", "0", "--grace-seconds", "1"]
    generate = args.work == "generate"
    procs: list[subprocess.Popen] = []
    inference = None
    try:
        if generate:  # the inference process is counted too
            proc, ready = await start_counted(
                "inference", "services.inference", inference_args, out_dir, env, tree, args
            )
            procs.append(proc)
        else:
            inference = await launcher.start(
                f"inference-{mode}", "services.inference", inference_args, out_dir, env=env
            )
            ready = await launcher.wait_ready(inference, 180)
        gateway_args = [
            "--http-port", "0", "--grpc-port", "0", "--grace-seconds", "1", "--store", "memory",
            "--max-stored-groups", "100000000", "--max-stored-bytes", str(1 << 40),
            "--inference", f"127.0.0.1:{ready['grpc_port']}", "--tokenizer-path", str(model),
        ]  # fmt: skip
        gateway, event = await start_counted("gateway", "services.gateway", gateway_args, out_dir, env, tree, args)
        procs.insert(0, gateway)
        port = int(event["http_port"])
        await settle(port, gateway.pid, request_bytes("/generate", GENERATE, port))
        request = request_bytes("/generate", GENERATE, port) if generate else request_bytes("/scored_data", GROUP, port)
        await post_all(port, request, 4 if generate else 32, args.connections)  # warm-up, not counted
        per_connection = args.requests // args.connections
        n = per_connection * args.connections
        for proc in procs:
            await instrument(proc.pid, "on")
        await post_all(port, request, per_connection, args.connections)
        for proc in procs:
            await instrument(proc.pid, "off")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(300)
        if inference is not None:
            await launcher.stop(inference)
    counts = counted(out_dir, "gateway")
    out: dict = {"all": sum(c["Ir"] for c in counts) / n, "main": counts[0]["Ir"] / n, "requests": n}
    if generate:
        out["inference"] = sum(c["Ir"] for c in counted(out_dir, "inference")) / n
    if args.cache_sim:  # misses per request, every thread: first level (data), last level (all)
        out["D1 misses"] = sum(c.get("D1mr", 0) + c.get("D1mw", 0) for c in counts) / n
        out["LL misses"] = sum(c.get(k, 0) for c in counts for k in ("ILmr", "DLmr", "DLmw")) / n
    return out


async def main_async(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="clotho-tracing-instructions-"))
    model = build_tiny_model(work / "model")
    receiver, endpoint = start_receiver()
    trees = {"this tree": REPO}
    if args.baseline_src is not None:
        trees = {"baseline": args.baseline_src.resolve(), **trees}
    results: dict[str, dict[str, dict]] = {}
    try:
        for label, tree in trees.items():
            for mode in args.modes.split(","):
                results.setdefault(label, {})[mode] = await measure(tree, mode, endpoint, model, work, args)
                print(json.dumps({"tree": label, "mode": mode, **results[label][mode]}), flush=True)
    finally:
        received = json.dumps(stop_receiver(receiver))
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nreceiver: {received}")
    what = "/generate (3 prompt tokens, 4 new)" if args.work == "generate" else "/scored_data (2 sequences x 16 tokens)"
    print(f"{args.requests} x {what} over {args.connections} connections\n")
    misses = ("D1 misses", "LL misses") if args.cache_sim else ()
    misses += ("inference",) if args.work == "generate" else ()
    print(
        "| tree | mode | gateway instructions/request (all threads) | main thread | cost over off (all) | (main) |"
        + "".join(f" {m}/request | (over off) |" for m in misses)
    )
    print("|---|---|---|---|---|---|" + "---|---|" * len(misses))
    for label, modes in results.items():
        off = modes.get("off")
        for mode, r in modes.items():
            cost = f"+{r['all'] / off['all'] - 1:.1%}" if off and mode != "off" else ""
            main = f"+{r['main'] / off['main'] - 1:.1%}" if off and mode != "off" else ""
            extra = "".join(
                f" {r[m]:.0f} | {f'{r[m] / off[m] - 1:+.1%}' if off and mode != 'off' else ''} |" for m in misses
            )
            print(f"| {label} | {mode} | {r['all'] / 1e3:.1f}k | {r['main'] / 1e3:.1f}k | {cost} | {main} |{extra}")
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=4096)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument(
        "--work",
        choices=("ingest", "generate"),
        default="ingest",
        help="the load: /scored_data, or /generate with the inference process counted too",
    )
    p.add_argument(
        "--generate-batch",
        type=int,
        default=128,
        help="with --work generate, the exporting stacks' OTEL_BSP_MAX_EXPORT_BATCH_SIZE: batches must fill and "
        "leave while counting (--requests x 5 inference spans, at least a few batches' worth)",
    )
    p.add_argument("--modes", default="off,on,exporting")
    p.add_argument("--baseline-src", type=Path, default=None, help="another checkout, its C extensions built")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--keep", action="store_true", help="keep the callgrind outputs")
    p.add_argument(
        "--cache-sim",
        action="store_true",
        help="also count cache misses per request (callgrind's simulated caches; about twice as slow)",
    )
    args = p.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("needs valgrind (apt-get install valgrind)")
    results = asyncio.run(main_async(args))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
