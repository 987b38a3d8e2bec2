"""CPU per trainer step of the torch inference engine, main's code against this tree's, in
one run: the engine in process, and the real inference gRPC service in its own process.

A "step" is what the demo asks of the inference service per trainer step: `--prompts`
requests (4) of n=`--n` (8) samples, `--new-tokens` new tokens (4), temperature 1,
non-streaming, prompts like the demo's ("repeat 3:" at the tiny size; "reverse <digits>:"
with as many digits as new tokens at the heavy size). Every request of a step is sent at
once and the step ends when all completions are back. CPU is counted over the process
that serves (all its threads: utime + stime from /proc, or process_time in process), so
the figure does not depend on how busy the machine is; steps/s is wall time and does.

Each code tree runs in its own interpreter (PYTHONPATH = the tree), one after the other,
arms interleaved over `--rounds` rounds; the best round per arm is printed (CPU per step
is steady; the best of a few rounds drops a round another process disturbed).

    python bench/engine_step_cpu.py                          # tiny, main vs this tree
    python bench/engine_step_cpu.py --size heavy --steps 6   # the ~25M model, 32 tokens
    python bench/engine_step_cpu.py --main /tmp/clotho-main  # main already unpacked there

`--main` defaults to an archive of /work/main's HEAD unpacked in a temp dir.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "new_tokens": 4, "task": "repeat"},
    "heavy": {"hidden_size": 512, "num_layers": 6, "num_heads": 8, "new_tokens": 32, "task": "reverse"},
}


def prompts(task: str, count: int, length: int, rng: random.Random) -> list[str]:
    if task == "repeat":
        return [f"repeat {rng.choice('0123456789')}:" for _ in range(count)]
    return ["reverse " + "".join(rng.choice("0123456789") for _ in range(length)) + ":" for _ in range(count)]


def proc_cpu(pid: int) -> float:
    """utime + stime of a process (all threads), in seconds."""
    return _cpu(Path(f"/proc/{pid}/stat"))


def thread_cpu(pid: int) -> dict[int, float]:
    """utime + stime per thread of a process, in seconds."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out[int(task.name)] = _cpu(task / "stat")
        except (OSError, ValueError):
            continue
    return out


def _cpu(stat: Path) -> float:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- workers (run inside the tree under test) ----------------------------------------------


async def engine_worker(args) -> dict:
    import torch

    from services.inference.generation_types import GenerationRequest, SamplingOptions
    from services.inference.settings import InferenceSettings
    from services.inference.torch_engine.engine import engine_from_settings

    torch.set_num_threads(args.threads)
    engine = engine_from_settings(InferenceSettings(model_path=args.model))
    rng = random.Random(0)
    # Tokenized up front: the service receives token ids, so the step does not tokenize.
    pool = [list(engine.tokenizer(t).input_ids) for t in prompts(args.task, 64, args.new_tokens, rng)]

    async def step() -> int:
        options = SamplingOptions(temperature=1.0, max_new_tokens=args.new_tokens, n=args.n)
        streams = [engine.submit(GenerationRequest(rng.choice(pool), options)) for _ in range(args.prompts)]
        done = await asyncio.gather(*(s.completions() for s in streams))
        return sum(len(c.output_ids) for cs in done for c in cs)

    try:
        for _ in range(args.warmup):
            await step()
        rounds = []
        for _ in range(args.rounds):
            cpu, wall, tokens = time.process_time(), time.perf_counter(), 0
            for _ in range(args.steps):
                tokens += await step()
            rounds.append((time.process_time() - cpu, time.perf_counter() - wall, tokens))
    finally:
        engine.close()
    return {"rounds": rounds}


async def service_worker(args) -> dict:
    import grpc
    from transformers import AutoTokenizer

    from clotho.v1 import inference_service_pb2 as pb
    from clotho.v1 import inference_service_pb2_grpc as pb_grpc

    tok = AutoTokenizer.from_pretrained(args.model)
    rng = random.Random(0)
    pool = [list(tok(t).input_ids) for t in prompts(args.task, 64, args.new_tokens, rng)]
    with tempfile.TemporaryDirectory() as tmp:
        ready = Path(tmp) / "ready.json"
        env = {
            **os.environ,
            "PYTHONPATH": f"{args.tree}:{args.tree}/clients/python",
            "OMP_NUM_THREADS": str(args.threads),
        }
        cmd = [sys.executable, "-m", "services.inference", "--model-path", args.model, "--grpc-port", "0"]
        cmd += ["--ready-file", str(ready), "--threads", str(args.threads), "--log-level", "WARNING"]
        server = subprocess.Popen(cmd, cwd=args.tree, env=env)
        try:
            deadline = time.monotonic() + 120
            while not ready.exists() or not ready.read_text().strip():
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the inference service did not start")
                await asyncio.sleep(0.1)
            port = json.loads(ready.read_text().splitlines()[0])["grpc_port"]
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.InferenceServiceStub(channel)

                async def one(ids: list[int]) -> int:
                    request = pb.GenerateRequest(
                        input_ids=ids,
                        sampling_params=pb.SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens, n=args.n),
                    )
                    tokens = 0
                    async for message in stub.Generate(request):
                        tokens += len(message.completion.output_ids)
                    return tokens

                async def step() -> int:
                    return sum(await asyncio.gather(*(one(rng.choice(pool)) for _ in range(args.prompts))))

                for _ in range(args.warmup):
                    await step()
                rounds, split = [], []
                for _ in range(args.rounds):
                    cpu, threads, wall, tokens = proc_cpu(server.pid), thread_cpu(server.pid), time.perf_counter(), 0
                    for _ in range(args.steps):
                        tokens += await step()
                    rounds.append((proc_cpu(server.pid) - cpu, time.perf_counter() - wall, tokens))
                    after = thread_cpu(server.pid)
                    used = {t: after[t] - threads.get(t, 0.0) for t in after}
                    # The event loop's thread (the process's first), then the busiest other
                    # (the engine's worker), then the rest (gRPC's, OpenMP's).
                    main_thread = used.pop(server.pid, 0.0)
                    busiest = max(used.values(), default=0.0)
                    split.append([main_thread, busiest, sum(used.values()) - busiest])
        finally:
            server.terminate()
            server.wait(30)
    return {"rounds": rounds, "threads": split}


