"""What tracing costs: gateway ingest (`/scored_data`) and `/generate` throughput with
tracing off, on and exporting, in one run.

Four stacks (an inference process with the tiny model and a gateway in front of it,
memory store) run side by side, differing only in their OTEL_* variables:
  off        none set: no SDK is installed (the default)
  off-again  the same as off: an A/A pair, whose difference is the run's noise floor
  on         OTEL_TRACES_EXPORTER=none: every span recorded and sampled, exported nowhere
  exporting  OTLP/gRPC, 100% sampling (parentbased_always_on), to a receiver
The receiver (opentelemetry-proto's TraceService) runs in a process of its own at nice
10 and only parses and counts what arrives: its CPU never shares the bench client's or
a gateway's interpreter, and the scheduler gives the services under test the cores
first; its CPU per request is reported apart.
The load alternates between the stacks in many short rounds (ABCD, BCDA, ...: the
order rotates so drift on a shared machine hits all of them alike): for `--seconds`
each, `--connections` keep-alive HTTP/1.1 connections post small `/scored_data` groups
(2 sequences x 16 tokens: the per-request cost is the point), then the same for
`/generate` (3 prompt tokens, n=1, `--new-tokens` tokens). The client is a raw asyncio
HTTP/1.1 loop on uvloop (pre-built request bytes), the same for every stack; with
`--ingest-rate` / `--generate-rate` it offers a fixed load (paced), so every stack
answers at the same rate and wakes as often (CPU per request depends on how many
requests one wake-up of the event loop serves).
Figures per stack and workload, each the median over `--rounds` rounds:
  req/s         throughput: what a user sees, but on a busy machine it moves with
                everyone else's load;
  CPU us/req    CPU time of the gateway process (all its threads, the exporter's
                included; from /proc/<pid>/task/*/schedstat) per request answered,
                and of its main thread alone: the cost tracing adds to each request,
                which competing load moves far less. For /generate the inference
                process's is shown too.
Costs are paired: each round's figure over `off`'s in the same round, the median of
those ratios and their quartiles (the spread); off-again's is the A/A noise floor.
Printed with them: the load average before and after, each gateway's busy share of
one core (well under 1: the gateways are not starved by the client) and the bench
client's own CPU per request. Each stack's start-up work (the gateway loads its
tokenizer in the background) is waited out before the first round; SIGTERM stops
the stacks as Ctrl-C does.

    .venv/bin/python bench/tracing_overhead.py [--rounds 12] [--seconds 1.5] [--connections 8]
        [--works ingest generate] [--ingest-rate R] [--generate-rate R] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from otlp_receiver import export_env

from services import launcher
from services.demo.tiny_model import build_tiny_model

MODES = ("off", "off-again", "on", "exporting")
WORKS = ("ingest", "generate")
# Per round: req/s; gateway (all threads), gateway main thread, inference and receiver
# CPU us per request; the gateway's busy share of one core; the bench client's CPU us
# per request.
FIGURES = ("rps", "gateway_us", "gateway_main_us", "inference_us", "receiver_us", "gateway_busy", "client_us")


def mode_env(mode: str, endpoint: str) -> dict[str, str]:
    cleared = {k: "" for k in os.environ if k.startswith("OTEL_")}
    base = {**cleared, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if mode in ("off", "off-again"):
        return base
    if mode == "on":
        return {**base, "OTEL_TRACES_EXPORTER": "none"}
    # The batch processor's defaults but for the delay: spans leave within 0.5 s.
    return {**base, **export_env(endpoint, OTEL_BSP_SCHEDULE_DELAY="500")}


def serve_receiver() -> None:
    """The receiver process: OTLP/gRPC Export, each request parsed (C protobuf) and its
    spans counted; prints its port, then a count per line of stdin it reads."""
    from concurrent import futures

    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    os.nice(10)
    counts = [0, 0]  # spans, requests

    class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):  # type: ignore[no-untyped-def]
            counts[0] += sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
            counts[1] += 1
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    for _ in sys.stdin:
        print(json.dumps({"spans": counts[0], "requests": counts[1]}), flush=True)
    server.stop(0)


def cpu_seconds(pid: int, main_only: bool = False) -> float:
    """CPU time of every thread of `pid` so far, or of its main thread only
    (schedstat: nanoseconds on a CPU)."""
    total = 0
    for task in [str(pid)] if main_only else os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total / 1e9


def request_bytes(path: str, body: dict, port: int) -> bytes:
    data = json.dumps(body, separators=(",", ":")).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    ).encode()
    return head + data


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One HTTP/1.1 response off `reader` (its body by Content-Length): (status, head)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    await reader.readexactly(length)
    return int(head.split(b" ", 2)[1]), head


async def one_connection(port: int, request: bytes, until: float, counts: list[int], interval: float = 0.0) -> None:
    """Post `request` until `until`, one at a time; with an `interval`, at most one
    per interval (paced: a fixed offered load)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        due = time.perf_counter()
        while (now := time.perf_counter()) < until:
            if interval:
                due += interval
                if due > now:
                    await asyncio.sleep(due - now)
                else:
                    due = now  # behind: no burst to catch up
            writer.write(request)
            status, head = await read_response(reader)
            if status != 200:
                raise RuntimeError(f"HTTP {status}: {head!r}")
            counts[0] += 1
    finally:
        writer.close()


