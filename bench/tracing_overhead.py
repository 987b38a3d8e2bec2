"""What tracing costs: gateway ingest (`/scored_data`) and `/generate` throughput with
tracing off, on and exporting, in one run.

Four stacks (an inference process with the tiny model and a gateway in front of it,
memory store: a request's least work, so tracing's largest share; `--store sqlite`
for the gateway's durable default) run side by side, differing only in their OTEL_* variables:
  off        none set: no SDK is installed (the default)
  off-again  the same as off: an A/A pair, whose difference is the run's noise floor
  on         OTEL_TRACES_EXPORTER=none: every span recorded and sampled, exported nowhere
  exporting  OTLP/gRPC, 100% sampling (parentbased_always_on), to a receiver
The receiver (opentelemetry-proto's TraceService) runs in a process of its own at nice
10 and only parses and counts what arrives: its CPU never shares the bench client's or
a gateway's interpreter, and the scheduler gives the services under test the cores
first; its CPU per request is reported apart.
The load alternates between the stacks in short slices (`--seconds` each; ABCD, BCDA,
... over `--rounds` cycles: drift on a shared machine hits every stack alike, and
noise faster than a slice averages out over many of them): `--connections`
keep-alive HTTP/1.1 connections per stack, opened once, post small `/scored_data`
groups (`ingest`: 2 sequences x 16 tokens, a request with almost no data, where a
span's fixed cost weighs most: the worst case), then groups of an Atropos
environment's default size (`ingest-large`: `--large-group`, 4 x 512 tokens; its
group_size is 4, its max_token_length 2048) -- between slices, not counted, the bench
takes what was stored as `/batch`es, as a registered trainer does, so the store stays
at a trained run's size -- then the same for `/generate` (3 prompt tokens, n=1,
`--new-tokens` tokens). The client is a raw
asyncio HTTP/1.1 loop on uvloop (pre-built request bytes), the same for every stack;
with `--ingest-rate` / `--generate-rate` it offers a fixed load (paced), so every
stack answers at the same rate and wakes as often (CPU per request depends on how
many requests one wake-up of the event loop serves). With `--pin` (the default on a
machine with 2+ CPUs) each gateway runs on the last CPU and everything else (the
client, the inference processes, the receiver) on the others: a gateway's threads
(its exporter's included) share one core, as they would at their busiest.
Figures per stack and workload, summed over the slices:
  req/s         throughput: requests answered over the time spent on that stack;
  CPU us/req    CPU time of the gateway process (all its threads, the exporter's
                included; from /proc/<pid>/task/*/schedstat) per request answered,
                and of its main thread alone: the cost tracing adds to each request,
                which competing load moves far less. For /generate the inference
                process's is shown too.
`--baseline-src DIR` adds stacks running another checkout's code (its C extensions
built in place: `python -c "from setuptools import setup; setup()" build_ext
--inplace` there) as `exporting@base` (and `--baseline-modes`), in the same cycles:
a change's cost and its baseline's from one run, on one machine state, and the
change itself: each such mode against its @base twin, paired by cycle, with its
interval.
All of it runs `--sessions` times, each with fresh processes: a process's memory
layout is luck that moves its speed by a few percent (on this 2-vCPU VM a session's
own cost spreads over +-10%), and one process per mode would show that luck as a
cost. To tell a change of a point or two, run many sessions of few modes: `--modes
exporting --baseline-modes exporting --sessions 30 --rounds 6` (~17 minutes).
Costs are each mode's total over off's, with a 90% bootstrap interval (sessions
resampled, then cycles within them), and each session's own cost; off-again's is the
A/A noise floor.
Printed with them: the load average before and after, each gateway's busy share of
one core (well under 1: the gateways are not starved by the client) and the bench
client's own CPU per request. Each stack's start-up work (the gateway loads its
tokenizer in the background) is waited out before the first slice; SIGTERM stops
the stacks as Ctrl-C does.

    .venv/bin/python bench/tracing_overhead.py [--sessions 3] [--rounds 40] [--seconds 0.3] [--connections 8]
        [--works ingest ingest-large generate] [--modes off-again on exporting] [--large-group 4x512]
        [--ingest-rate R] [--generate-rate R]
        [--store memory|sqlite] [--no-pin] [--json out.json]
        [--baseline-src DIR [--baseline-modes exporting on]]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
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
# --baseline-src: another checkout, whose stacks run as the modes named here + "@base".
BASELINE: Path | None = None


def scored_group(sequences: int, tokens: int) -> dict:
    """A scored group of `sequences` x `tokens` (the first half of each a masked prompt)."""
    half = tokens // 2
    return {
        "tokens": [[7 + (i + j) % 30 for i in range(tokens)] for j in range(sequences)],
        "masks": [[-100] * half + [7 + (i + j) % 30 for i in range(half, tokens)] for j in range(sequences)],
        "scores": [float(j % 2) for j in range(sequences)],
    }


# What the load posts: a small scored group (2 sequences x 16 tokens: what a request
# costs beyond its data, the worst case for tracing's share), a group of an Atropos
# environment's default size (`--large-group`, 4 x 512), a short /generate.
GROUP = scored_group(2, 16)
GENERATE: dict = {"input_ids": [7, 8, 9], "sampling_params": {"max_new_tokens": 4, "temperature": 1.0}}
WORKS = ("ingest", "ingest-large", "generate")


def mode_env(mode: str, endpoint: str) -> dict[str, str]:
    cleared = {k: "" for k in os.environ if k.startswith("OTEL_")}
    # This checkout's code (and its built C extensions), or the baseline's: named on
    # PYTHONPATH, not left to the interpreter's editable install (which points at the
    # checkout `pip install -e` ran in, not necessarily this one). PYTHONSAFEPATH:
    # `python -m` puts no working directory before PYTHONPATH.
    tree = REPO
    if mode.endswith("@base"):
        assert BASELINE is not None
        mode = mode.removesuffix("@base")
        tree = BASELINE
    base = {**cleared, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(tree), "PYTHONSAFEPATH": "1"}
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

    # Large requests too: tracing_inprocess.py's `deferred` mode exports a run at once.
    server = grpc.server(futures.ThreadPoolExecutor(2), options=[("grpc.max_receive_message_length", 1 << 28)])
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    for _ in sys.stdin:
        print(json.dumps({"spans": counts[0], "requests": counts[1]}), flush=True)
    server.stop(0)


def start_receiver() -> tuple[subprocess.Popen, str]:
    """The receiver process (serve_receiver) and its OTLP/gRPC endpoint; it inherits
    the caller's CPU affinity."""
    receiver = subprocess.Popen(
        [sys.executable, __file__, "--serve-receiver"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert receiver.stdout is not None and receiver.stdin is not None
    return receiver, f"http://127.0.0.1:{receiver.stdout.readline().strip()}"


def stop_receiver(receiver: subprocess.Popen) -> dict[str, int]:
    """Stop start_receiver's process: what it received ({"spans", "requests"})."""
    assert receiver.stdout is not None and receiver.stdin is not None
    receiver.stdin.write("\n")
    receiver.stdin.flush()
    received = json.loads(receiver.stdout.readline())
    receiver.stdin.close()
    receiver.wait(10)
    return received


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


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bytes]:
    """One HTTP/1.1 response off `reader` (its body by Content-Length): (status, head, body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    body = await reader.readexactly(length)
    return int(head.split(b" ", 2)[1]), head, body


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def post_until(conn: Connection, request: bytes, until: float, counts: list[int], interval: float = 0.0) -> None:
    """Post `request` on `conn` until `until`, one at a time; with an `interval`, at
    most one per interval (paced: a fixed offered load)."""
    reader, writer = conn
    due = time.perf_counter()
    while (now := time.perf_counter()) < until:
        if interval:
            due += interval
            if due > now:
                await asyncio.sleep(due - now)
            else:
                due = now  # behind: no burst to catch up
        writer.write(request)
        status, head, _ = await read_response(reader)
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {head!r}")
        counts[0] += 1


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


# A stack's connections idle longer than this (the other stacks' slices and their
# drains, which take seconds with ingest-large's groups) are opened anew before its
# next slice: uvicorn closes a keep-alive connection idle for 5 s.
IDLE_REOPEN = 4.0

REGISTRATION = {
    "wandb_group": "bench",
    "wandb_project": "bench",
    "batch_size": 1024,
    "max_token_len": 2048,
    "checkpoint_dir": "",
    "save_checkpoint_interval": 0,
    "starting_step": 0,
    "num_steps": 1 << 30,
}


async def exchange(conn: Connection, request: bytes) -> bytes:
    """One request on `conn`; the response's body."""
    reader, writer = conn
    writer.write(request)
    status, head, body = await read_response(reader)
    if status != 200:
        raise RuntimeError(f"HTTP {status}: {head!r} {body[:200]!r}")
    return body


async def drain(conn: Connection, port: int) -> None:
    """Take every full batch the stack's store holds (as a trainer would): the store
    stays the size a trained run keeps it at, not a heap that grows through the run
    (whose growing collections would be the noise)."""
    request = f"GET /batch HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    while json.loads(await exchange(conn, request)).get("batch") is not None:
        pass


# A slice's raw sums, per stack and workload: requests, seconds, then CPU seconds of
# the gateway (all threads), its main thread, the inference process, the receiver,
# and the bench client.
SUMS = ("requests", "seconds", "gateway", "gateway_main", "inference", "receiver", "client")


async def run_slice(
    conns: list[Connection], pids: list[int], request: bytes, seconds: float, rate: float = 0.0
) -> list[float]:
    """One slice of load on a stack's open connections: SUMS' values. `pids`: the
    gateway, the inference process, the receiver."""
    counts = [0]
    cpu0 = [cpu_seconds(pid) for pid in pids]
    main0 = cpu_seconds(pids[0], main_only=True)
    client0 = time.process_time()
    start = time.perf_counter()
    interval = len(conns) / rate if rate else 0.0
    await asyncio.gather(*(post_until(c, request, start + seconds, counts, interval) for c in conns))
    elapsed = time.perf_counter() - start
    client = time.process_time() - client0
    used = [cpu_seconds(pid) - c0 for pid, c0 in zip(pids, cpu0, strict=True)]
    main = cpu_seconds(pids[0], main_only=True) - main0
    return [counts[0], elapsed, used[0], main, used[1], used[2], client]


async def start_stack(
    mode: str, endpoint: str, model: Path, workdir: Path, gateway_cpus: set[int] | None, store: str = "memory"
) -> tuple[list[launcher.Child], int]:
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
            store,
            "--data-dir",
            str(workdir / mode / "store"),
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
    if gateway_cpus is not None:  # every thread the gateway has, and those it starts later
        for task in os.listdir(f"/proc/{gw.proc.pid}/task"):
            os.sched_setaffinity(int(task), gateway_cpus)
    return [gw, inf], int(gw_ready["http_port"])


def loadavg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def totals(slices: list[list[float]]) -> dict[str, float]:
    """The figures of a stack and workload over `slices` (each SUMS' values)."""
    n, seconds, gw, main, inf, rec, client = (sum(col) for col in zip(*slices, strict=True))
    n = max(n, 1)
    return {
        "rps": n / seconds,
        "gateway_us": gw / n * 1e6,
        "gateway_main_us": main / n * 1e6,
        "inference_us": inf / n * 1e6,
        "receiver_us": rec / n * 1e6,
        "gateway_busy": gw / seconds,
        "client_us": client / n * 1e6,
    }


COSTED = ("rps", "gateway_us", "gateway_main_us", "inference_us")


def bootstrap(mode: list[list[list[float]]], off: list[list[list[float]]], key: str, draws: int = 2000) -> list[float]:
    """A 90% interval of totals(mode)[key] / totals(off)[key]: sessions resampled, then
    cycles within each (a cycle's slices of the two stacks stay paired; a session's
    processes are its own, so their layout's luck is in the interval too)."""
    rng = random.Random(0)
    ratios = []
    for _ in range(draws):
        a: list[list[float]] = []
        b: list[list[float]] = []
        for _ in range(len(mode)):
            s = rng.randrange(len(mode))
            k = len(mode[s])
            for i in (rng.randrange(k) for _ in range(k)):
                a.append(mode[s][i])
                b.append(off[s][i])
        denominator = totals(b)[key]
        if denominator:
            ratios.append(totals(a)[key] / denominator)
    if not ratios:
        return [float("nan")] * 2
    ratios.sort()
    return [ratios[int(0.05 * len(ratios))], ratios[int(0.95 * len(ratios)) - 1]]


async def run_session(
    args: argparse.Namespace,
    session: int,
    endpoint: str,
    receiver_pid: int,
    model: Path,
    workdir: Path,
    gateway_cpus: set[int] | None,
    bodies: dict[str, tuple[str, dict]],
) -> tuple[dict[str, dict[str, list[list[float]]]], bool]:
    """One session: a fresh stack per mode (its own processes), `--rounds` cycles of
    slices over them, the stacks stopped. Its slices per mode and workload, and
    whether the exporting gateway dropped spans."""
    slices: dict[str, dict[str, list[list[float]]]] = {m: {w: [] for w in WORKS} for m in MODES}
    stacks: dict[str, tuple[list[launcher.Child], int]] = {}
    conns: dict[str, list[Connection]] = {}
    used: dict[str, float] = {}  # when each stack's connections last had a request
    try:
        for mode in MODES:
            stacks[mode] = await start_stack(
                mode, endpoint, model, workdir / f"session-{session}", gateway_cpus, args.store
            )
        # Every stack's start-up is waited out before any connection opens: an open
        # connection left idle longer than uvicorn's keep-alive timeout (5 s) is closed.
        for children, port in stacks.values():
            path, body = bodies["generate"]
            await settle(port, children[0].proc.pid, request_bytes(path, body, port))
        for mode, (children, port) in stacks.items():
            conns[mode] = [await asyncio.open_connection("127.0.0.1", port) for _ in range(args.connections)]
            await exchange(conns[mode][0], request_bytes("/register", REGISTRATION, port))
            for work in WORKS:  # a warm-up on each path, not counted
                path, body = bodies[work]
                await run_slice(conns[mode], [children[0].proc.pid] * 3, request_bytes(path, body, port), 0.3)
            await drain(conns[mode][0], port)
            used[mode] = time.monotonic()
        for r in range(args.rounds):
            k = r % len(MODES)
            order = MODES[k:] + MODES[:k]
            for work in WORKS:
                rate = {"ingest": args.ingest_rate, "generate": args.generate_rate}.get(work, 0.0)
                path, body = bodies[work]
                for mode in order:
                    children, port = stacks[mode]
                    pids = [c.proc.pid for c in children] + [receiver_pid]
                    if time.monotonic() - used[mode] > IDLE_REOPEN:  # not counted
                        for _, writer in conns[mode]:
                            writer.close()
                        conns[mode] = [await asyncio.open_connection("127.0.0.1", port) for _ in conns[mode]]
                    sums = await run_slice(conns[mode], pids, request_bytes(path, body, port), args.seconds, rate)
                    slices[mode][work].append(sums)
                    if work != "generate":  # not counted
                        await drain(conns[mode][0], port)
                    used[mode] = time.monotonic()
            if r % 10 == 9 or r == args.rounds - 1:
                so_far = {m: {w: round(totals(slices[m][w])["gateway_us"], 1) for w in WORKS} for m in MODES}
                print(
                    json.dumps({"session": session, "round": r, "loadavg": loadavg(), "gateway_us": so_far}), flush=True
                )
    finally:
        for mode_conns in conns.values():
            for _, writer in mode_conns:
                writer.close()
        for children, _ in stacks.values():
            for child in children:
                await launcher.stop(child)
    # The exporting gateway logs once when its span queue overflowed (spans dropped).
    children, _ = stacks["exporting"]
    return slices, "dropping spans" in children[0].log_path.read_text(errors="replace")


async def main_async(args: argparse.Namespace) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="clotho-tracing-bench-"))
    model = build_tiny_model(workdir / "model")
    generate = {**GENERATE, "sampling_params": {**GENERATE["sampling_params"], "max_new_tokens": args.new_tokens}}
    sequences, tokens = args.large_group
    bodies: dict[str, tuple[str, dict]] = {
        "ingest": ("/scored_data", GROUP),
        "ingest-large": ("/scored_data", scored_group(sequences, tokens)),
        "generate": ("/generate", generate),
    }
    cpus = sorted(os.sched_getaffinity(0))
    pin = args.pin and len(cpus) >= 2
    gateway_cpus, other_cpus = ({cpus[-1]}, set(cpus[:-1])) if pin else (None, None)
    if other_cpus is not None:  # this process, and the inference processes and receiver it starts
        os.sched_setaffinity(0, other_cpus)
    # slices[mode][work][session] = SUMS' values per cycle
    slices: dict[str, dict[str, list[list[list[float]]]]] = {m: {w: [] for w in WORKS} for m in MODES}
    receiver, endpoint = start_receiver()
    load_before = loadavg()
    dropped = False
    try:
        for session in range(args.sessions):
            session_slices, session_dropped = await run_session(
                args, session, endpoint, receiver.pid, model, workdir, gateway_cpus, bodies
            )
            dropped = dropped or session_dropped
            for m in MODES:
                for w in WORKS:
                    slices[m][w].append(session_slices[m][w])
    finally:
        received = stop_receiver(receiver)
    flat = {m: {w: [c for sess in slices[m][w] for c in sess] for w in WORKS} for m in MODES}
    figures = {m: {w: totals(flat[m][w]) for w in WORKS} for m in MODES}

    def against(m: str, other: str) -> dict[str, dict[str, list[float]]]:
        """Mode `m` over mode `other` per workload and figure: the ratio of the totals
        and its bootstrap interval (cycles paired)."""
        ratios: dict[str, dict[str, list[float]]] = {}
        for w in WORKS:
            ratios[w] = {}
            for key in COSTED:
                den = figures[other][w][key]
                ratio = figures[m][w][key] / den if den else float("nan")
                ratios[w][key] = [ratio, *bootstrap(slices[m][w], slices[other][w], key)]
        return ratios

    # Each mode against `off`; and a baseline's change: each mode of this tree against
    # the same mode @base (what a change costs or saves, with its own interval).
    costs = {m: against(m, "off") for m in MODES[1:]}
    changes = {m: against(m, f"{m}@base") for m in MODES if f"{m}@base" in MODES}
    # Each session's own cost (its processes' luck): gateway CPU per request over off's.
    per_session = {
        m: {
            w: [
                totals(ms)["gateway_us"] / totals(os_)["gateway_us"]
                for ms, os_ in zip(slices[m][w], slices["off"][w], strict=True)
            ]
            for w in WORKS
        }
        for m in MODES[1:]
    }
    return {
        "per_session": per_session,
        "figures": figures,
        "costs": costs,
        "changes": changes,
        "slices": slices,
        "received": received,
        "exporting_dropped_spans": dropped,
        "pinned": {"gateways": sorted(gateway_cpus), "others": sorted(other_cpus)}
        if gateway_cpus is not None and other_cpus is not None
        else None,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "args": vars(args),
    }


