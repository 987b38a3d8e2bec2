"""The loss terms, as pure functions of per-token tensors (no model, no protobuf).

Every function takes tensors of the same shape, one entry per target token (a
completion token), and returns per-token values; `aggregate` turns them into one
number with per-token weights chosen by the aggregation mode (token mean, sequence
mean, or Dr.GRPO's constant normaliser).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# exp() of a larger log-ratio overflows float32 and turns clipped gradients into NaN
# (0 * inf); ratios that far out are clipped or truncated anyway.
LOG_RATIO_LIMIT = 20.0


def group_advantages(scores: Sequence[float], normalize_std: bool = True, eps: float = 1e-6) -> list[float]:
    """(score - group mean) / (group std + eps), with the population std (np.std's, so a
    group of one has std 0 rather than NaN). Without `normalize_std` (Dr.GRPO) only the
    mean is removed."""
    if not scores:
        return []
    mean = sum(scores) / len(scores)
    centred = [s - mean for s in scores]
    if not normalize_std:
        return centred
    std = math.sqrt(sum(c * c for c in centred) / len(centred))
    return [c / (std + eps) for c in centred]


@dataclass
class PolicyTerms:
    """Per-token pieces of the policy-gradient loss."""

    loss: torch.Tensor  # per-token loss, differentiable
    ratio: torch.Tensor  # pi / pi_inference, detached, before truncation
    clipped: torch.Tensor  # bool: the PPO-clipped branch won (zero gradient)
    truncated: torch.Tensor  # bool: the IS ratio exceeded the cap


def ppo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float,
    clip_high: float,
    is_cap: float = 0.0,
) -> PolicyTerms:
    """PPO-clipped policy loss against the sampling policy's log-probs, with truncated
    importance sampling.

    r = exp(logp - old_logp) is the importance ratio of the current policy against the
    one that sampled the token (`inference_logprobs`). With a cap C > 0 the ratio is
    truncated: r' has value min(r, C) and gradient min(r, C) * grad(logp), so a token the
    sampler found far less likely than we do now cannot dominate the step (the case PPO's
    min does not bound: r large with a negative advantage). Then
        loss = -min(r' A, clip(r', 1 - clip_low, 1 + clip_high) A).
    """
    log_ratio = (logp - old_logp).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    ratio = torch.exp(log_ratio)
    truncated = torch.zeros_like(ratio, dtype=torch.bool)
    if is_cap > 0:
        with torch.no_grad():
            truncated = ratio > is_cap
            scale = torch.where(truncated, is_cap / ratio, torch.ones_like(ratio))
        ratio_used = ratio * scale
    else:
        ratio_used = ratio
    objective, was_clipped = _clipped_objective(ratio_used, advantages, clip_low, clip_high)
    return PolicyTerms(loss=-objective, ratio=ratio.detach(), clipped=was_clipped, truncated=truncated)


def _clipped_objective(
    ratio: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's min(r A, clip(r, 1 - clip_low, 1 + clip_high) A) per token, and where the
    clipped branch won (no gradient there)."""
    objective = torch.minimum(ratio * advantages, ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * advantages)
    with torch.no_grad():
        was_clipped = ((ratio > 1.0 + clip_high) & (advantages > 0)) | ((ratio < 1.0 - clip_low) & (advantages < 0))
    return objective, was_clipped


