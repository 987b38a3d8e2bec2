"""Two data-parallel trainer ranks on CPU (DDP over a real gloo default group): after a
step both hold identical weights, and the gradient they applied is the single-process
gradient of the whole batch."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import cast

import pytest
import torch
import torch.multiprocessing as mp

from services.trainer.core import TrainerCore
from services.trainer.settings import TrainerSettings
from trainer_fakes import toy_batch

# Small rows, so the ranks get different numbers of micro-batches (the one with fewer
# runs zero-weight ones to keep the collectives in step).
MICRO_BATCH_TOKENS = 24


def batch():
    groups = toy_batch(n_groups=3, group_size=3, seed=7)
    groups[1].sequences[0].tokens.extend([9] * 12)
    groups[1].sequences[0].masks.extend([9] * 12)
    return groups


def settings(model_dir: str) -> TrainerSettings:
    # No clipping: the gradients compared below are the raw ones.
    return TrainerSettings(
        model_path=model_dir, checkpoint_dir="", grad_clip=0.0, lr=1e-3, micro_batch_tokens=MICRO_BATCH_TOKENS
    )


def _rank(rank: int, world: int, port: int, model_dir: str, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    from services.trainer.distributed import Ranks

    ranks = Ranks.from_env("cpu")
    core = TrainerCore(settings(model_dir), ranks)
    core.load()
    result = None
    if ranks.is_leader:
        result = core.train(batch(), policy_version=0)
        core.stop_followers()
    else:
        core.follow()
    torch.save(
        {
            "params": {n: p.detach().clone() for n, p in core.inner.named_parameters()},
            "grads": {n: cast(torch.Tensor, p.grad).detach().clone() for n, p in core.inner.named_parameters()},
            "loss": result.metrics.loss if result else None,
            "tokens": result.metrics.tokens if result else None,
            "step": core.step,
        },
        Path(out) / f"rank{rank}.pt",
    )
    ranks.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(180)
def test_two_ranks_hold_identical_weights_after_a_step(tiny_model_dir, tmp_path):
    mp.start_processes(
        _rank, args=(2, free_port(), str(tiny_model_dir), str(tmp_path)), nprocs=2, join=True, start_method="spawn"
    )
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["step"] == r1["step"] == 1
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), name

    # The same step in one process: same loss over the whole batch, same gradient.
    single = TrainerCore(settings(str(tiny_model_dir)))
    single.load()
    initial = {n: p.detach().clone() for n, p in single.inner.named_parameters()}
    result = single.train(batch(), policy_version=0)
    assert r0["loss"] == pytest.approx(result.metrics.loss, rel=1e-5)
    assert r0["tokens"] == result.metrics.tokens
    moved = False
    for name, p in single.inner.named_parameters():
        torch.testing.assert_close(r0["grads"][name], p.grad, atol=1e-6, rtol=1e-4)
        moved |= not torch.equal(r0["params"][name], initial[name])
    assert moved


@pytest.mark.timeout(240)
async def test_torchrun_two_ranks_train_and_push_from_rank_zero(tiny_model_dir, tmp_path):
    """`torchrun --nproc-per-node 2 -m services.trainer`: rank 0 serves, pulls batches and
    pushes weights; rank 1 follows; both write their part of each checkpoint; the job
    ends by itself after num_steps."""
    import asyncio

    from services import launcher
    from trainer_fakes import FakeGateway, FakeShard, Servers, load_model, start_gateway, start_shard

    gateway = FakeGateway([toy_batch(seed=i) for i in range(2)])
    shard = FakeShard(dict(load_model(tiny_model_dir).named_parameters()))
    servers = Servers()
    try:
        server, gateway_target = await start_gateway(gateway)
        servers.servers.append(server)
        server, shard_target = await start_shard(shard)
        servers.servers.append(server)
        ckpt = tmp_path / "ckpt"
        child = await launcher.start(
            "torchrun",
            "torch.distributed.run",
            [
                "--standalone",
                "--nproc-per-node",
                "2",
                "-m",
                "services.trainer",
                "--model-path",
                str(tiny_model_dir),
                "--gateway",
                gateway_target,
                "--inference",
                shard_target,
                "--batch-size",
                "4",
                "--num-steps",
                "2",
                "--checkpoint-dir",
                str(ckpt),
                "--grace-seconds",
                "1",
            ],
            tmp_path / "logs",
        )
        ready = await launcher.wait_ready(child, 120)
        assert ready["rank_count"] == 2
        assert await asyncio.wait_for(child.proc.wait(), 180) == 0, child.log_path.read_text()[-3000:]
        assert child.reader is not None
        await child.reader
        steps = [e for e in child.events if e.get("event") == "step"]
        assert [(e["step"], e["policy_version"], e["sync_ok"]) for e in steps] == [(1, 1, True), (2, 2, True)]
        assert shard.version == 2
        final = ckpt / "step-2"
        assert (final / "rng-rank0.pt").exists() and (final / "rng-rank1.pt").exists()
        trained = load_model(final)
        for name, p in trained.named_parameters():
            assert torch.equal(shard.params[name], p.detach()), name
    finally:
        await servers.stop()
