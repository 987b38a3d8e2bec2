"""What tracing costs per ingest request inside the gateway process, without HTTP.

The gateway app (memory store, no inference) answers `/scored_data` (a 2 x 16-token
group, as bench/tracing_overhead.py posts) called as ASGI straight from one coroutine,
so what is timed is the app and its tracing, not uvicorn or a client. Each request
runs in a task of its own, as uvicorn runs each request it reads (`--concurrency`
of them in flight). Each (tree, mode) runs in a fresh process (tracing is configured
once per process); the rounds alternate between them so drift on a shared machine
hits all alike:
  off        no OTEL_* set
  on         OTEL_TRACES_EXPORTER=none (every span recorded and sampled, exported nowhere)
  exporting  OTLP/gRPC, parentbased_always_on, to a receiver process
               (bench/tracing_overhead.py --serve-receiver, nice 10); a queue that
               holds the run, so no span is dropped (the count is printed)
  deferred   exporting, but the exporter thread holds off until the timed requests
               are done (batch and queue larger than the run, schedule past it), then
               exports them all: the export's own work, without the exporter thread
               running beside the requests (what `exporting` adds over it)
Figures, the median over rounds, in us per request:
  main   the main thread's CPU (time.thread_time)
  all    the process's CPU, every thread (the exporter's and gRPC's included), with
         the spans still queued at the end flushed and counted
`--tree` names source trees to compare (default: this one), e.g. `--tree /work/main
--tree .` puts main's code beside a branch's in one run (each tree's own built C
extensions are used).

    .venv/bin/python bench/tracing_inprocess.py [--requests 20000] [--rounds 5] [--gc on off]
        [--modes off on exporting deferred] [--concurrency 1] [--tree PATH ...]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
WARMUP = 2000  # requests before the timed ones, in each process
GROUP = {
    "tokens": [[7 + (i + j) % 30 for i in range(16)] for j in range(2)],
    "masks": [[-100] * 8 + [7 + (i + j) % 30 for i in range(8, 16)] for j in range(2)],
    "scores": [0.0, 1.0],
}


def child(requests: int, gc_on: bool, concurrency: int = 1) -> None:
    """One measurement in this process (its OTEL_* variables set by the parent)."""
    sys.path.insert(0, os.getcwd())
    from services.common import telemetry
    from services.gateway.generation.pool import InferencePool
    from services.gateway.http.app import create_app
    from services.gateway.trajectory import TrajectoryState

    telemetry.setup_tracing("clotho-gateway")
    app = create_app(TrajectoryState(), InferencePool([]), max_body_bytes=1 << 20)
    body = json.dumps(GROUP, separators=(",", ":")).encode()
    headers = [(b"host", b"gw"), (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    message = {"type": "http.request", "body": body, "more_body": False}

    async def receive() -> dict:
        return message

    statuses = []

    async def send(msg: dict) -> None:
        if msg["type"] == "http.response.start":
            statuses.append(msg["status"])

    def scope() -> dict:
        return {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/scored_data",
            "raw_path": b"/scored_data",
            "query_string": b"",
            "root_path": "",
            "headers": headers,
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
            "state": {},
        }

    async def one(n: int) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(n):
            # A task per request, as uvicorn's protocols start one for each request
            # they read. Awaited inline in one long-lived task instead, the requests
            # never return to the event loop, and that hid what the exporter thread
            # costs a server (~5 us per ingest request then, ~0 inline).
            await loop.create_task(app(scope(), receive, send))

    async def run(n: int) -> None:
        # `concurrency` requests in flight at once.
        await asyncio.gather(*(asyncio.ensure_future(one(n // concurrency)) for _ in range(concurrency)))

    async def start() -> None:
        # As the gateway's serve() does (a tree without it exports from a thread).
        if hasattr(telemetry, "export_on_loop"):
            telemetry.export_on_loop()

    async def stop() -> None:
        if hasattr(telemetry, "stop_loop_export"):
            await telemetry.stop_loop_export()

    loop = asyncio.new_event_loop()
    loop.run_until_complete(start())
    loop.run_until_complete(run(WARMUP))  # warm: caches, the fast entry, templates
    loop.run_until_complete(stop())
    telemetry.flush_tracing()
    loop.run_until_complete(start())
    if not gc_on:
        gc.collect()
        gc.disable()
    statuses.clear()
    t0, p0 = time.thread_time(), time.process_time()
    loop.run_until_complete(run(requests))
    t1 = time.thread_time()
    loop.run_until_complete(stop())
    telemetry.flush_tracing(30000)
    p1 = time.process_time()
    assert statuses == [200] * requests, set(statuses)
    print(json.dumps({"main": (t1 - t0) / requests * 1e6, "all": (p1 - p0) / requests * 1e6}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--gc", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--modes", nargs="+", default=["off", "on", "exporting", "deferred"])
    parser.add_argument("--tree", action="append", default=None)
    parser.add_argument("--concurrency", type=int, default=1, help="requests in flight at once (tasks)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.requests - args.requests % args.concurrency, args.gc == ["on"], args.concurrency)
        return
    trees = [str(Path(t).resolve()) for t in (args.tree or [str(HERE)])]
    from tracing_overhead import start_receiver, stop_receiver  # the parent's (its imports are heavy)

    receiver, endpoint = start_receiver()
    cleared = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    envs = {
        "off": cleared,
        "on": {**cleared, "OTEL_TRACES_EXPORTER": "none"},
        "exporting": {
            **cleared,
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_TRACES_SAMPLER": "parentbased_always_on",
            "OTEL_BSP_SCHEDULE_DELAY": "500",
            # Requests come faster here than the exporter sends their spans (~45k/s):
            # a queue that holds the run, so that none is dropped and every span's
            # export is in the figure.
            "OTEL_BSP_MAX_QUEUE_SIZE": str(4 * args.requests),
        },
    }
    envs["deferred"] = {
        **envs["exporting"],
        "OTEL_BSP_SCHEDULE_DELAY": "3600000",
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": str(4 * args.requests),  # a batch the run never fills
    }
    results: dict[tuple[str, str, str], list[dict]] = {}
    print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    try:
        for r in range(args.rounds):
            for gc_mode in args.gc:
                cells = [(t, m) for t in trees for m in args.modes]
                cells = cells[r % len(cells) :] + cells[: r % len(cells)]
                for tree, mode in cells:
                    env = {**envs[mode], "OMP_NUM_THREADS": "1", "PYTHONPATH": tree}
                    out = subprocess.run(
                        [sys.executable, __file__, "--child", "--requests", str(args.requests), "--gc", gc_mode]
                        + ["--concurrency", str(args.concurrency)],
                        cwd=tree,
                        env=env,
                        capture_output=True,
                        text=True,
                    )
                    if out.returncode:
                        sys.exit(out.stderr)
                    results.setdefault((tree, gc_mode, mode), []).append(json.loads(out.stdout.splitlines()[-1]))
    finally:
        received = stop_receiver(receiver)["spans"]
    # Every exported request's span (each process's warm-up's included) reached the receiver.
    per_process = sum(n - n % args.concurrency for n in (args.requests, WARMUP))
    runs = args.rounds * len(args.gc) * len(trees) * sum(m in ("exporting", "deferred") for m in args.modes)
    print(f"spans received: {received} of {runs * per_process}")
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"us per ingest request (median of {args.rounds} rounds of {args.requests}); main thread / all threads")
    print("| tree | gc | " + " | ".join(args.modes) + " |")
    print("|---|---|" + "---|" * len(args.modes))
    for tree in trees:
        for gc_mode in args.gc:
            cells = []
            base = None
            for mode in args.modes:
                rows = results[(tree, gc_mode, mode)]
                m = statistics.median(x["main"] for x in rows)
                a = statistics.median(x["all"] for x in rows)
                if base is None:
                    base = (m, a)
                    cells.append(f"{m:.1f} / {a:.1f}")
                else:
                    cells.append(f"{m:.1f} / {a:.1f} (+{m - base[0]:.1f} / +{a - base[1]:.1f})")
            print(f"| {tree} | {gc_mode} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
