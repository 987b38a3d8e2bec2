"""Data parallelism across trainer ranks under torchrun.

Rank 0 (the leader) talks to the gateway and the inference shards; every other rank
(a follower) waits for commands from it over the default process group: a batch to
train on, a request to gather the full weights (FSDP2), a checkpoint to write, stop.
Each command is one `broadcast_object_list`, so all ranks run the same collectives in
the same order.

CPU: DDP over gloo (every rank holds full weights; rank 0's are what shards receive).
CUDA: FSDP2 (`fully_shard` per decoder layer, then the root) over NCCL; full weights
are gathered with `DTensor.full_tensor()` on every rank before a push. (The CUDA path
has not run in CI: no GPU there.)

The weight-transfer CollectiveGroup is a standalone process group with its own store,
never the default group used here.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# Followers wait for rank 0 between steps for as long as a step may take; a dead
# leader is noticed by torchrun, which stops the whole job.
DEFAULT_GROUP_TIMEOUT = datetime.timedelta(hours=2)


@dataclass
class Ranks:
    """This process's place among the trainer ranks (a single process by default)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    fsdp: bool = False

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, device: str, environ: dict[str, str] | None = None) -> Ranks:
        """Join the default group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK,
        MASTER_ADDR, MASTER_PORT); a plain process is rank 0 of 1."""
        env = os.environ if environ is None else environ
        world = int(env.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        rank, local = int(env["RANK"]), int(env.get("LOCAL_RANK", "0"))
        cuda = device.startswith("cuda")
        if not dist.is_initialized():
            if cuda:
                torch.cuda.set_device(local)
            dist.init_process_group("nccl" if cuda else "gloo", timeout=DEFAULT_GROUP_TIMEOUT)
        log.info("trainer rank %d of %d (%s)", rank, world, "FSDP2/nccl" if cuda else "DDP/gloo")
        return cls(rank=rank, world_size=world, local_rank=local, fsdp=cuda)

    def device(self, setting: str) -> torch.device:
        """The device this rank trains on: under torchrun on CUDA, its local GPU."""
        if self.distributed and setting.startswith("cuda"):
            return torch.device("cuda", self.local_rank)
        return torch.device(setting)

    # -- model ----------------------------------------------------------------------------

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DDP (CPU) or FSDP2 (CUDA) around `model`; the model itself when alone."""
        if not self.distributed:
            return model
        if self.fsdp:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            layers = getattr(getattr(model, "model", None), "layers", None) or []
            for layer in layers:
                fully_shard(layer, mp_policy=mp)
            fully_shard(model, mp_policy=mp)
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, broadcast_buffers=False)

    @staticmethod
    def unwrap(model: torch.nn.Module) -> torch.nn.Module:
        return getattr(model, "module", model)

    def grad_sync(self, model: torch.nn.Module) -> Callable[[bool], AbstractContextManager]:
        """The context for one micro-batch's backward: gradients are reduced across
        ranks on the last micro-batch only."""
        if not self.distributed:
            return lambda last: contextlib.nullcontext()
        if self.fsdp:

            @contextlib.contextmanager
            def fsdp_sync(last: bool):
                model.set_requires_gradient_sync(last)  # type: ignore[operator]
                yield

            return fsdp_sync
        return lambda last: contextlib.nullcontext() if last else model.no_sync()  # type: ignore[operator]

    def full_weights(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Every parameter in full, by its Hugging Face name. Under FSDP2 this is a
        collective: every rank must call it (followers do on the "weights" command);
        only rank 0 keeps the result."""
        inner = self.unwrap(model)
        if not self.fsdp:
            return {n: p.detach() for n, p in inner.named_parameters()}
        from torch.distributed.tensor import DTensor

        out = {}
        for name, p in inner.named_parameters():
            detached = p.detach()
            full = detached.full_tensor() if isinstance(detached, DTensor) else detached
            if self.is_leader:
                out[name] = full
            else:
                del full
        return out

    # -- commands and reductions ---------------------------------------------------------

    def broadcast_command(self, command: str, payload: Any = None) -> tuple[str, Any]:
        """Rank 0 sends (command, payload); every rank returns it."""
        box: list[Any] = [command, payload] if self.is_leader else [None, None]
        if self.distributed:
            dist.broadcast_object_list(box, src=0)
        return box[0], box[1]

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def all_reduce_max(self, values: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return values

    def all_reduce_device(self) -> torch.device:
        """Where reduction tensors live: NCCL reduces GPU tensors only."""
        return torch.device("cuda", self.local_rank) if self.fsdp else torch.device("cpu")

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()
