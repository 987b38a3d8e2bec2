"""The gateway against Atropos' own trajectory API (`run-api`), same load, one run.

Starts atroposlib's `run-api` (its defaults but for --host/--port: 127.0.0.1 and a
free port) and the gateway (durable store on, in a fresh data directory), then runs
the shared load generator (../shared/bench/atropos_load.py: concurrent /scored_data
posts, then a /batch drain of the deep queue they leave) against each, alternating
which goes first in each round. Then, on the gateway alone, the latency of /batch and
of StreamBatches at 100 and at 100,000 queued groups, and the load client's own floor
for /batch: its p50 against a server process that answers the same bytes at once (the
client's json.loads of a 264 KB batch is most of any server's /batch figure).

Prints one JSON line with every figure and a table with the ratios.

    .venv/bin/python bench/gateway_vs_atropos.py [--groups 2000] [--rounds 2] [--deep 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from grpc import aio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "clients" / "python"))

from clotho.v1 import gateway_service_pb2 as gpb
from clotho.v1 import gateway_service_pb2_grpc as gpb_grpc

DEFAULT_LOAD = REPO.parent / "shared" / "bench" / "atropos_load.py"
READY_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_api_command(port: int) -> list[str]:
    """atroposlib's console script (`run-api`), else its main() through Python."""
    script = Path(sys.executable).with_name("run-api")
    if script.exists():
        return [str(script), "--host", "127.0.0.1", "--port", str(port)]
    return [
        sys.executable,
        "-c",
        "from atroposlib.cli.run_api import main; main()",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


@contextlib.contextmanager
def server(name: str, command: list[str], url: str, log_dir: Path):
    """Run a server process until the block ends; wait until it answers GET /."""
    log = open(log_dir / f"{name}.log", "wb")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see {log_dir / name}.log")
            try:
                if httpx.get(f"{url}/", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not answer within {READY_TIMEOUT:.0f}s")
            time.sleep(0.2)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_load(load: Path, url: str, server_pid: int, args: argparse.Namespace) -> dict:
    before = cpu_seconds(server_pid)
    out = subprocess.run(
        [
            sys.executable,
            str(load),
            url,
            "--groups",
            str(args.groups),
            "--group-size",
            str(args.group_size),
            "--tokens",
            str(args.tokens),
            "--concurrency",
            str(args.concurrency),
            "--batch-size",
            str(args.batch_size),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    after = cpu_seconds(server_pid)
    # The server's own CPU per group (ingest and drain): what the load cost it, less
    # sensitive than rates to what else the machine runs.
    result["server_cpu_ms_per_group"] = round((after - before) * 1000 / args.groups, 3) if before is not None else None
    return result


FIGURES = (
    "ingest_groups_per_s",
    "post_p50_ms",
    "post_p99_ms",
    "batch_p50_ms",
    "first_batch_ms",
    "drain_s",
    "server_cpu_ms_per_group",
)


def median_of(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


# -- the load client's own floor for /batch ------------------------------------

STATIC_SERVER = """
import sys, uvicorn
body = open(sys.argv[1], "rb").read()
headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning", loop="uvloop", http="httptools")
"""


def load_group(size: int, tokens: int, env_id: int) -> dict:
    """A group shaped as atropos_load.py's (that script runs when imported)."""
    toks = [[random.randrange(32000) for _ in range(tokens)] for _ in range(size)]
    return {
        "tokens": toks,
        "masks": [[-100] * (tokens // 2) + row[tokens // 2 :] for row in toks],
        "scores": [random.choice([0.0, 1.0]) for _ in range(size)],
        "inference_logprobs": [[-0.5] * tokens for _ in range(size)],
        "env_id": env_id,
    }


async def a_batch_body(url: str, args: argparse.Namespace) -> bytes:
    """One full /batch reply from the gateway (uncompressed), of the load's shape."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        await http.get("/reset_data")
        await http.post(
            "/register",
            json={
                "wandb_group": "g",
                "wandb_project": "p",
                "batch_size": args.batch_size,
                "max_token_len": 4096,
                "checkpoint_dir": "ckpt",
                "save_checkpoint_interval": 100,
                "starting_step": 0,
                "num_steps": 10**6,
            },
        )
        await http.get("/batch")
        env = (
            await http.post(
                "/register-env",
                json={
                    "max_token_length": 4096,
                    "desired_name": "floor",
                    "weight": 1.0,
                    "group_size": args.group_size,
                },
            )
        ).json()
        for _ in range(args.batch_size // args.group_size):
            r = await http.post("/scored_data", json=load_group(args.group_size, args.tokens, env["env_id"]))
            r.raise_for_status()
        body = (await http.get("/batch", headers={"accept-encoding": "identity"})).content
        await http.get("/reset_data")
    assert json.loads(body)["batch"], "no batch formed"
    return body


async def client_floor(body: bytes, work: Path, calls: int = 200) -> float:
    """/batch p50 (ms) of the load client (aiohttp, `await r.json()`) against a server
    process that answers the same bytes at once: what no server can beat."""
    import aiohttp

    path = work / "batch.json"
    path.write_bytes(body)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", STATIC_SERVER, str(path), str(port)])
    try:
        url = f"http://127.0.0.1:{port}/batch"
        async with aiohttp.ClientSession() as s:
            for _ in range(100):
                try:
                    await (await s.get(url)).read()
                    break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
            ms = []
            for _ in range(calls):
                t0 = time.perf_counter()
                r = await s.get(url)
                await r.json()
                ms.append((time.perf_counter() - t0) * 1000)
    finally:
        proc.terminate()
        proc.wait()
    return round(statistics.median(ms), 2)


# -- the gateway alone at 100 and 100,000 queued groups ------------------------


def small_group(tag: int, env_id: int, size: int, tokens: int) -> dict:
    row = [tag % 30000 + i for i in range(tokens)]
    return {
        "tokens": [row] * size,
        "masks": [[-100] * (tokens // 2) + row[tokens // 2 :]] * size,
        "scores": [1.0] * size,
        "env_id": env_id,
    }


async def fill(http: httpx.AsyncClient, groups: int, env_id: int, args: argparse.Namespace) -> None:
    """Queue `groups` small groups, 500 per /scored_data_list, 4 requests at a time."""
    chunks = [range(i, min(i + 500, groups)) for i in range(0, groups, 500)]
    sem = asyncio.Semaphore(4)

    async def post(chunk: range) -> None:
        async with sem:
            body = [small_group(t, env_id, args.group_size, 16) for t in chunk]
            r = await http.post("/scored_data_list", json=body)
            r.raise_for_status()

    await asyncio.gather(*(post(c) for c in chunks))


async def depth_figures(url: str, grpc_target: str, depth: int, calls: int, args: argparse.Namespace) -> dict:
    """Queue `depth` groups, then time `calls` StreamBatches batches (formed one per
    credit) and then `calls` /batch calls (the first forms every remaining batch, as
    Atropos does; the rest hand out those)."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as http, aio.insecure_channel(grpc_target) as channel:
        await http.get("/reset_data")
        await http.post(
            "/register",
            json={
                "wandb_group": "g",
                "wandb_project": "p",
                "batch_size": args.batch_size,
                "max_token_len": 4096,
                "checkpoint_dir": "ckpt",
                "save_checkpoint_interval": 100,
                "starting_step": 0,
                "num_steps": 10**6,
            },
        )
        await http.get("/batch")
        env = (
            await http.post(
                "/register-env",
                json={
                    "max_token_length": 4096,
                    "desired_name": "deep",
                    "weight": 1.0,
                    "group_size": args.group_size,
                },
            )
        ).json()
        await fill(http, depth, env["env_id"], args)
        queued = (await http.get("/status")).json()["queue_size"]
        # Let the store's background checkpoint copy what the fill wrote (up to
        # hundreds of MB at depth) so it does not compete with what is measured.
        await asyncio.sleep(args.settle)

        stub = gpb_grpc.GatewayServiceStub(channel)
        call = stub.StreamBatches()
        stream_ms = []
        for _ in range(calls):
            t0 = time.perf_counter()
            await call.write(gpb.StreamBatchesRequest(credits=1))
            await call.read()
            stream_ms.append((time.perf_counter() - t0) * 1000)
        call.cancel()

        batch_ms = []
        for _ in range(calls):
            t0 = time.perf_counter()
            r = await http.get("/batch")
            body = r.content
            batch_ms.append((time.perf_counter() - t0) * 1000)
            assert json.loads(body)["batch"], "the queue ran dry"
        await http.get("/reset_data")
    return {
        "queued_groups": queued,
        "stream_batch_p50_ms": round(statistics.median(stream_ms), 2),
        "batch_p50_ms": round(statistics.median(batch_ms), 2),
        "first_batch_ms": round(batch_ms[0], 2),
    }


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load", type=Path, default=DEFAULT_LOAD, help="the shared Atropos load generator")
    ap.add_argument("--groups", type=int, default=2000, help="groups per load run (the deep queue /batch drains)")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="load runs per server, alternating which goes first")
    ap.add_argument("--deep", type=int, default=100_000, help="the deep queue for the gateway-only figures (0: skip)")
    ap.add_argument("--settle", type=float, default=5.0, help="seconds between filling a queue and timing it")
    ap.add_argument(
        "--response-gzip",
        choices=("auto", "always", "never"),
        default="auto",
        help="the gateway's reply compression (auto: none over loopback; always: as run-api)",
    )
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="gateway-vs-atropos-") as tmp:
        work = Path(tmp)
        api_port, gw_port = free_port(), free_port()
        api_url, gw_url = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{gw_port}"
        gw_grpc_port = free_port()
        gateway_cmd = [
            sys.executable,
            "-m",
            "services.gateway",
            "--host",
            "127.0.0.1",
            "--port",
            str(gw_port),
            "--grpc-port",
            str(gw_grpc_port),
            "--data-dir",
            str(work / "gateway-store"),
            "--max-stored-groups",
            str(max(200_000, 2 * args.deep)),
            "--log-level",
            "WARNING",
            "--response-gzip",
            args.response_gzip,
        ]
        runs: dict[str, list[dict]] = {"run-api": [], "gateway": []}
        with (
            server("run-api", run_api_command(api_port), api_url, work) as api_proc,
            server("gateway", gateway_cmd, gw_url, work) as gw_proc,
        ):
            pids = {"run-api": api_proc.pid, "gateway": gw_proc.pid}
            for round_ in range(args.rounds):
                order = [("run-api", api_url), ("gateway", gw_url)]
                for name, url in order if round_ % 2 == 0 else reversed(order):
                    result = run_load(args.load, url, pids[name], args)
                    runs[name].append(result)
                    print(f"round {round_ + 1} {name}: {json.dumps(result)}", file=sys.stderr, flush=True)
            floor = asyncio.run(client_floor(asyncio.run(a_batch_body(gw_url, args)), work))
            print(f"client floor for /batch: {floor} ms", file=sys.stderr, flush=True)
            depths = {}
            if args.deep:
                for depth in (100, args.deep):
                    # 100 groups of 8 make 12 batches of 64: 6 over each path.
                    depths[depth] = asyncio.run(depth_figures(gw_url, f"127.0.0.1:{gw_grpc_port}", depth, 6, args))
                    print(f"gateway at {depth} queued groups: {json.dumps(depths[depth])}", file=sys.stderr, flush=True)

    api, gw = runs["run-api"], runs["gateway"]
    figures = {
        "groups": args.groups,
        "group_size": args.group_size,
        "tokens": args.tokens,
        "rounds": args.rounds,
        "durable": True,
        "response_gzip": args.response_gzip,
        "run_api": {k: median_of(api, k) for k in FIGURES},
        "gateway": {k: median_of(gw, k) for k in FIGURES},
        "errors": {"run_api": sum(r["errors"] for r in api), "gateway": sum(r["errors"] for r in gw)},
        "gateway_depth": {str(d): v for d, v in depths.items()},
        "batch_p50_client_floor_ms": floor,
    }
    a, g = figures["run_api"], figures["gateway"]
    figures["ratios"] = {
        "ingest": round(g["ingest_groups_per_s"] / a["ingest_groups_per_s"], 2),
        "post_p99_lower": round(a["post_p99_ms"] / g["post_p99_ms"], 2),
        "batch_p50_lower": round(a["batch_p50_ms"] / g["batch_p50_ms"], 2),
    }
    print(json.dumps(figures))

    r = figures["ratios"]
    rows = [
        ("figure (median of rounds)", "run-api", "gateway", "ratio", "goal"),
        (
            "ingest groups/s",
            f"{a['ingest_groups_per_s']:.0f}",
            f"{g['ingest_groups_per_s']:.0f}",
            f"{r['ingest']:.2f}x",
            ">= 3x",
        ),
        (
            "POST /scored_data p50 ms",
            f"{a['post_p50_ms']:.1f}",
            f"{g['post_p50_ms']:.1f}",
            f"{a['post_p50_ms'] / g['post_p50_ms']:.2f}x lower",
            "",
        ),
        (
            "POST /scored_data p99 ms",
            f"{a['post_p99_ms']:.1f}",
            f"{g['post_p99_ms']:.1f}",
            f"{r['post_p99_lower']:.2f}x lower",
            "",
        ),
        (
            f"/batch p50 ms ({args.groups}-group queue)",
            f"{a['batch_p50_ms']:.2f}",
            f"{g['batch_p50_ms']:.2f}",
            f"{r['batch_p50_lower']:.1f}x lower",
            ">= 10x lower",
        ),
        (
            "  the client alone: same bytes, instant server",
            "",
            f"{floor:.2f}",
            f"{a['batch_p50_ms'] / floor:.1f}x (best any server could show)",
            "",
        ),
        (
            "first /batch ms (forms all)",
            f"{a['first_batch_ms']:.1f}",
            f"{g['first_batch_ms']:.1f}",
            f"{a['first_batch_ms'] / g['first_batch_ms']:.1f}x lower",
            "",
        ),
    ]
    if a["server_cpu_ms_per_group"] and g["server_cpu_ms_per_group"]:
        rows.append(
            (
                "server CPU ms per group (ingest+drain)",
                f"{a['server_cpu_ms_per_group']:.2f}",
                f"{g['server_cpu_ms_per_group']:.2f}",
                f"{a['server_cpu_ms_per_group'] / g['server_cpu_ms_per_group']:.1f}x less",
                "",
            )
        )
    print(table(rows))
    if depths:
        rows = [("gateway alone", *(f"{d:,} queued" for d in depths))]
        rows.append(("/batch p50 ms", *(f"{v['batch_p50_ms']:.2f}" for v in depths.values())))
        rows.append(("first /batch ms (forms all)", *(f"{v['first_batch_ms']:.1f}" for v in depths.values())))
        rows.append(("StreamBatches per batch p50 ms", *(f"{v['stream_batch_p50_ms']:.2f}" for v in depths.values())))
        print()
        print(table(rows))


if __name__ == "__main__":
    main()