async def settle(port: int, pid: int, request: bytes) -> None:
    """Wait out a new stack's start-up work: one `/generate` (it needs the tokenizer,
    which the gateway loads in the background after it is ready: importing it costs
    seconds of CPU that would land in the first round), then until the gateway's
    CPU is quiet (under 5% of a core over half a second, at most 30 s)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await read_response(reader)
    finally:
        writer.close()
    deadline = time.perf_counter() + 30
    while time.perf_counter() < deadline:
        c0 = cpu_seconds(pid)
        await asyncio.sleep(0.5)
        if cpu_seconds(pid) - c0 < 0.025:
            return


async def measure(
    port: int, pids: list[int], request: bytes, seconds: float, connections: int, rate: float = 0.0
) -> tuple[float, list[float], float, float]:
    """Requests per second; the CPU microseconds per request of the first of `pids`
    (the gateway), of its main thread alone, then of each other pid; the gateway's
    busy share of a core over the window; the bench client's own CPU microseconds per
    request (this process)."""
    # A short warm-up on the same path, not counted.
    await asyncio.gather(*(one_connection(port, request, time.perf_counter() + 0.2, [0]) for _ in range(2)))
    counts = [0]
    cpu0 = [cpu_seconds(pid) for pid in pids]
    main0 = cpu_seconds(pids[0], main_only=True)
    client0 = time.process_time()
    start = time.perf_counter()
    until = start + seconds
    interval = connections / rate if rate else 0.0
    await asyncio.gather(*(one_connection(port, request, until, counts, interval) for _ in range(connections)))
    elapsed = time.perf_counter() - start
    client = time.process_time() - client0
    used = [cpu_seconds(pid) - c0 for pid, c0 in zip(pids, cpu0, strict=True)]
    used.insert(1, cpu_seconds(pids[0], main_only=True) - main0)
    n = max(counts[0], 1)
    return counts[0] / elapsed, [u / n * 1e6 for u in used], used[0] / elapsed, client / n * 1e6


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
            "--tokenizer-path",
            str(model),
        ],
        workdir / mode,
        env=env,
    )
    gw_ready = await launcher.wait_ready(gw, 180)
    return [gw, inf], int(gw_ready["http_port"])


def quartiles(values: list[float]) -> list[float]:
    """[first quartile, median, third quartile]."""
    if len(values) < 2:
        return [values[0]] * 3 if values else [float("nan")] * 3
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return [q1, q2, q3]


def loadavg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


async def main_async(args: argparse.Namespace) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="clotho-tracing-bench-"))
    model = build_tiny_model(workdir / "model")
    group = {
        "tokens": [[7 + (i + j) % 30 for i in range(16)] for j in range(2)],
        "masks": [[-100] * 8 + [7 + (i + j) % 30 for i in range(8, 16)] for j in range(2)],
        "scores": [0.0, 1.0],
    }
    generate = {"input_ids": [7, 8, 9], "sampling_params": {"max_new_tokens": args.new_tokens, "temperature": 1.0}}
    bodies: dict[str, tuple[str, dict]] = {"ingest": ("/scored_data", group), "generate": ("/generate", generate)}
    # results[mode][work][figure] = one value per round (FIGURES)
    results: dict[str, dict[str, dict[str, list[float]]]] = {
        m: {w: {k: [] for k in FIGURES} for w in WORKS} for m in MODES
    }
    receiver = subprocess.Popen(
        [sys.executable, __file__, "--serve-receiver"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert receiver.stdout is not None and receiver.stdin is not None
    endpoint = f"http://127.0.0.1:{receiver.stdout.readline().strip()}"
    load_before = loadavg()
    stacks: dict[str, tuple[list[launcher.Child], int]] = {}
    try:
        for mode in MODES:
            stacks[mode] = await start_stack(mode, endpoint, model, workdir)
        for children, port in stacks.values():
            path, body = bodies["generate"]
            await settle(port, children[0].proc.pid, request_bytes(path, body, port))
        for r in range(args.rounds):
            k = r % len(MODES)
            order = MODES[k:] + MODES[:k]
            for work in WORKS:
                for mode in order:
                    children, port = stacks[mode]
                    path, body = bodies[work]
                    pids = [c.proc.pid for c in children] + [receiver.pid]
                    rate = args.ingest_rate if work == "ingest" else args.generate_rate
                    rps, (gw_us, main_us, inf_us, rec_us), busy, client_us = await measure(
                        port, pids, request_bytes(path, body, port), args.seconds, args.connections, rate
                    )
                    cell = results[mode][work]
                    figures = (rps, gw_us, main_us, inf_us, rec_us, busy, client_us)
                    for key, value in zip(FIGURES, figures, strict=True):
                        cell[key].append(value)
            print(
                json.dumps(
                    {
                        "round": r,
                        "loadavg": loadavg(),
                        **{
                            m: {w: [round(results[m][w][k][-1], 2) for k in ("rps", "gateway_us")] for w in WORKS}
                            for m in MODES
                        },
                    }
                ),
                flush=True,
            )
    finally:
        for children, _ in stacks.values():
            for child in children:
                await launcher.stop(child)
        receiver.stdin.write("\n")
        receiver.stdin.flush()
        received = json.loads(receiver.stdout.readline())
        receiver.stdin.close()
        receiver.wait(10)
    medians = {m: {w: {k: statistics.median(v) for k, v in results[m][w].items()} for w in WORKS} for m in MODES}
    # Each mode against `off` round by round (the same round: the same moment's load),
    # as the median and quartiles of the per-round ratios.
    paired: dict[str, dict[str, dict[str, list[float]]]] = {}
    for m in MODES[1:]:
        paired[m] = {}
        for w in WORKS:
            paired[m][w] = {}
            for key in ("rps", "gateway_us", "gateway_main_us", "inference_us"):
                ratios = [v / b for v, b in zip(results[m][w][key], results["off"][w][key], strict=True) if b]
                paired[m][w][key] = quartiles(ratios)
    return {
        "medians": medians,
        "paired": paired,
        "rounds": results,
        "received": received,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "args": vars(args),
    }


def table(out: dict) -> str:
    med, paired = out["medians"], out["paired"]

    def cost(m: str, w: str, key: str) -> str:
        """The paired cost against off: median of the per-round ratios, and their
        quartiles (the spread); a drop for req/s, a rise for CPU."""
        q1, q2, q3 = paired[m][w][key]
        sign = -1 if key == "rps" else 1
        lo, hi = sorted((sign * (q1 - 1), sign * (q3 - 1)))
        return f"{sign * (q2 - 1) * 100:+.1f}% [{lo * 100:+.1f}, {hi * 100:+.1f}]"

    args = out["args"]
    lines = [
        f"load average before {out['loadavg_before']}, after {out['loadavg_after']}; "
        f"{args['rounds']} rounds x {args['seconds']} s per mode and workload, {args['connections']} connections",
        "cost: the median over rounds of (mode / off in the same round) - 1, [quartiles]; "
        "req/s cost is the drop, CPU cost the rise; off-again's is the A/A noise",
        "",
        "| workload | figure | " + " | ".join(MODES) + " | " + " | ".join(f"{m} cost" for m in MODES[1:]) + " |",
        "|---|---|" + "---|" * (2 * len(MODES) - 1),
    ]
    rows = [
        ("rps", "req/s"),
        ("gateway_us", "gateway CPU us/req"),
        ("gateway_main_us", "(its main thread)"),
    ]
    for w in WORKS:
        for key, label in rows + ([("inference_us", "inference CPU us/req")] if w == "generate" else []):
            cells = " | ".join(f"{med[m][w][key]:.0f}" for m in MODES)
            costs = " | ".join(cost(m, w, key) for m in MODES[1:])
            lines.append(f"| {w} | {label} | {cells} | {costs} |")
    lines.append("")
    for w in WORKS:
        busy = " ".join(f"{m} {med[m][w]['gateway_busy']:.2f}" for m in MODES)
        client = " ".join(f"{m} {med[m][w]['client_us']:.0f}" for m in MODES)
        lines.append(f"{w}: gateway busy (share of one core): {busy}; bench client CPU us/req: {client}")
    rec = med["exporting"]
    lines.append(
        "receiver (own process, nice 10) CPU us per request: "
        + ", ".join(f"{w} {rec[w]['receiver_us']:.0f}" for w in WORKS)
        + f"; spans received {out['received']['spans']} in {out['received']['requests']} export requests"
    )
    return "\n".join(lines)


def main() -> None:
    global WORKS
    if sys.argv[1:] == ["--serve-receiver"]:
        serve_receiver()
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--seconds", type=float, default=1.5)
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=4)
    p.add_argument("--json", type=Path, help="also write every figure here")
    p.add_argument(
        "--ingest-rate",
        type=float,
        default=0.0,
        help="offer this many /scored_data requests per second (paced; default 0: as fast as answered)",
    )
    p.add_argument("--generate-rate", type=float, default=0.0, help="the same for /generate")
    p.add_argument("--works", nargs="+", choices=WORKS, default=list(WORKS), help="the workloads to run")
    args = p.parse_args()
    WORKS = tuple(args.works)
    # SIGTERM (a timeout) unwinds like Ctrl-C: the stacks are stopped, not orphaned.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:  # the client's own CPU per request is lower on uvloop, as the services' is
        import uvloop

        out = uvloop.run(main_async(args))
    except ImportError:
        out = asyncio.run(main_async(args))
    print()
    print(table(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