# -- driver --------------------------------------------------------------------------------


def run_arm(tree: Path, mode: str, args, model: Path) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": f"{tree}:{tree}/clients/python",
        "OMP_NUM_THREADS": str(args.threads),
        # As `clotho up` runs the services (services/up.py WAIT_ENV): idle OpenMP threads sleep.
        "OMP_WAIT_POLICY": "PASSIVE",
        "TOKENIZERS_PARALLELISM": "false",
    }
    size = SIZES[args.size]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", mode, "--tree", str(tree)]
    cmd += ["--model", str(model), "--task", size["task"], "--new-tokens", str(args.new_tokens or size["new_tokens"])]
    cmd += ["--prompts", str(args.prompts), "--n", str(args.n), "--threads", str(args.threads)]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--rounds", "1"]
    out = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} arm in {tree} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main_tree(given: str, keep: tempfile.TemporaryDirectory) -> Path:
    if given:
        return Path(given).resolve()
    out = Path(keep.name) / "main"
    out.mkdir()
    archive = subprocess.run(["git", "-C", "/work/main", "archive", "HEAD"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--modes", default="engine,service", help="engine (in process), service (gRPC)")
    p.add_argument("--main", default="", help="main's tree (default: /work/main's HEAD, archived)")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=0, help="default: the size's")
    p.add_argument(
        "--threads", type=int, default=2, help="torch threads of the serving process (clotho up on 2 cores: 2)"
    )
    p.add_argument("--steps", type=int, default=60, help="steps per round")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3, help="rounds per arm (interleaved); the best counts")
    # Worker mode (internal).
    p.add_argument("--worker", default="")
    p.add_argument("--tree", default="")
    p.add_argument("--model", default="")
    p.add_argument("--task", default="repeat")
    args = p.parse_args(argv)

    if args.worker:
        worker = engine_worker if args.worker == "engine" else service_worker
        print(json.dumps(asyncio.run(worker(args))))
        return

    sys.path.insert(0, str(REPO))
    from services.demo.tiny_model import build_tiny_model

    size = SIZES[args.size]
    keep = tempfile.TemporaryDirectory()
    with keep:
        model = Path(keep.name) / "model"
        build_tiny_model(model, size["hidden_size"], size["num_layers"], size["num_heads"])
        trees = {"main": main_tree(args.main, keep), "branch": REPO}
        modes = args.modes.split(",")
        results: dict[str, dict[str, list]] = {m: {t: [] for t in trees} for m in modes}
        splits: dict[str, list] = {t: [] for t in trees}
        load_before = os.getloadavg()
        for _ in range(args.rounds):
            for mode in modes:
                for name, tree in trees.items():
                    arm = run_arm(tree, mode, args, model)
                    results[mode][name] += arm["rounds"]
                    splits[name] += arm.get("threads", [])
        load_after = os.getloadavg()

    steps = args.steps
    summary = {}
    for mode in modes:
        for name in trees:
            cpu, wall, tokens = min(results[mode][name], key=lambda r: r[0])
            summary[f"{mode}/{name}"] = {
                "cpu_ms_per_step": round(1000 * cpu / steps, 2),
                "steps_per_s": round(steps / wall, 1),
                "requests_per_s": round(steps * args.prompts / wall, 1),
                "tokens_per_step": tokens / steps,
                "cpu_ms_all_rounds": [round(1000 * r[0] / steps, 2) for r in results[mode][name]],
            }
            if mode == "service" and splits[name]:
                best = min(splits[name], key=sum)
                summary[f"{mode}/{name}"]["threads_ms_per_step"] = {
                    k: round(1000 * v / steps, 2) for k, v in zip(("event_loop", "engine", "other"), best)
                }
    print(
        json.dumps(
            {
                "size": args.size,
                "threads": args.threads,
                "steps": steps,
                "load": [load_before, load_after],
                **summary,
            }
        )
    )
    print(
        f"\n{args.size}: {args.prompts} requests x n={args.n}, {args.new_tokens or size['new_tokens']} new tokens, "
        f"{args.threads} torch thread(s); load average {load_before[0]:.2f} -> {load_after[0]:.2f}"
    )
    head = f"{'arm':<18}{'CPU ms/step':>12}{'steps/s':>9}{'requests/s':>12}   branch/main CPU   loop/engine/other ms"
    print(head + "\n" + "-" * len(head))
    for mode in modes:
        for name in trees:
            s = summary[f"{mode}/{name}"]
            ratio = s["cpu_ms_per_step"] / summary[f"{mode}/main"]["cpu_ms_per_step"]
            print(
                f"{mode + '/' + name:<18}{s['cpu_ms_per_step']:>12.2f}{s['steps_per_s']:>9.1f}"
                f"{s['requests_per_s']:>12.1f}   {'' if name == 'main' else f'x{ratio:.2f}':<18}"
                + (
                    " / ".join(f"{v:.1f}" for v in s["threads_ms_per_step"].values())
                    if "threads_ms_per_step" in s
                    else ""
                )
            )


if __name__ == "__main__":
    main()
