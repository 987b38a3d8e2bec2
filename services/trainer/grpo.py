"""GRPO on Atropos scored groups: advantages, padding, token log-probs, clipped loss.

Conventions (Atropos): per-token lists (masks, advantages, inference_logprobs) are
aligned with `tokens`; `masks[t] == -100` marks a prompt token; prompt positions of
`inference_logprobs` hold 1.0. Token t is predicted from position t - 1, so every
per-token quantity of the loss is taken at positions 1..T-1.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from clotho.v1 import scored_data_pb2

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
# exp() of a larger log-ratio overflows float32 and turns clipped gradients into NaN
# (0 * inf); ratios that far out are clipped anyway.
LOG_RATIO_LIMIT = 20.0


@dataclass(frozen=True)
class GRPOConfig:
    """How the loss is computed."""

    clip_eps: float = 0.2
    normalize_std: bool = True
    # Added to the group std so a group of equal scores gets advantage 0, not NaN.
    std_eps: float = 1e-6
    micro_batch_size: int = 8
    max_token_len: int | None = None
    pad_token_id: int = 0


@dataclass
class PaddedBatch:
    """Right-padded tensors of a batch; per-token fields are at target positions 1..T-1."""

    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] long, 0 on padding
    loss_mask: torch.Tensor  # [B, T-1] bool: target is a completion token
    advantages: torch.Tensor  # [B, T-1] float32
    old_logprobs: torch.Tensor  # [B, T-1] float32, meaningful where has_old
    has_old: torch.Tensor  # [B, T-1] bool: inference_logprobs were sent for the sequence
    scores: torch.Tensor  # [B] float64

    @property
    def num_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def rows(self, start: int, stop: int) -> "PaddedBatch":
        """Rows [start, stop), trimmed to their own longest sequence."""
        length = int(self.attention_mask[start:stop].sum(dim=1).max())
        length = max(length, 2)
        return PaddedBatch(
            input_ids=self.input_ids[start:stop, :length],
            attention_mask=self.attention_mask[start:stop, :length],
            loss_mask=self.loss_mask[start:stop, : length - 1],
            advantages=self.advantages[start:stop, : length - 1],
            old_logprobs=self.old_logprobs[start:stop, : length - 1],
            has_old=self.has_old[start:stop, : length - 1],
            scores=self.scores[start:stop],
        )

    def to(self, device: torch.device | str) -> "PaddedBatch":
        return PaddedBatch(**{k: v.to(device) for k, v in vars(self).items()})


@dataclass
class GRPOMetrics:
    """What one GRPO backward pass saw. Token statistics are over completion tokens."""

    loss: float
    clip_fraction: float
    ratio_mean: float
    ratio_max: float
    entropy: float
    mean_score: float
    advantage_mean: float
    tokens: int
    sequences: int

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def group_advantages(scores: Sequence[float], normalize_std: bool = True, eps: float = 1e-6) -> list[float]:
    """(score - group mean) / (group std + eps), with the population std (np.std's, so a
    group of one has std 0 rather than NaN)."""
    if not scores:
        return []
    mean = sum(scores) / len(scores)
    centred = [s - mean for s in scores]
    if not normalize_std:
        return centred
    std = math.sqrt(sum(c * c for c in centred) / len(centred))
    return [c / (std + eps) for c in centred]


def token_advantages(
    groups: Sequence[scored_data_pb2.ScoredGroup], normalize_std: bool = True, eps: float = 1e-6
) -> list[list[float]]:
    """Per-token advantages of every sequence, in batch order: the group-normalised
    score, replaced by the environment's own per-token advantages where it sent them."""
    out: list[list[float]] = []
    for group in groups:
        per_seq = group_advantages([s.score for s in group.sequences], normalize_std, eps)
        for seq, adv in zip(group.sequences, per_seq):
            n = len(seq.tokens)
            if len(seq.advantages) == n:
                out.append(list(seq.advantages))
            else:
                if len(seq.advantages):
                    log.warning(
                        "sequence sent %d advantages for %d tokens; using the group advantage",
                        len(seq.advantages), n,
                    )
                out.append([adv] * n)
    return out


