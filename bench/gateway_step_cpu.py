"""The gateway's CPU per tiny trainer step, split by route: two gateway code trees
(e.g. main's and this branch's) side by side in one run, against one real inference
service.

A tiny step at the gateway is what the demo environment and the trainer make of it
at the demo geometry (4 prompts x 8 samples, 4 new tokens, durable sqlite store):
  generate  4 concurrent POST /generate (input_ids, sampling_params n=8,
            max_new_tokens 4, temperature 1, return_logprob), as the demo env sends them
  scored    4 POST /scored_data of the 8 sequences each (tokens, masks, scores,
            inference_logprobs: prompt positions -100 / 1.0), one after another
  batch     one StreamBatches credit (with the trainer's policy version) and the
            32-sequence batch it hands out
  status    one GET /status-env (the env's pacing poll; reference only)
The phases run one after another, so the gateway's CPU in each is the route's. CPU is
read from /proc/<pid>/task/*/schedstat (every thread's run time, nanoseconds) around
each phase; the whole run's utime+stime from /proc/<pid>/stat is printed beside it.
Trees alternate by round (`--rounds` x `--steps` steps each), after a warm-up.

    .venv/bin/python bench/gateway_step_cpu.py --tree main=/tmp/gw-main --tree branch=. \
        [--rounds 4] [--steps 50]

A tree is a checkout of this repository (main's: `git -C /work/main archive HEAD | tar -x
-C /tmp/gw-main`, with the built _scored_fast extension copied into
services/gateway/trajectory/); its gateway runs with this interpreter from that
directory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
from grpc import aio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "clients" / "python"))

from clotho.v1 import gateway_service_pb2 as gpb
from clotho.v1 import gateway_service_pb2_grpc as gpb_grpc
from services import launcher
from services.demo.env import scored_data
from services.demo.tiny_model import build_tiny_model

PHASES = ("generate", "scored", "batch", "status")
PROMPTS, GROUP, NEW_TOKENS = 4, 8, 4


def thread_ns(pid: int) -> int:
    """Every thread's run time so far (ns); threads gone since are not counted."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def thread_table(pid: int) -> dict[str, int]:
    """Run time so far (ns) per thread name (threads of one name summed)."""
    out: dict[str, int] = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                out[name] = out.get(name, 0) + int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def io_bytes(pid: int) -> dict[str, int]:
    """/proc/<pid>/io: wchar (every write: sockets, the WAL, the database) and
    write_bytes (what reached the storage layer)."""
    with open(f"/proc/{pid}/io") as f:
        fields = dict(line.split(": ") for line in f.read().splitlines())
    return {k: int(fields[k]) for k in ("wchar", "write_bytes")}


def stat_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def start_in(name: str, tree: Path, module: str, args: list[str], log_dir: Path, env: dict) -> launcher.Child:
    """launcher.start, run from `tree` (its code first on sys.path)."""
    cwd = os.getcwd()
    os.chdir(tree)
    try:
        return await launcher.start(name, module, args, log_dir, env=env)
    finally:
        os.chdir(cwd)


