"""What a traced gRPC call's server span costs the inference process, warm and cold.

In the torch engine's process a request's tracing work does not run warm: between two
calls the model's forward pass has run over its weights and activations and evicted
the span path's code and data from every cache, so each Python layer on that path
costs several times what a tight loop of it shows (and instruction counts,
bench/tracing_instructions.py, show neither). This bench times the server span of
one InferenceService/Generate call (opened from the call's metadata -- the gateway's
user agent and traceparent --, made current, closed with its status: what the
handler wrapper of services/common/method_handlers.py does per call) two ways in the
same process:
  warm  the path in a loop, nothing in between;
  cold  the path once after each forward pass of the tiny model (8 sequences x 8
        tokens, torch on one thread), as the engine's worker leaves the caches.
Tracing is set up by services.common.telemetry from OTEL_* as a service is:
OTEL_TRACES_EXPORTER=none (spans recorded, exported nowhere; `--exporting` sends them
over OTLP/gRPC to a receiver process, the ended span written into the sink's buffer).
Each tree (this one, and `--baseline-src DIR`: another checkout, its C extensions
built in place) runs in fresh processes, alternating over `--rounds`; the figures are
medians over every timed call of a tree, side by side in one run.

    .venv/bin/python bench/tracing_cold.py [--rounds 6] [--calls 300] [--exporting] [--baseline-src DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHOD = "/clotho.v1.InferenceService/Generate"
METADATA = (
    ("user-agent", "grpc-python-asyncio/1.85.4 grpc-c/50.0.0 (linux; chttp2)"),
    ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
)


class Context:
    """The servicer context as the span path reads it."""

    def invocation_metadata(self) -> tuple:
        return METADATA

    def code(self) -> None:
        return None

    def details(self) -> str:
        return ""


def span_path():  # type: ignore[no-untyped-def]
    """A call's server span opened and closed the way this tree's servers do."""
    from services.common import server_rpc_span

    context = Context()
    method_spans = getattr(server_rpc_span, "method_spans", None)
    if method_spans is not None:  # handlers wrapped once (method_handlers)
        spans = method_spans(METHOD)
        close = server_rpc_span.close

        def call() -> None:
            close(spans.open(context), context, None)

        return call
    # Trees before it: the ServerSpans interceptor's per-call open and close.
    from services.common.client_span import rpc_method

    _, attributes, _ = rpc_method(METHOD)
    open_, close_ = server_rpc_span._open, server_rpc_span._close

    def old_call() -> None:
        span, token = open_(METHOD, attributes, METADATA)
        close_(span, token, context, None)

    return old_call


def measure(calls: int, model_dir: str) -> dict:
    """One process's timings (this process runs one tree)."""
    import torch
    from transformers import AutoModelForCausalLM

    from services.common import telemetry

    torch.set_num_threads(1)
    telemetry.setup_tracing("clotho-inference")
    assert telemetry.enabled
    call = span_path()
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokens = torch.randint(0, model.config.vocab_size, (8, 8))
    clock = time.perf_counter_ns
    for _ in range(200):
        call()
    warm = []
    for _ in range(calls):
        t0 = clock()
        for _ in range(10):
            call()
        warm.append((clock() - t0) / 10)
    cold, forward = [], []
    with torch.no_grad():
        for _ in range(calls):
            t0 = clock()
            model(tokens)
            t1 = clock()
            call()
            cold.append(clock() - t1)
            forward.append(t1 - t0)
    telemetry.shutdown_tracing()
    return {"warm": warm, "cold": cold, "forward": forward}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=6, help="fresh processes per tree, alternating")
    p.add_argument("--calls", type=int, default=300, help="timed calls per process, warm and cold each")
    p.add_argument("--exporting", action="store_true", help="export over OTLP/gRPC to a receiver process")
    p.add_argument("--baseline-src", type=Path, default=None, help="another checkout, its C extensions built")
    p.add_argument("--measure", nargs=2, metavar=("CALLS", "MODEL"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(int(args.measure[0]), args.measure[1])))
        return
    sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "bench")]
    from otlp_receiver import export_env
    from tracing_overhead import start_receiver, stop_receiver

    from services.demo.tiny_model import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="clotho-tracing-cold-"))
    model = build_tiny_model(work / "model")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", OTEL_TRACES_EXPORTER="none")
    receiver = None
    if args.exporting:
        receiver, endpoint = start_receiver()
        env.update(export_env(endpoint))
    trees = {"this tree": REPO}
    if args.baseline_src is not None:
        trees["baseline"] = args.baseline_src.resolve()
    samples: dict[str, dict[str, list[float]]] = {t: {"warm": [], "cold": [], "forward": []} for t in trees}
    try:
        for r in range(args.rounds):
            order = list(trees) if r % 2 == 0 else list(trees)[::-1]
            for tree in order:
                run_env = {**env, "PYTHONPATH": str(trees[tree]), "PYTHONSAFEPATH": "1"}
                out = subprocess.run(
                    [sys.executable, __file__, "--measure", str(args.calls), str(model)],
                    env=run_env,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                got = json.loads(out.stdout.strip().splitlines()[-1])
                for key in samples[tree]:
                    samples[tree][key].extend(got[key])
    finally:
        if receiver is not None:
            stop_receiver(receiver)
    mode = "exporting (OTLP/gRPC)" if args.exporting else "on (OTEL_TRACES_EXPORTER=none)"
    print(f"\nserver span of one {METHOD} call, tracing {mode}; {args.rounds} processes per tree x {args.calls} calls")
    print("| tree | warm us (median) | cold us, after a forward pass (median) | cold / warm | forward pass ms |")
    print("|---|---|---|---|---|")
    for tree, s in samples.items():
        warm, cold = statistics.median(s["warm"]) / 1e3, statistics.median(s["cold"]) / 1e3
        forward = statistics.median(s["forward"]) / 1e6
        print(f"| {tree} | {warm:.1f} | {cold:.1f} | {cold / warm:.1f}x | {forward:.2f} |")


if __name__ == "__main__":
    main()