def table(out: dict) -> str:
    fig, costs = out["figures"], out["costs"]

    def percent(figure: list[float], sign: int = 1) -> str:
        """(ratio, lo, hi) as `sign` x (ratio - 1) [90% interval], in %."""
        ratio, lo, hi = figure
        lo, hi = sorted((sign * (lo - 1), sign * (hi - 1)))
        return f"{sign * (ratio - 1) * 100:+.1f}% [{lo * 100:+.1f}, {hi * 100:+.1f}]"

    def cost(m: str, w: str, key: str) -> str:
        """The cost against off: a drop for req/s, a rise for CPU."""
        return percent(costs[m][w][key], -1 if key == "rps" else 1)

    args = out["args"]
    pinned = out["pinned"]
    lines = [
        f"load average before {out['loadavg_before']}, after {out['loadavg_after']}; "
        f"{args['store']} store, {args['sessions']} sessions (fresh processes each) x {args['rounds']} cycles x {args['seconds']} s per mode "
        f"and workload, {args['connections']} connections; "
        + (f"gateways on CPU {pinned['gateways']}, the rest on {pinned['others']}" if pinned else "not pinned"),
        "cost: the mode's total over off's - 1 [90% bootstrap interval, sessions then cycles resampled]; "
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
            cells = " | ".join(f"{fig[m][w][key]:.0f}" for m in MODES)
            cost_cells = " | ".join(cost(m, w, key) for m in MODES[1:])
            lines.append(f"| {w} | {label} | {cells} | {cost_cells} |")
    lines.append("")
    for m, by_work in out["changes"].items():
        for w, by_key in by_work.items():
            each = "; ".join(f"{label} {percent(by_key[key])}" for key, label in rows[:2])
            lines.append(f"{w}: {m} against {m}@base (this tree's change, paired by cycle): {each}")
    for w in WORKS:
        each = "; ".join(
            f"{m} " + " ".join(f"{(r - 1) * 100:+.1f}%" for r in out["per_session"][m][w]) for m in MODES[1:]
        )
        lines.append(f"{w}: gateway CPU cost per session: {each}")
    for w in WORKS:
        busy = " ".join(f"{m} {fig[m][w]['gateway_busy']:.2f}" for m in MODES)
        client = " ".join(f"{m} {fig[m][w]['client_us']:.0f}" for m in MODES)
        lines.append(f"{w}: gateway busy (share of one core): {busy}; bench client CPU us/req: {client}")
    rec = fig["exporting"]
    lines.append(
        "receiver (own process, nice 10) CPU us per request: "
        + ", ".join(f"{w} {rec[w]['receiver_us']:.0f}" for w in WORKS)
        + f"; spans received {out['received']['spans']} in {out['received']['requests']} export requests"
        + (
            "; the exporting gateway DROPPED spans (its queue overflowed)"
            if out["exporting_dropped_spans"]
            else "; none dropped by the exporting gateway"
        )
    )
    return "\n".join(lines)


def shape(text: str) -> tuple[int, int]:
    """`SxT` -> (S, T)."""
    try:
        sequences, tokens = (int(n) for n in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected SEQUENCESxTOKENS, e.g. 4x512") from None
    if sequences < 1 or tokens < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: at least 1 sequence of 2 tokens")
    return sequences, tokens


def main() -> None:
    global WORKS, MODES, BASELINE
    if sys.argv[1:] == ["--serve-receiver"]:
        serve_receiver()
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=3, help="fresh stacks (processes) per mode, one after another")
    p.add_argument("--rounds", type=int, default=40, help="cycles over the stacks in each session")
    p.add_argument("--seconds", type=float, default=0.3, help="the length of one slice")
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
    p.add_argument(
        "--modes",
        nargs="+",
        choices=MODES[1:],
        default=list(MODES[1:]),
        help="the modes beside off (default all; exporting always): fewer modes, more sessions in the same time",
    )
    p.add_argument(
        "--store",
        choices=("memory", "sqlite"),
        default="memory",
        help="the gateways' trajectory store (default memory: a request's least work; sqlite is the gateway's default)",
    )
    p.add_argument(
        "--large-group",
        type=shape,
        default=(4, 512),
        metavar="SEQUENCESxTOKENS",
        help="the ingest-large group (default 4x512: Atropos' default group_size, half a max_token_length)",
    )
    p.add_argument(
        "--baseline-src",
        type=Path,
        help="another checkout (its C extensions built in place): its stacks run beside these as --baseline-modes@base",
    )
    p.add_argument("--baseline-modes", nargs="+", choices=MODES[2:], default=["exporting"])
    p.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="gateways on the last CPU, everything else on the others (default: on, with 2+ CPUs)",
    )
    args = p.parse_args()
    WORKS = tuple(args.works)
    if "exporting" not in args.modes:
        p.error("--modes: exporting is always run (the dropped-span check and the receiver's figures are its)")
    MODES = ("off", *(m for m in MODES[1:] if m in args.modes))
    if args.baseline_src is not None:
        BASELINE = args.baseline_src.resolve()
        MODES = (*MODES, *(f"{m}@base" for m in args.baseline_modes))
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
