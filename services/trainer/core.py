"""The torch side of the trainer on one rank: model, optimizer, LR schedule, steps,
checkpoints. No asyncio and no gRPC: the Learner runs these methods in its torch thread
(rank 0), and every other rank runs `follow()`, which executes rank 0's commands.

A step on every rank: the same batch (rank 0 broadcasts it) -> advantages and weights
(deterministic, so equal everywhere) -> this rank's balanced share of the sequences,
packed -> as many micro-batches as the busiest rank has (a rank short of work runs
zero-weight ones, so collectives line up) -> gradients all-reduced on the last one ->
clip -> optimizer and scheduler step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from clotho.v1 import scored_data_pb2
from services.common.telemetry import child_span
from services.common.weight_wire import build_manifest, lay_out_parameters
from services.common.weight_wire.dtypes import from_name
from services.trainer import checkpoint
from services.trainer.batching import BatchConfig, TrainBatch, dummy_micro_batch, micro_batches, plan, prepare, split
from services.trainer.distributed import Ranks
from services.trainer.grpo import GRPOMetrics, LossConfig, StepSums, accumulate, metrics
from services.trainer.losses import RunningMoments
from services.trainer.schedule import build_scheduler
from services.trainer.settings import TrainerSettings

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    metrics: GRPOMetrics
    grad_norm: float
    lr: float
    batch: TrainBatch


@dataclass
class Restored:
    """What a checkpoint said, once loaded."""

    path: Path
    step: int
    policy_version: int
    weights_published: bool


def loss_config(s: TrainerSettings) -> LossConfig:
    return LossConfig(
        objective=s.objective,
        clip_low=s.clip_eps,
        clip_high=s.clip_eps if s.clip_eps_high is None else s.clip_eps_high,
        is_cap=s.is_cap,
        kl_coef=s.kl_coef,
        policy_loss=s.policy_loss,
    )


def batch_config(s: TrainerSettings) -> BatchConfig:
    return BatchConfig(
        normalize_std=s.normalize_std,
        adv_norm=s.adv_norm,
        adv_clip=s.adv_clip,
        aggregation=s.aggregation,
        max_token_len=s.max_token_len,
        micro_batch_tokens=s.micro_batch_tokens,
        layout=s.batch_layout,
        max_staleness=None if s.max_staleness < 0 else s.max_staleness,
    )


@contextlib.contextmanager
def step_threads(threads: int | None) -> Iterator[None]:
    """Run the block on `threads` intra-op threads (None: as set), then restore them."""
    before = torch.get_num_threads()
    if threads is None or threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class TrainerCore:
    def __init__(self, settings: TrainerSettings, ranks: Ranks | None = None) -> None:
        self.settings = settings
        self.ranks = ranks or Ranks()
        self.device = self.ranks.device(settings.device)
        self.loss = loss_config(settings)
        self.batching = batch_config(settings)
        self.moments = RunningMoments()
        self.model: torch.nn.Module | None = None  # wrapped (DDP/FSDP) when distributed
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.autocast: torch.dtype | None = None
        self.step = 0
        self.pad_token_id = 0
        self.laid_out = False
        self.parameters = 0  # the model's parameter count (whole, before any wrapper)

    @property
    def inner(self) -> torch.nn.Module:
        """The Hugging Face model inside any DDP wrapper."""
        assert self.model is not None
        return self.ranks.unwrap(self.model)

    # -- setup ------------------------------------------------------------------------

    def load(self, resume_from: Path | None = None) -> Restored | None:
        """Build model, optimizer and scheduler, from `resume_from` (a checkpoint) when
        given. Every rank calls it (reading the same files)."""
        from transformers import AutoModelForCausalLM

        s = self.settings
        torch.manual_seed(s.seed + self.ranks.rank)
        source = resume_from if resume_from is not None else s.model_path
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
        # transformers wraps `to` with functools.wraps(Module.to), which types it unbound.
        model.to(self.device)  # type: ignore[arg-type]
        model.train()
        pad = getattr(model.config, "pad_token_id", None)
        self.pad_token_id = int(pad) if isinstance(pad, int) and pad >= 0 else 0
        # A sequence with a token id the embedding cannot look up is dropped (batching).
        vocab = int(cast(torch.nn.Embedding, model.get_input_embeddings()).num_embeddings)
        self.batching = dataclasses.replace(self.batching, vocab_size=vocab)
        attention = getattr(model.config, "_attn_implementation", None)
        if self.batching.layout == "shared_prefix" and attention not in ("sdpa", "eager"):
            # Its 4D mask needs an attention that takes one.
            log.warning("batch layout shared_prefix needs sdpa or eager attention, not %s: using rows", attention)
            self.batching = dataclasses.replace(self.batching, layout="rows")
        self.autocast = self._autocast_dtype()
        self.parameters = sum(p.numel() for p in model.parameters())
        self.laid_out = self._lay_out_for_sync(model)
        self.model = self.ranks.wrap(model)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=s.lr,
            betas=s.betas,
            weight_decay=s.weight_decay,
            # One fused kernel over every parameter (as transformers' default optimizer);
            # not under FSDP2, whose DTensor parameters take the for-each path.
            fused=not self.ranks.fsdp and self.device.type in ("cpu", "cuda"),
        )
        self.scheduler = build_scheduler(self.optimizer, s.warmup_steps, s.num_steps, s.lr_schedule, s.min_lr_ratio)
        log.info(
            "loaded %s (%d parameters) on %s%s",
            source,
            sum(p.numel() for p in model.parameters()),
            self.device,
            f", autocast {self.autocast}" if self.autocast else "",
        )
        if resume_from is None:
            return None
        return self._restore(resume_from)

    def _lay_out_for_sync(self, model: torch.nn.Module) -> bool:
        """On rank 0, when the weights travel in the parameters' own dtype, keep the
        parameters laid out as the weight-sync buckets: pushes then send straight from
        them, with no packing copy. (Not under FSDP2, which owns parameter storage.)"""
        s = self.settings
        if not (self.ranks.is_leader and s.inference) or self.ranks.fsdp:
            return False
        named = [(n, p.detach()) for n, p in model.named_parameters()]
        wire = from_name(s.sync_dtype)
        if wire is not None and any(t.dtype != wire for _, t in named):
            return False
        lay_out_parameters(model, build_manifest(named, s.bucket_bytes, wire))
        return True

    def _autocast_dtype(self) -> torch.dtype | None:
        mode = self.settings.autocast
        if mode == "off":
            return None
        if mode == "bf16":
            return torch.bfloat16
        if self.device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None

    def _restore(self, path: Path) -> Restored:
        state = checkpoint.read_state(path)
        assert self.optimizer is not None and self.model is not None
        optim_state = checkpoint.load_optimizer_state(path)
        if optim_state is not None:
            if self.ranks.fsdp:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

                set_optimizer_state_dict(
                    self.model,
                    self.optimizer,
                    optim_state,
                    options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
                )
            else:
                self.optimizer.load_state_dict(optim_state)
        sched_state = checkpoint.load_scheduler_state(path)
        if sched_state is not None:
            self.scheduler.load_state_dict(sched_state)
        if "moments" in state:
            self.moments.load_state_dict(state["moments"])
        checkpoint.restore_rng(path, self.ranks.rank)
        self.step = int(state["step"])
        return Restored(path, self.step, int(state["policy_version"]), bool(state.get("weights_published", True)))

    # -- steps ------------------------------------------------------------------------

    def check(self, groups: Sequence[scored_data_pb2.ScoredGroup], policy_version: int) -> TrainBatch:
        """Raise ValueError for a malformed batch (rank 0 checks before broadcasting).
        Returns the batch as prepared without the running advantage moments."""
        return prepare(groups, self.batching, policy_version=policy_version, moments=RunningMoments())

    def train(self, groups: Sequence[scored_data_pb2.ScoredGroup], policy_version: int) -> StepResult:
        """Rank 0: one optimizer step on `groups`, every rank taking part."""
        checked = self.check(groups, policy_version)
        if self.ranks.distributed:
            self.ranks.broadcast_command("step", ([g.SerializeToString() for g in groups], policy_version))
        # The checked batch is the step's own unless advantages are normalised by the
        # running moments (which the step's prepare updates).
        return self._step(groups, policy_version, None if self.batching.adv_norm == "global" else checked)

    def _step(
        self, groups: Sequence[scored_data_pb2.ScoredGroup], policy_version: int, prepared: TrainBatch | None = None
    ) -> StepResult:
        assert self.model is not None and self.optimizer is not None
        ranks = self.ranks
        # Spans of the step's phases (children of the trainer.step span on rank 0; other
        # ranks, with no step span current, make none).
        with child_span("trainer.prepare_batch", groups=len(groups)):
            batch = prepared or prepare(groups, self.batching, policy_version=policy_version, moments=self.moments)
            budget, layout = self.batching.micro_batch_tokens, self.batching.layout
            shares = split(batch.sequences, ranks.world_size, layout)
            mine = micro_batches(batch.sequences, shares[ranks.rank], budget, layout)
            # Every rank runs as many micro-batches as the busiest one.
            rows = max(max(len(plan(batch.sequences, share, budget, layout)) for share in shares), 1)
            mine += [dummy_micro_batch(self.pad_token_id) for _ in range(rows - len(mine))]

        # One thread setting for the step's forward/backward and its optimizer step.
        with step_threads(self._threads_for(batch.num_tokens)):
            with child_span("trainer.forward_backward", micro_batches=len(mine), sequences=len(batch.sequences)):
                self.model.train()
                self.optimizer.zero_grad(set_to_none=True)
                sums = accumulate(
                    self.model,
                    mine,
                    self.loss,
                    loss_scale=float(ranks.world_size),
                    grad_sync=ranks.grad_sync(self.model),
                    autocast=self.autocast,
                )
                sums = self._reduce(sums)
            with child_span("trainer.optimizer_step"):
                max_norm = self.settings.grad_clip if self.settings.grad_clip > 0 else float("inf")
                norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
                grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP2
                lr = float(self.optimizer.param_groups[0]["lr"])
                self.optimizer.step()
                self.scheduler.step()
        self.step += 1
        return StepResult(metrics(batch, sums), grad_norm, lr, batch)

    def _threads_for(self, tokens: int) -> int | None:
        """The intra-op threads for a step over `tokens` tokens: one below the
        single_thread_work setting, else None (the process's own)."""
        limit = self.settings.single_thread_work
        return 1 if limit > 0 and self.parameters * tokens < limit else None

    def _reduce(self, sums: StepSums) -> StepSums:
        if not self.ranks.distributed:
            return sums
        device = self.ranks.all_reduce_device()
        total = self.ranks.all_reduce_sum(sums.as_tensor().to(device)).cpu()
        extremes = self.ranks.all_reduce_max(
            torch.tensor([sums.ratio_max, -sums.ratio_min], dtype=torch.float64, device=device)
        ).cpu()
        out = StepSums()
        out.sums = dict(zip(out.sums.keys(), (float(v) for v in total)))
        out.ratio_max, out.ratio_min = float(extremes[0]), -float(extremes[1])
        return out

    # -- weights and checkpoints --------------------------------------------------------

    def full_weights(self) -> dict[str, torch.Tensor]:
        """Rank 0: every parameter in full (gathered from every rank under FSDP2)."""
        assert self.model is not None
        if self.ranks.fsdp:
            self.ranks.broadcast_command("weights")
        return self.ranks.full_weights(self.model)

    def save(self, directory: str | Path, state: dict[str, Any]) -> Path:
        """Rank 0: write a checkpoint of this step with every rank's part."""
        tmp = checkpoint.begin(directory, self.step)
        self.ranks.broadcast_command("save", str(tmp))
        self._save_parts(tmp, {"step": self.step, "moments": self.moments.state_dict(), **state})
        return checkpoint.finish(directory, tmp, self.step, self.settings.checkpoint_keep)

    def _save_parts(self, tmp: str | Path, state: dict[str, Any] | None) -> None:
        assert self.model is not None and self.optimizer is not None
        checkpoint.write_rng(tmp, self.ranks.rank)
        model_state = optim_state = None
        if self.ranks.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_state = get_model_state_dict(self.model, options=options)
            optim_state = get_optimizer_state_dict(self.model, self.optimizer, options=options)
        elif self.ranks.is_leader:
            optim_state = self.optimizer.state_dict()
        if self.ranks.is_leader:
            assert state is not None
            checkpoint.write_leader(
                tmp,
                self.inner,
                state=state,
                optimizer_state=optim_state,
                scheduler_state=self.scheduler.state_dict(),
                model_state=model_state,
            )
        # Rank 0 publishes the checkpoint only once every rank has written its part.
        self.ranks.barrier()

    # -- followers ----------------------------------------------------------------------

    def stop_followers(self) -> None:
        self.ranks.broadcast_command("stop")

    def follow(self) -> None:
        """Ranks > 0: run rank 0's commands until it says stop."""
        while True:
            command, payload = self.ranks.broadcast_command("")
            if command == "step":
                raw, version = payload
                groups = [scored_data_pb2.ScoredGroup.FromString(b) for b in raw]
                self._step(groups, version)
            elif command == "weights":
                self.ranks.full_weights(self.model)  # type: ignore[arg-type]
            elif command == "save":
                self._save_parts(payload, None)
            elif command == "stop":
                return
            else:
                raise RuntimeError(f"unknown command from rank 0: {command!r}")