def decoupled_loss(
    logp: torch.Tensor,
    behaviour_logp: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float,
    clip_high: float,
    is_cap: float = 0.0,
    proximal_logp: torch.Tensor | None = None,
) -> PolicyTerms:
    """Decoupled PPO (Hilton et al. 2021, "Batch size-invariance for policy optimization";
    AReaL's decoupled loss): the clip is anchored at a proximal policy, and the gap from
    the behaviour policy that sampled the token (`inference_logprobs`) is corrected by a
    detached importance weight.

    With `proximal_logp` unset the proximal policy is the current one (one optimizer step
    per batch): r = exp(logp - logp.detach()) has value 1 and gradient grad(logp), so the
    clip never binds, and the weight w = exp(logp.detach() - behaviour_logp), truncated
    at C = is_cap when C > 0 (min(w, C)), carries the off-policy correction:
        loss = -w * min(r A, clip(r, 1 - clip_low, 1 + clip_high) A),
        gradient = -min(w, C) * A * grad(logp).
    Unlike `ppo_loss`, stale data is not clipped away: a token whose sampling policy is a
    few versions old still gives its (reweighted) gradient. With behaviour == current
    it is `ppo_loss` exactly (w = r = 1)."""
    prox = logp.detach() if proximal_logp is None else proximal_logp.detach()
    with torch.no_grad():
        weight = torch.exp((prox - behaviour_logp).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
        truncated = weight > is_cap if is_cap > 0 else torch.zeros_like(weight, dtype=torch.bool)
        weight_used = weight.clamp(max=is_cap) if is_cap > 0 else weight
        # The ratio reported is against the sampling policy, as ppo_loss's: how far the data
        # is off-policy (the weight itself when the proximal policy is the current one).
        behaviour_ratio = (
            weight
            if proximal_logp is None
            else torch.exp((logp.detach() - behaviour_logp).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
        )
    ratio = torch.exp((logp - prox).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
    objective, was_clipped = _clipped_objective(ratio, advantages, clip_low, clip_high)
    return PolicyTerms(loss=-weight_used * objective, ratio=behaviour_ratio, clipped=was_clipped, truncated=truncated)


POLICY_LOSSES = ("ppo", "decoupled")


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref) per sampled token:
    exp(ref - logp) - (ref - logp) - 1 (non-negative, unbiased, low variance)."""
    delta = (ref_logp - logp).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    return torch.exp(delta) - delta - 1.0


def weighted_sft_loss(logp: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """Advantage-weighted cross-entropy per token: ce * A with ce = -logp."""
    return -logp * advantages


def normalize_advantages(
    advantages: torch.Tensor,
    mode: str,
    stats: RunningMoments | None = None,
    clip: float = 0.0,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Standardise the advantages of a batch's target tokens, then clip to [-clip, clip].

    mode "none" leaves them; "batch" uses this batch's mean and std; "global" uses the
    running mean and std over every batch so far (this one included, `stats` updated).
    """
    out = advantages
    if mode == "batch" and advantages.numel():
        mean = advantages.mean()
        std = advantages.std(unbiased=False)
        out = (advantages - mean) / (std + eps)
    elif mode == "global" and advantages.numel():
        if stats is None:
            raise ValueError("global advantage normalisation needs running statistics")
        stats.update(advantages)
        out = (advantages - stats.mean) / (stats.std + eps)
    elif mode not in ("none", "batch", "global"):
        raise ValueError(f"unknown advantage normalisation {mode!r}")
    if clip > 0:
        out = out.clamp(-clip, clip)
    return out


class RunningMoments:
    """Mean and population std over every value seen (Chan et al.'s parallel update)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count else 0.0

    def update(self, values: torch.Tensor) -> None:
        n = int(values.numel())
        if n == 0:
            return
        v = values.detach().double()
        mean = float(v.mean())
        m2 = float(((v - mean) ** 2).sum())
        delta = mean - self.mean
        total = self.count + n
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


AGGREGATIONS = ("token", "sequence", "constant")


def token_weights(lengths: Sequence[int], mode: str, constant: int | None = None) -> list[float]:
    """Per-token weight of each sequence (all its target tokens share it) so that
    sum(weight * per-token loss) over the batch is:
      token:    the mean over every target token of the batch;
      sequence: the mean over sequences of each sequence's token mean;
      constant: the sum over tokens / (sequences * constant) (Dr.GRPO; `constant` is
                the generation budget, e.g. max_token_len).
    Sequences without target tokens get weight 0."""
    live = [n for n in lengths if n > 0]
    if not live:
        return [0.0 for _ in lengths]
    if mode == "token":
        total = sum(live)
        return [1.0 / total if n else 0.0 for n in lengths]
    if mode == "sequence":
        return [1.0 / (n * len(live)) if n else 0.0 for n in lengths]
    if mode == "constant":
        if not constant or constant <= 0:
            raise ValueError("constant aggregation needs a positive constant")
        return [1.0 / (len(live) * constant) if n else 0.0 for n in lengths]
    raise ValueError(f"unknown aggregation {mode!r}; expected one of {', '.join(AGGREGATIONS)}")