def collate(groups: Sequence[scored_data_pb2.ScoredGroup], config: GRPOConfig = GRPOConfig()) -> PaddedBatch:
    """Right-pad every sequence of the batch into one tensor set (packing comes later).

    Raises ValueError when a sequence's masks do not line up with its tokens.
    """
    advantages = token_advantages(groups, config.normalize_std, config.std_eps)
    seqs = [seq for group in groups for seq in group.sequences]
    if not seqs:
        raise ValueError("batch has no sequences")
    limit = config.max_token_len
    lengths = []
    for i, seq in enumerate(seqs):
        if len(seq.masks) != len(seq.tokens):
            raise ValueError(f"sequence {i}: {len(seq.masks)} masks for {len(seq.tokens)} tokens")
        n = len(seq.tokens) if limit is None else min(len(seq.tokens), limit)
        lengths.append(n)
    b, t = len(seqs), max(max(lengths), 2)
    input_ids = torch.full((b, t), config.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((b, t), dtype=torch.long)
    labels = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)
    adv = torch.zeros((b, t), dtype=torch.float32)
    old = torch.zeros((b, t), dtype=torch.float32)
    has_old = torch.zeros((b, t), dtype=torch.bool)
    for i, (seq, n) in enumerate(zip(seqs, lengths)):
        input_ids[i, :n] = torch.tensor(seq.tokens[:n], dtype=torch.long)
        attention_mask[i, :n] = 1
        labels[i, :n] = torch.tensor(seq.masks[:n], dtype=torch.long)
        adv[i, :n] = torch.tensor(advantages[i][:n], dtype=torch.float32)
        if len(seq.inference_logprobs) == len(seq.tokens):
            old[i, :n] = torch.tensor(seq.inference_logprobs[:n], dtype=torch.float32)
            has_old[i, :n] = True
        elif len(seq.inference_logprobs):
            log.warning(
                "sequence %d sent %d inference_logprobs for %d tokens; treating it as on-policy",
                i, len(seq.inference_logprobs), len(seq.tokens),
            )
    return PaddedBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        loss_mask=labels[:, 1:] != IGNORE_INDEX,
        advantages=adv[:, 1:],
        old_logprobs=old[:, 1:],
        has_old=has_old[:, 1:],
        scores=torch.tensor([s.score for s in seqs], dtype=torch.float64),
    )


def token_logprobs(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each token given its prefix and the policy's entropy there, both
    [B, T-1] (position j is token j + 1). Entropy carries no gradient."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logp_all = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    logp = logp_all.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def clipped_policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO-clipped per-token loss -min(r A, clip(r, 1-eps, 1+eps) A) with r = exp(logp - old).

    Returns (loss per token, ratio (detached), clipped): `clipped` marks tokens whose
    clipped branch won, i.e. whose gradient is zero.
    """
    ratio = torch.exp((logp - old_logp).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantages
    loss = -torch.minimum(unclipped, clipped)
    with torch.no_grad():
        was_clipped = ((ratio > 1.0 + clip_eps) & (advantages > 0)) | ((ratio < 1.0 - clip_eps) & (advantages < 0))
    return loss, ratio.detach(), was_clipped


def grpo_backward(
    model: torch.nn.Module,
    groups: Sequence[scored_data_pb2.ScoredGroup] | PaddedBatch,
    config: GRPOConfig = GRPOConfig(),
) -> GRPOMetrics:
    """Accumulate the gradient of the batch's token-mean GRPO loss into `model`.

    Runs forward/backward in micro-batches of `config.micro_batch_size` sequences; each
    micro-batch's loss is divided by the whole batch's token count, so the accumulated
    gradient is that of one token-mean over every completion token of the batch. The
    importance ratio uses `inference_logprobs` where sent, else the current log-probs
    (ratio 1). Does not zero gradients or step an optimizer.
    """
    batch = groups if isinstance(groups, PaddedBatch) else collate(groups, config)
    device = next(model.parameters()).device
    total_tokens = batch.num_tokens
    denom = max(total_tokens, 1)
    loss_sum = clipped_sum = ratio_sum = entropy_sum = adv_sum = 0.0
    ratio_max = 0.0
    rows = batch.input_ids.shape[0]
    step = max(config.micro_batch_size, 1)
    for start in range(0, rows, step):
        micro = batch.rows(start, min(start + step, rows)).to(device)
        if not bool(micro.loss_mask.any()):
            continue
        logp, entropy = token_logprobs(model, micro.input_ids, micro.attention_mask)
        old = torch.where(micro.has_old, micro.old_logprobs, logp.detach())
        per_token, ratio, was_clipped = clipped_policy_loss(logp, old, micro.advantages, config.clip_eps)
        mask = micro.loss_mask
        loss = (per_token * mask).sum() / denom
        loss.backward()
        loss_sum += float(loss.detach())
        clipped_sum += float((was_clipped & mask).sum())
        ratio_sum += float((ratio * mask).sum())
        ratio_max = max(ratio_max, float(ratio[mask].max()))
        entropy_sum += float((entropy * mask).sum())
        adv_sum += float((micro.advantages * mask).sum())
    return GRPOMetrics(
        loss=loss_sum,
        clip_fraction=clipped_sum / denom,
        ratio_mean=ratio_sum / denom if total_tokens else 1.0,
        ratio_max=ratio_max if total_tokens else 1.0,
        entropy=entropy_sum / denom,
        mean_score=float(batch.scores.mean()),
        advantage_mean=adv_sum / denom,
        tokens=total_tokens,
        sequences=rows,
    )
