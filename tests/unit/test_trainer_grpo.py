"""GRPO maths: advantages, masking, importance ratio, clipping, and that it learns."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from clotho.v1 import scored_data_pb2 as sd
from services.trainer.grpo import (
    GRPOConfig,
    clipped_policy_loss,
    collate,
    group_advantages,
    grpo_backward,
    token_advantages,
    token_logprobs,
)

PROMPT = [1, 10, 11, 12, 13]


@pytest.fixture(scope="module")
def base_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


@pytest.fixture
def model(base_model):
    return copy.deepcopy(base_model).train()


def seq(completion: list[int], score: float, prompt: list[int] = PROMPT, **extra) -> sd.ScoredSequence:
    return sd.ScoredSequence(
        tokens=prompt + completion, masks=[-100] * len(prompt) + completion, score=score, **extra
    )


def batch() -> list[sd.ScoredGroup]:
    return [
        sd.ScoredGroup(sequences=[seq([20, 21, 22], 1.0), seq([23, 24], 0.0), seq([25, 26, 27, 28], 0.5)]),
        sd.ScoredGroup(sequences=[
            seq([30, 31], 2.0, prompt=[1, 14, 15]), seq([32, 33, 34], -2.0, prompt=[1, 14, 15])
        ]),
    ]


def current_logprobs(model, groups) -> list[list[float]]:
    """Per-token log-probs aligned with tokens, 1.0 at position 0 (Atropos convention)."""
    b = collate(groups)
    with torch.no_grad():
        logp, _ = token_logprobs(model, b.input_ids, b.attention_mask)
    seqs = [s for g in groups for s in g.sequences]
    return [[1.0] + logp[i, : len(s.tokens) - 1].tolist() for i, s in enumerate(seqs)]


def with_logprobs(groups, logprobs, prompt_value=1.0) -> list[sd.ScoredGroup]:
    out = copy.deepcopy(groups)
    i = 0
    for g in out:
        for s in g.sequences:
            lp = [prompt_value if m == -100 else v for m, v in zip(s.masks, logprobs[i])]
            s.inference_logprobs[:] = lp
            i += 1
    return out


def test_group_advantages_by_hand():
    scores = [1.0, 2.0, 3.0, 6.0]  # mean 3, deviations -2 -1 0 3, population variance 14/4
    std = math.sqrt(3.5)
    assert group_advantages(scores, eps=0.0) == pytest.approx([-2 / std, -1 / std, 0.0, 3 / std])
    assert group_advantages(scores, normalize_std=False) == pytest.approx([-2.0, -1.0, 0.0, 3.0])
    assert group_advantages([0.7, 0.7, 0.7]) == pytest.approx([0.0, 0.0, 0.0], abs=1e-9)
    assert group_advantages([5.0]) == [0.0]


def test_advantages_are_per_group_and_token_level_ones_override():
    groups = batch()
    override = [0.0, 0.0, 0.0, 0.0, 0.0, 9.0, -9.0, 3.0, 1.5]
    groups[0].sequences[2].advantages[:] = override
    adv = token_advantages(groups, eps=0.0)
    g0 = group_advantages([1.0, 0.0, 0.5], eps=0.0)
    g1 = group_advantages([2.0, -2.0], eps=0.0)
    assert adv[0] == pytest.approx([g0[0]] * 8)
    assert adv[1] == pytest.approx([g0[1]] * 7)
    assert adv[2] == pytest.approx(override)
    assert adv[3] == pytest.approx([g1[0]] * 5) and g1[0] == pytest.approx(1.0)
    assert adv[4] == pytest.approx([g1[1]] * 6)


def test_collate_right_pads_and_masks_targets_by_label():
    groups = batch()
    b = collate(groups, GRPOConfig(pad_token_id=0))
    assert b.input_ids.shape == (5, 9)
    assert b.input_ids[1].tolist() == PROMPT + [23, 24, 0, 0]
    assert b.attention_mask[1].tolist() == [1] * 7 + [0, 0]
    # Target j is token j + 1: the prompt's tokens (and padding) are never targets.
    assert b.loss_mask[1].tolist() == [False] * 4 + [True, True, False, False]
    assert b.num_tokens == 3 + 2 + 4 + 2 + 3
    truncated = collate(groups, GRPOConfig(max_token_len=6))
    # Kept: 1 completion token in each sequence of group 0, 2 and 3 in group 1.
    assert truncated.input_ids.shape == (5, 6) and truncated.num_tokens == 1 + 1 + 1 + 2 + 3


def test_loss_ignores_everything_at_prompt_positions(model):
    groups = batch()
    lp = current_logprobs(model, groups)
    base = grpo_backward(model, with_logprobs(groups, lp)).loss
    shifted = [[v - 0.3 for v in row] for row in lp]  # ratio != 1 so advantages matter
    reference = grpo_backward(model, with_logprobs(groups, shifted)).loss
    assert reference != pytest.approx(base)

    # Prompt-position inference_logprobs and advantages do not matter...
    changed = with_logprobs(groups, shifted, prompt_value=-7.0)
    sequences = [s for g in changed for s in g.sequences]
    for s, adv in zip(sequences, token_advantages(changed)):
        s.advantages[:] = [50.0 if m == -100 else a for m, a in zip(s.masks, adv)]
    assert grpo_backward(model, changed).loss == pytest.approx(reference, rel=1e-5)

    # ...but turning one completion token into a prompt token does.
    masked = with_logprobs(groups, shifted)
    masked[0].sequences[0].masks[6] = -100
    assert grpo_backward(model, masked).loss != pytest.approx(reference, rel=1e-5)


def test_on_policy_ratio_is_one_and_loss_is_minus_mean_advantage(model):
    groups = batch()
    on_policy = with_logprobs(groups, current_logprobs(model, groups))
    metrics = grpo_backward(model, on_policy)
    b = collate(groups)
    mean_adv = float((b.advantages * b.loss_mask).sum() / b.loss_mask.sum())
    assert metrics.ratio_mean == pytest.approx(1.0, abs=1e-5)
    assert metrics.ratio_max == pytest.approx(1.0, abs=1e-5)
    assert metrics.clip_fraction == 0.0
    assert metrics.loss == pytest.approx(-mean_adv, abs=1e-5)
    assert metrics.tokens == b.num_tokens
    assert metrics.mean_score == pytest.approx((1.0 + 0.0 + 0.5 + 2.0 - 2.0) / 5)
    assert metrics.entropy > 0

    # Without inference_logprobs the ratio is 1 by construction: same loss and gradient.
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    no_old = grpo_backward(model, groups)
    assert no_old.loss == pytest.approx(metrics.loss, abs=1e-6)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4)


def test_clipped_tokens_get_no_gradient():
    logp = torch.zeros(5, requires_grad=True)
    old = torch.tensor([-2.0, 0.0, 2.0, -0.1, 2.0])  # ratios e^2, 1, e^-2, e^0.1, e^-2
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 1.0])
    loss, ratio, clipped = clipped_policy_loss(logp, old, adv, clip_eps=0.2)
    loss.sum().backward()
    # Clipped: ratio above 1+eps with A > 0, or below 1-eps with A < 0.
    assert clipped.tolist() == [True, False, True, False, False]
    assert logp.grad[0] == 0 and logp.grad[2] == 0
    assert (logp.grad[[1, 3, 4]] != 0).all()
    assert loss[0].item() == pytest.approx(-1.2) and loss[2].item() == pytest.approx(0.8)
    assert ratio[1].item() == pytest.approx(1.0)


def test_clip_fraction_and_zero_gradient_through_clipped_sequences(model):
    groups = [sd.ScoredGroup(sequences=[seq([20, 21, 22], 1.0), seq([23, 24], 0.0)])]
    lp = current_logprobs(model, groups)
    # The positively-advantaged sequence looks far more likely now than when sampled:
    # ratio e^3 > 1.2, so all 3 of its tokens are clipped; the other one is on-policy.
    crafted = [[v - 3.0 for v in lp[0]], lp[1]]
    metrics = grpo_backward(model, with_logprobs(groups, crafted))
    assert metrics.clip_fraction == pytest.approx(3 / 5)
    assert metrics.ratio_max == pytest.approx(math.exp(3.0), rel=1e-4)

    # With only the clipped sequence left, no gradient reaches the model at all.
    model.zero_grad()
    only_clipped = [sd.ScoredSequence()]
    only_clipped[0].CopyFrom(with_logprobs(groups, crafted)[0].sequences[0])
    only_clipped[0].advantages[:] = [1.0] * len(only_clipped[0].tokens)
    metrics = grpo_backward(model, [sd.ScoredGroup(sequences=only_clipped)])
    assert metrics.clip_fraction == 1.0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_micro_batches_accumulate_the_same_gradient(model):
    groups = batch()
    whole = grpo_backward(model, groups, GRPOConfig(micro_batch_size=8))
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    split = grpo_backward(model, groups, GRPOConfig(micro_batch_size=2))
    assert split.loss == pytest.approx(whole.loss, abs=1e-6)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4)


def test_a_few_steps_raise_the_logprob_of_the_better_completion(model):
    good, bad = [20, 21, 22, 23], [30, 31, 32, 33]
    groups = [sd.ScoredGroup(sequences=[seq(good, 1.0), seq(bad, 0.0)])]

    def completion_logprobs() -> tuple[float, float]:
        b = collate(groups)
        with torch.no_grad():
            logp, _ = token_logprobs(model, b.input_ids, b.attention_mask)
        total = (logp * b.loss_mask).sum(dim=1)
        return float(total[0]), float(total[1])

    good_before, bad_before = completion_logprobs()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(5):
        optimizer.zero_grad()
        grpo_backward(model, groups)
        optimizer.step()
    good_after, bad_after = completion_logprobs()
    assert good_after > good_before + 0.5
    assert bad_after < bad_before - 0.5


def test_malformed_masks_are_rejected():
    bad = sd.ScoredSequence(tokens=[1, 2, 3], masks=[-100, 2], score=1.0)
    with pytest.raises(ValueError, match="2 masks for 3 tokens"):
        collate([sd.ScoredGroup(sequences=[bad])])
