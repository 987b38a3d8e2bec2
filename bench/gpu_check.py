"""The GPU paths, run for real on a one-GPU machine in one call (under 8 minutes):

  1. engine     the torch engine against transformers' `generate` (all prompts in one
                left-padded call) at 32 concurrent requests, output tokens/s
  2. step       one trainer step in bf16 autocast (float32 master weights, AdamW)
  3. cuda ipc   WeightSync pushes the trained weights (bf16 on the wire) into a real
                inference process on the same GPU; `auto` must pick the same-host
                transport with CUDA IPC sets; the shard's prompt logprobs after the
                commit must equal the trainer's (bf16 tolerance); two updates (both sets)
  4. colocated  ReleaseMemory, a trainer step, the push, ResumeMemory: device memory
                per phase (shard and trainer), generation correct afterwards
  5. leaks      no weight segment left in /dev/shm

The model is a random-init Qwen2 of Qwen2.5-0.5B's shape built locally (nothing is
downloaded). Each section prints one JSON line; a failing section prints its error and
the others still run. The exit code is the number of failed sections.

    python bench/gpu_check.py                      # on the GPU machine
    python bench/gpu_check.py --device cpu --layers 2 --hidden 128 --vocab 512   # a dry run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "clients" / "python"))

import torch

SEQUENCE = [1, 20, 21, 22, 10, 30, 31, 14, 15, 16, 40, 41, 50, 60, 70, 80]
failures = 0


def emit(section: str, **fields) -> None:
    print(json.dumps({"section": section, **fields}, default=str), flush=True)


def build_model(out: Path, args) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from services.demo.tiny_model import build_tokenizer

    config = Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 2,
        num_hidden_layers=args.layers,
        num_attention_heads=max(args.hidden // 64, 2),
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    build_tokenizer(out)


def gb(n: int | float) -> float:
    return round(float(n) / 1e9, 3)


async def engine_vs_generate(model_dir: Path, device: str, concurrency: int, new_tokens: int) -> None:
    from transformers import AutoModelForCausalLM

    from services.inference.generation_types import GenerationRequest, SamplingOptions
    from services.inference.torch_engine.engine import GenerationEngine

    gen = torch.Generator().manual_seed(1)
    prompts = [
        torch.randint(10, 400, (int(torch.randint(16, 96, (1,), generator=gen)),), generator=gen).tolist()
        for _ in range(concurrency)
    ]
    sampling = SamplingOptions(temperature=0.0, ignore_eos=True, max_new_tokens=new_tokens)
    engine = GenerationEngine(model_dir, device=device, dtype="bfloat16", max_batch_size=max(64, concurrency))
    try:
        await engine.submit(
            GenerationRequest(prompts[0], SamplingOptions(temperature=0.0, ignore_eos=True, max_new_tokens=4))
        ).completions()
        start = time.perf_counter()
        results = await asyncio.gather(*(engine.submit(GenerationRequest(p, sampling)).completions() for p in prompts))
        engine_s = time.perf_counter() - start
        engine_tokens = sum(len(c.output_ids) for r in results for c in r)
    finally:
        engine.close()
    del engine
    if device.startswith("cuda"):
        torch.cuda.empty_cache()

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device).eval()
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(input_ids=ids[:1], attention_mask=mask[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        generate_s = time.perf_counter() - start
    generate_tokens = (out.shape[1] - width) * len(prompts)
    del model, out
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    emit(
        "engine",
        concurrency=concurrency,
        new_tokens=new_tokens,
        engine_tokens_per_s=round(engine_tokens / engine_s, 1),
        generate_batch_tokens_per_s=round(generate_tokens / generate_s, 1),
        engine_s=round(engine_s, 3),
        generate_s=round(generate_s, 3),
    )


class Trainer:
    """float32 master weights on the device, bf16 autocast, AdamW."""

    def __init__(self, model_dir: Path, device: str) -> None:
        from transformers import AutoModelForCausalLM

        self.device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(self.device)
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.vocab = self.model.config.vocab_size

    def step(self, batch: int, seq: int) -> dict:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            torch.cuda.synchronize()
        start = time.perf_counter()
        ids = torch.randint(3, self.vocab, (batch, seq), device=self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            logits = self.model(ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, self.vocab), ids[:, 1:].reshape(-1))
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        out = {"seconds": round(time.perf_counter() - start, 3), "loss": round(loss.item(), 4)}
        if self.device.type == "cuda":
            out["peak_gb"] = gb(torch.cuda.max_memory_allocated(self.device))
        return out

    def weights_bf16(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().to(torch.bfloat16) for n, p in self.model.named_parameters()}

    @torch.no_grad()
    def logprobs(self) -> list[float]:
        self.model.eval()
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            model_bf16 = self.model.to(torch.bfloat16)
            logits = model_bf16(torch.tensor([SEQUENCE], device=self.device)).logits[0].float()
        self.model.to(torch.float32).train()
        lp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(SEQUENCE[1:], device=self.device)[:, None])
        return [0.0, *lp.squeeze(-1).tolist()]


async def served_logprobs(stub) -> tuple[int, list[float]]:
    from clotho.v1 import inference_service_pb2 as pb

    version = (await stub.GetServedPolicy(pb.GetServedPolicyRequest())).policy.version
    request = pb.GenerateRequest(
        input_ids=SEQUENCE, sampling_params=pb.SamplingParams(max_new_tokens=0), return_prompt_logprobs=True
    )
    [response] = [r async for r in stub.Generate(request)]
    return version, list(response.completion.prompt_logprobs)


async def weight_paths(model_dir: Path, device: str, work: Path, args) -> None:
    global failures
    from clotho.v1 import inference_service_pb2_grpc as pb_grpc
    from services import launcher
    from services.common.server import channel
    from services.common.weight_wire import shm
    from services.trainer.weight_push import WeightSync

    trainer = Trainer(model_dir, device)
    emit("step", **trainer.step(args.batch, args.seq))
    inference = await launcher.start(
        "inference",
        "services.inference",
        ["--model-path", str(model_dir), "--device", device, "--dtype", "bfloat16", "--grpc-port", "0"],
        work / "logs",
    )
    sync = None
    try:
        ready = await launcher.wait_ready(inference, 300)
        target = f"127.0.0.1:{ready['grpc_port']}"
        sync = WeightSync.for_targets([target], timeout_seconds=120, dtype=torch.bfloat16, transport="auto")
        async with channel(target) as ch:
            stub = pb_grpc.InferenceServiceStub(ch)
            try:
                for version in (1, 2):
                    trainer.step(args.batch, args.seq)
                    report = await sync.push(trainer.weights_bf16(), version, version)
                    link = sync._link  # the same-host link the push used, if any
                    served_version, served = await served_logprobs(stub)
                    mine = trainer.logprobs()
                    diff = max(abs(a - b) for a, b in zip(served, mine))
                    ok = (
                        report.group_name.startswith(shm.SEGMENT_PREFIX)
                        and served_version == version
                        and diff < args.tolerance
                    )
                    emit(
                        "cuda_ipc",
                        ok=ok,
                        version=version,
                        transport="shm" if report.group_name.startswith(shm.SEGMENT_PREFIX) else "collective",
                        seconds=round(report.seconds, 3),
                        gb_per_s=round(report.bytes / report.seconds / 1e9, 2),
                        stages=report.stages,
                        max_logprob_diff=round(diff, 5),
                        cuda_ipc_sets=bool(link is not None and link.segment.cuda_handles),
                    )
                    failures += not ok
            except Exception as exc:  # noqa: BLE001 - reported, the next section still runs
                failures += 1
                emit("cuda_ipc", ok=False, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc()[-2000:])

            try:
                colocation = sync.colocation(torch.device(device))
                phases = {"released": await colocation.release()}
                phases["step"] = trainer.step(args.batch, args.seq)
                report = await sync.push(trainer.weights_bf16(), 3, 3)
                phases["resumed"] = await colocation.resume()
                served_version, served = await served_logprobs(stub)
                diff = max(abs(a - b) for a, b in zip(served, trainer.logprobs()))
                ok = served_version == 3 and diff < args.tolerance
                failures += not ok
                emit(
                    "colocated",
                    ok=ok,
                    max_logprob_diff=round(diff, 5),
                    push_seconds=round(report.seconds, 3),
                    phases=phases,
                )
            except Exception as exc:  # noqa: BLE001
                failures += 1
                emit("colocated", ok=False, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc()[-2000:])
    finally:
        if sync is not None:
            await sync.close()
        await launcher.stop(inference, grace=30)
        log = work / "logs" / "inference.log"
        if failures and log.exists():
            emit("inference_log_tail", text=log.read_text(errors="replace")[-3000:])
    left = shm.segment_names()
    failures += bool(left)
    emit("leaks", ok=not left, segments_left=left)


async def main() -> None:
    global failures
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="trainer step: sequences")
    parser.add_argument("--seq", type=int, default=512, help="trainer step: tokens per sequence")
    parser.add_argument("--tolerance", type=float, default=0.05, help="max |logprob difference| (bf16 kernels)")
    parser.add_argument("--skip-engine", action="store_true")
    args = parser.parse_args()

    info = {"torch": torch.__version__, "device": args.device, "cpus": os.cpu_count()}
    if args.device.startswith("cuda"):
        from services.common.weight_wire import cuda_ipc

        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name, memory_gb=gb(props.total_memory), uuid=cuda_ipc.device_uuid(torch.device(args.device))
        )
    emit("env", **info)
    work = Path(tempfile.mkdtemp(prefix="clotho-gpu-check-"))
    try:
        start = time.perf_counter()
        build_model(work / "model", args)
        emit("model", seconds=round(time.perf_counter() - start, 1))
        if not args.skip_engine:
            try:
                await engine_vs_generate(work / "model", args.device, args.concurrency, args.new_tokens)
            except Exception as exc:  # noqa: BLE001
                failures += 1
                emit("engine", ok=False, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc()[-2000:])
        try:
            await weight_paths(work / "model", args.device, work, args)
        except Exception as exc:  # noqa: BLE001
            failures += 1
            emit("weights", ok=False, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc()[-2000:])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    emit("done", failures=failures)
    sys.exit(failures)


if __name__ == "__main__":
    asyncio.run(main())
