"""One gradient over packed micro-batches: the GRPO (or advantage-weighted SFT) loss,
optional KL to a reference, and the step's metrics.

The per-token weights of the batch (see `losses.token_weights`) make the sum over every
micro-batch of sum(weight * per-token loss) the configured aggregate over the whole
batch, so gradient accumulation gives exactly the gradient of one big pass; under data
parallelism each rank's share is scaled by the number of ranks, which the gradient
average then undoes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field

import torch

from clotho.v1 import scored_data_pb2
from services.trainer.batching import BatchConfig, MicroBatch, TrainBatch, micro_batches, prepare
from services.trainer.losses import POLICY_LOSSES, decoupled_loss, k3_kl, ppo_loss, weighted_sft_loss

OBJECTIVES = ("grpo", "sft")


@dataclass(frozen=True)
class LossConfig:
    """What is minimised."""

    objective: str = "grpo"
    clip_low: float = 0.2
    clip_high: float = 0.2
    # Truncated importance sampling: cap of the ratio against the sampling policy (0: off).
    is_cap: float = 2.0
    kl_coef: float = 0.0
    # grpo's policy loss: "ppo" clips against the sampling policy; "decoupled" against the
    # current one, with a truncated importance weight for the sampling policy (losses.py).
    policy_loss: str = "ppo"

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, not {self.objective!r}")
        if self.policy_loss not in POLICY_LOSSES:
            raise ValueError(f"policy_loss must be one of {', '.join(POLICY_LOSSES)}, not {self.policy_loss!r}")


# Sums carried across micro-batches (and all-reduced across ranks).
SUM_KEYS = (
    "loss",
    "kl",
    "clipped",
    "truncated",
    "ratio",
    "abs_log_ratio",
    "entropy",
    "targets",
    "with_old",
    "with_ref",
    "real_tokens",
    "processed_tokens",
    "advantage",
)


@dataclass
class StepSums:
    """Additive statistics of one gradient (per rank until reduced)."""

    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(SUM_KEYS, 0.0))
    ratio_max: float = -math.inf
    ratio_min: float = math.inf

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([self.sums[k] for k in SUM_KEYS], dtype=torch.float64)

    def add(self, other: StepSums) -> None:
        for k in SUM_KEYS:
            self.sums[k] += other.sums[k]
        self.ratio_max = max(self.ratio_max, other.ratio_max)
        self.ratio_min = min(self.ratio_min, other.ratio_min)


@dataclass
class GRPOMetrics:
    """What one gradient saw, over every completion token of the batch."""

    loss: float
    kl: float
    clip_fraction: float
    is_truncated_fraction: float
    ratio_mean: float
    ratio_max: float
    ratio_min: float
    abs_log_ratio_mean: float
    entropy: float
    advantage_mean: float
    mean_score: float
    tokens: int
    sequences: int
    real_token_fraction: float
    env_mean_scores: dict[int, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float]:
        out = {k: float(v) for k, v in asdict(self).items() if k != "env_mean_scores"}
        return out


def token_logprobs(
    model: torch.nn.Module, mb: MicroBatch, autocast: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each target of a micro-batch under `model`, and the policy's entropy
    at that position (no gradient). Logits are computed at target columns only."""
    device = mb.input_ids.device
    ctx: AbstractContextManager = (
        torch.autocast(device_type=device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    )
    extra = {}
    if mb.attention_mask is not None:
        extra["attention_mask"] = _attention_mask(model, mb.attention_mask)
    with ctx:
        out = model(
            input_ids=mb.input_ids,
            position_ids=mb.position_ids,
            use_cache=False,
            logits_to_keep=mb.logit_columns,
            **extra,
        )
    logits = out.logits.flatten(0, 1)[mb.logit_index].float()  # [n_targets, V]
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, mb.labels.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def _attention_mask(model: torch.nn.Module, allowed: torch.Tensor) -> torch.Tensor:
    """A micro-batch's 4D mask (True: may attend) as the model's attention takes it:
    boolean for SDPA, additive (0 / dtype min) for eager attention, which adds it."""
    config = getattr(getattr(model, "module", model), "config", None)
    if getattr(config, "_attn_implementation", None) != "eager":
        return allowed
    dtype = next(model.parameters()).dtype
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def micro_batch_loss(
    model: torch.nn.Module, mb: MicroBatch, config: LossConfig, autocast: torch.dtype | None = None
) -> tuple[torch.Tensor, StepSums]:
    """sum(weight * (policy loss + kl_coef * k3 KL)) over the row's targets, and its sums."""
    logp, entropy = token_logprobs(model, mb, autocast)
    has_old = ~torch.isnan(mb.old_logprobs)
    old = torch.where(has_old, mb.old_logprobs, logp.detach())
    if config.objective == "grpo":
        policy = decoupled_loss if config.policy_loss == "decoupled" else ppo_loss
        terms = policy(logp, old, mb.advantages, config.clip_low, config.clip_high, config.is_cap)
        per_token = terms.loss
        ratio, clipped, truncated = terms.ratio, terms.clipped, terms.truncated
    else:
        per_token = weighted_sft_loss(logp, mb.advantages)
        with torch.no_grad():
            ratio = torch.exp((logp - old).clamp(-20, 20))
        clipped = truncated = torch.zeros_like(has_old)
    has_ref = ~torch.isnan(mb.ref_logprobs)
    kl = torch.zeros_like(logp)
    if bool(has_ref.any()):
        kl = torch.where(has_ref, k3_kl(logp, torch.nan_to_num(mb.ref_logprobs)), kl)
        if config.kl_coef:
            per_token = per_token + config.kl_coef * kl
    loss = (per_token * mb.weights).sum()
    real = mb.seq_index >= 0
    sums = StepSums()
    with torch.no_grad():
        s = sums.sums
        s["loss"] = float(loss.detach())
        s["kl"] = float(kl.detach()[real].sum())
        s["clipped"] = float((clipped & real).sum())
        s["truncated"] = float((truncated & has_old & real).sum())
        s["ratio"] = float(ratio[has_old & real].sum())
        s["abs_log_ratio"] = float((logp.detach() - old).abs()[has_old & real].sum())
        s["entropy"] = float(entropy[real].sum())
        s["advantage"] = float(mb.advantages[real].sum())
        s["targets"] = float(real.sum())
        s["with_old"] = float((has_old & real).sum())
        s["with_ref"] = float((has_ref & real).sum())
        s["real_tokens"] = float(mb.real_tokens)
        s["processed_tokens"] = float(mb.length)
        live = ratio[has_old & real]
        if live.numel():
            sums.ratio_max = float(live.max())
            sums.ratio_min = float(live.min())
    return loss, sums


GradSync = Callable[[bool], AbstractContextManager]


def accumulate(
    model: torch.nn.Module,
    micro_batches: Sequence[MicroBatch],
    config: LossConfig,
    *,
    loss_scale: float = 1.0,
    grad_sync: GradSync | None = None,
    autocast: torch.dtype | None = None,
) -> StepSums:
    """Backward every micro-batch into the gradients (not zeroed here). `grad_sync(last)`
    gives the context each backward runs in (data parallelism synchronises gradients on
    the last one only); `loss_scale` multiplies every loss (the number of ranks)."""
    device = next(model.parameters()).device
    total = StepSums()
    for k, mb in enumerate(micro_batches):
        ctx = grad_sync(k == len(micro_batches) - 1) if grad_sync is not None else contextlib.nullcontext()
        with ctx:
            loss, sums = micro_batch_loss(model, mb.to(device), config, autocast)
            (loss * loss_scale).backward()
        total.add(sums)
    return total


def metrics(batch: TrainBatch, sums: StepSums) -> GRPOMetrics:
    """The step's metrics from the (all-ranks) sums."""
    s = sums.sums
    targets = max(s["targets"], 1.0)
    with_old = s["with_old"]
    return GRPOMetrics(
        loss=s["loss"],
        kl=s["kl"] / targets,
        clip_fraction=s["clipped"] / targets,
        is_truncated_fraction=s["truncated"] / with_old if with_old else 0.0,
        ratio_mean=s["ratio"] / with_old if with_old else 1.0,
        ratio_max=sums.ratio_max if with_old else 1.0,
        ratio_min=sums.ratio_min if with_old else 1.0,
        abs_log_ratio_mean=s["abs_log_ratio"] / with_old if with_old else 0.0,
        entropy=s["entropy"] / targets,
        advantage_mean=s["advantage"] / targets,
        mean_score=sum(batch.scores) / len(batch.scores),
        tokens=int(s["targets"]),
        sequences=len(batch.sequences),
        real_token_fraction=s["real_tokens"] / s["processed_tokens"] if s["processed_tokens"] else 1.0,
        env_mean_scores={e: sum(v) / len(v) for e, v in sorted(batch.env_scores.items())},
    )


def grpo_backward(
    model: torch.nn.Module,
    groups: Sequence[scored_data_pb2.ScoredGroup] | TrainBatch,
    loss: LossConfig = LossConfig(),
    batch_config: BatchConfig = BatchConfig(),
    *,
    policy_version: int = 0,
) -> GRPOMetrics:
    """Single-process convenience: prepare, lay out and accumulate the whole batch's
    gradient into `model` (gradients are not zeroed, no optimizer step)."""
    batch = groups if isinstance(groups, TrainBatch) else prepare(groups, batch_config, policy_version=policy_version)
    indices = range(len(batch.sequences))
    mbs = micro_batches(batch.sequences, indices, batch_config.micro_batch_tokens, batch_config.layout)
    sums = accumulate(model, mbs, loss)
    return metrics(batch, sums)