class Gateway:
    def __init__(self, name: str, child: launcher.Child, ready: dict) -> None:
        self.name = name
        self.child = child
        self.pid = child.proc.pid
        self.http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{ready['http_port']}", timeout=60)
        self.channel = aio.insecure_channel(f"127.0.0.1:{ready['grpc_port']}")
        self.stub = gpb_grpc.GatewayServiceStub(self.channel)
        self.env_id = 0
        self.rng = random.Random(0)
        self.cpu = dict.fromkeys(PHASES, 0)
        self.steps = 0
        self.requests: asyncio.Queue = asyncio.Queue()
        self.call = None

    async def setup(self) -> None:
        await self.stub.RegisterTrainer(
            gpb.RegisterTrainerRequest(batch_size=PROMPTS * GROUP, max_token_len=64, num_steps=0), wait_for_ready=True
        )

        async def requests():
            while True:
                yield await self.requests.get()

        # The gateway takes environments once the trainer has asked for a batch.
        self.call = self.stub.StreamBatches(requests())
        await self.requests.put(gpb.StreamBatchesRequest(credits=1, policy_version=0))
        for _ in range(100):
            r = await self.http.post(
                "/register-env",
                json={"max_token_length": 64, "desired_name": "bench", "weight": 1.0, "group_size": GROUP},
            )
            if r.json().get("status") == "success":
                self.env_id = int(r.json()["env_id"])
                break
            await asyncio.sleep(0.05)
        else:
            raise RuntimeError(f"/register-env: {r.text}")
        # The first credit's batch; from here on each step's credit finds its data queued.
        await self.scored(await self.generate())
        await self.call.read()

    async def generate(self) -> list[tuple[list[int], list]]:
        prompts = [[self.rng.randrange(7, 30) for _ in range(8)] for _ in range(PROMPTS)]

        async def one(ids):
            r = await self.http.post(
                "/generate",
                json={
                    "input_ids": ids,
                    "sampling_params": {"n": GROUP, "max_new_tokens": NEW_TOKENS, "temperature": 1.0},
                    "return_logprob": True,
                },
            )
            r.raise_for_status()
            return ids, r.json()

        return await asyncio.gather(*(one(p) for p in prompts))

    async def scored(self, answers) -> None:
        for ids, outs in answers:
            body = scored_data(ids, outs, lambda _ids: float(self.rng.random() < 0.5), self.env_id)
            r = await self.http.post("/scored_data", json=body)
            r.raise_for_status()

    async def batch(self) -> None:
        await self.requests.put(gpb.StreamBatchesRequest(credits=1, policy_version=0))
        response = await self.call.read()
        assert sum(len(g.sequences) for g in response.groups) == PROMPTS * GROUP, response

    async def status(self) -> None:
        r = await self.http.request("GET", "/status-env", json={"env_id": self.env_id})
        r.raise_for_status()

    async def step(self, count: bool, only_generate: bool = False) -> None:
        t = thread_ns(self.pid)
        answers = await self.generate()
        if only_generate:  # for profiling the route alone
            return
        marks = [thread_ns(self.pid)]
        await self.scored(answers)
        marks.append(thread_ns(self.pid))
        await self.batch()
        marks.append(thread_ns(self.pid))
        await self.status()
        marks.append(thread_ns(self.pid))
        if count:
            for phase, m in zip(PHASES, marks, strict=True):
                self.cpu[phase] += m - t
                t = m
            self.steps += 1

    async def close(self) -> None:
        if self.call is not None:
            self.call.cancel()
        await self.channel.close()
        await self.http.aclose()


async def main_async(args: argparse.Namespace) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="clotho-gw-step-"))
    model = build_tiny_model(workdir / "model")
    token = secrets.token_urlsafe(16)
    quiet = {"OMP_NUM_THREADS": "1", "CLOTHO_INFERENCE_SERVICE_TOKEN": token, "CLOTHO_GATEWAY_SERVICE_TOKEN": token}
    inf = await launcher.start(
        "inference",
        "services.inference",
        ["--model-path", str(model), "--grpc-port", "0", "--grace-seconds", "1", "--threads", "1"],
        workdir / "logs",
        env=quiet,
    )
    children = [inf]
    gateways: list[Gateway] = []
    try:
        inf_ready = await launcher.wait_ready(inf, 180)
        for name, tree in args.tree:
            gw_args = [
                "--http-port", "0", "--grpc-port", "0", "--grace-seconds", "1", "--threads", "1",
                "--inference", f"127.0.0.1:{inf_ready['grpc_port']}", "--tokenizer-path", str(model),
                "--data-dir", str(workdir / f"gateway-{name}"),
            ]  # fmt: skip
            child = await start_in(f"gateway-{name}", Path(tree), "services.gateway", gw_args, workdir / "logs", quiet)
            children.append(child)
            gw = Gateway(name, child, await launcher.wait_ready(child, 180))
            print(json.dumps({"gateway": name, "pid": gw.pid}), flush=True)
            await gw.setup()
            gateways.append(gw)
        for gw in gateways:
            for _ in range(args.warmup):
                await gw.step(count=False)
        cpu0 = {gw.name: stat_seconds(gw.pid) for gw in gateways}
        threads0 = {gw.name: thread_table(gw.pid) for gw in gateways}
        io0 = {gw.name: io_bytes(gw.pid) for gw in gateways}
        steps0 = {gw.name: 0 for gw in gateways}
        load_before = os.getloadavg()
        started = time.perf_counter()
        for r in range(args.rounds):
            order = gateways[r % len(gateways) :] + gateways[: r % len(gateways)]
            for gw in order:
                for _ in range(args.steps):
                    await gw.step(count=True, only_generate=args.only_generate)
            print(json.dumps({"round": r, "loadavg": [round(x, 2) for x in os.getloadavg()]}), flush=True)
        elapsed = time.perf_counter() - started
        out = {
            "per_step_ms": {
                gw.name: {p: gw.cpu[p] / gw.steps / 1e6 for p in PHASES}
                | {"total": sum(gw.cpu.values()) / gw.steps / 1e6}
                for gw in gateways
            },
            "stat_ms_per_step": {
                gw.name: (stat_seconds(gw.pid) - cpu0[gw.name]) * 1e3 / (gw.steps - steps0[gw.name]) for gw in gateways
            },
            "threads_ms_per_step": {
                gw.name: {
                    name: round((ns - threads0[gw.name].get(name, 0)) / gw.steps / 1e6, 3)
                    for name, ns in sorted(thread_table(gw.pid).items())
                    if ns - threads0[gw.name].get(name, 0) > 0
                }
                for gw in gateways
            },
            "io_kb_per_step": {
                gw.name: {k: (v - io0[gw.name][k]) / gw.steps / 1024 for k, v in io_bytes(gw.pid).items()}
                for gw in gateways
            },
            "steps": {gw.name: gw.steps for gw in gateways},
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "seconds": elapsed,
        }
        return out
    finally:
        for gw in gateways:
            await gw.close()
        for child in reversed(children):
            await launcher.stop(child)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept {workdir}", flush=True)


def table(out: dict) -> str:
    names = list(out["per_step_ms"])
    base = names[0]
    head = "| gateway CPU ms per tiny step | " + " | ".join(names) + (" | ratio |" if len(names) > 1 else "")
    lines = [head, "|---" * (len(names) + 1 + (len(names) > 1)) + "|"]
    for phase in (*PHASES, "total"):
        vals = [out["per_step_ms"][n][phase] for n in names]
        row = f"| {phase} | " + " | ".join(f"{v:.2f}" for v in vals)
        if len(names) > 1:
            row += f" | {vals[-1] / vals[0]:.2f} |"
        lines.append(row)
    stat = [out["stat_ms_per_step"][n] for n in names]
    row = "| total (/proc stat utime+stime) | " + " | ".join(f"{v:.1f}" for v in stat)
    if len(names) > 1:
        row += f" | {stat[-1] / stat[0]:.2f} |"
    lines.append(row)
    io = [out["io_kb_per_step"][n] for n in names]
    for key in ("wchar", "write_bytes"):
        row = f"| {key} KB per step | " + " | ".join(f"{v[key]:.1f}" for v in io)
        if len(names) > 1:
            row += f" | {io[-1][key] / max(io[0][key], 1e-9):.2f} |"
        lines.append(row)
    for n in names:
        per = out["threads_ms_per_step"][n]
        lines.append(f"{n} by thread (ms per step): " + ", ".join(f"{k} {v:.2f}" for k, v in per.items()))
    la, lb = out["loadavg_before"], out["loadavg_after"]
    lines.append(f"load average {la[0]:.2f} -> {lb[0]:.2f}; {out['steps'][base]} steps each; {out['seconds']:.0f} s")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--tree",
        action="append",
        type=lambda s: tuple(s.split("=", 1)),
        help="NAME=PATH of a code tree whose gateway to measure (repeatable; default: this one)",
    )
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=50, help="steps per tree per round")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--only-generate", action="store_true", help="only /generate calls (to profile the route)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, stores)")
    p.add_argument("--json", type=Path, help="also write every figure here")
    args = p.parse_args()
    args.tree = args.tree or [("this", str(REPO))]
    out = asyncio.run(main_async(args))
    print(json.dumps(out), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    print(table(out), flush=True)


if __name__ == "__main__":
    main()
