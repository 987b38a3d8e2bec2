"""The loss terms against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from services.trainer.losses import (
    RunningMoments,
    decoupled_loss,
    group_advantages,
    k3_kl,
    normalize_advantages,
    ppo_loss,
    token_weights,
    weighted_sft_loss,
)
from services.trainer.schedule import lr_factor

E = math.e


def test_group_advantages_by_hand():
    scores = [1.0, 2.0, 3.0, 6.0]  # mean 3, deviations -2 -1 0 3, population variance 14/4
    std = math.sqrt(3.5)
    assert group_advantages(scores, eps=0.0) == pytest.approx([-2 / std, -1 / std, 0.0, 3 / std])
    # Dr.GRPO: centred only.
    assert group_advantages(scores, normalize_std=False) == pytest.approx([-2.0, -1.0, 0.0, 3.0])
    assert group_advantages([0.7, 0.7, 0.7]) == pytest.approx([0.0, 0.0, 0.0], abs=1e-9)
    assert group_advantages([5.0]) == [0.0]


# Six tokens, current log-prob 0 each, so the ratio is exp(-old):
#   e^2 (A=+1), 1 (A=+1), e^-2 (A=-1), e^0.1 (A=-1), e^-2 (A=+1), e^1.5 (A=-1).
OLD = [-2.0, 0.0, 2.0, -0.1, 2.0, -1.5]
ADV = [1.0, 1.0, -1.0, -1.0, 1.0, -1.0]


def run_ppo(is_cap: float):
    logp = torch.zeros(6, requires_grad=True)
    terms = ppo_loss(logp, torch.tensor(OLD), torch.tensor(ADV), clip_low=0.2, clip_high=0.2, is_cap=is_cap)
    terms.loss.sum().backward()
    return terms, logp.grad


def test_ppo_clip_without_truncation_by_hand():
    terms, grad = run_ppo(is_cap=0.0)
    expected_loss = [
        -1.2,  # ratio e^2 > 1.2 with A > 0: clipped at 1.2
        -1.0,  # on-policy: -A
        0.8,  # ratio e^-2 < 0.8 with A < 0: clipped at 0.8
        math.exp(0.1),  # inside the clip range: -r A
        -math.exp(-2.0),  # below 0.8 but A > 0: the unclipped branch is the smaller one
        math.exp(1.5),  # far above 1.2 with A < 0: PPO leaves it unbounded
    ]
    assert terms.loss.tolist() == pytest.approx(expected_loss, rel=1e-6)
    assert terms.clipped.tolist() == [True, False, True, False, False, False]
    assert not terms.truncated.any()
    # d(-r A)/dlogp = -r A where unclipped, 0 where clipped.
    assert grad.tolist() == pytest.approx([0.0, -1.0, 0.0, math.exp(0.1), -math.exp(-2.0), math.exp(1.5)], rel=1e-6)
    assert terms.ratio.tolist() == pytest.approx([E**2, 1.0, E**-2, E**0.1, E**-2, E**1.5], rel=1e-6)


def test_truncated_importance_sampling_caps_ratio_and_gradient_weight():
    terms, grad = run_ppo(is_cap=2.0)
    # Tokens 0 and 5 have ratios above the cap of 2: their ratio counts as 2.
    assert terms.truncated.tolist() == [True, False, False, False, False, True]
    # Token 0: min(2 * 1, 1.2 * 1) = 1.2 -> still clipped. Token 5: min(2 * -1, 1.2 * -1) = -2.
    assert terms.loss.tolist() == pytest.approx([-1.2, -1.0, 0.8, math.exp(0.1), -math.exp(-2.0), 2.0], rel=1e-6)
    # The truncated token keeps a gradient, with weight cap (2) instead of e^1.5.
    assert grad.tolist() == pytest.approx([0.0, -1.0, 0.0, math.exp(0.1), -math.exp(-2.0), 2.0], rel=1e-6)
    # Reported ratios are the true ones, before truncation.
    assert terms.ratio[5].item() == pytest.approx(E**1.5)


def test_decoupled_gradient_is_truncated_weight_times_advantage_times_grad_logp():
    """Same six tokens as above (current log-prob 0, behaviour ratio exp(-old)): no token is
    clipped, each gives -min(w, cap) * A * grad(logp) with w = pi / pi_behaviour."""
    for cap in (0.0, 2.0):
        logp = torch.zeros(6, requires_grad=True)
        terms = decoupled_loss(logp, torch.tensor(OLD), torch.tensor(ADV), 0.2, 0.2, is_cap=cap)
        terms.loss.sum().backward()
        w = [math.exp(-o) for o in OLD]
        w_used = [min(x, cap) if cap else x for x in w]
        assert logp.grad is not None
        assert logp.grad.tolist() == pytest.approx([-x * a for x, a in zip(w_used, ADV)], rel=1e-6)
        # The loss's value is -w A (the proximal ratio is 1).
        assert terms.loss.tolist() == pytest.approx([-x * a for x, a in zip(w_used, ADV)], rel=1e-6)
        # Nothing clipped (the clip is anchored at the current policy); truncation reported
        # against the cap; the ratio reported is the true one against the sampling policy.
        assert not terms.clipped.any()
        assert terms.truncated.tolist() == ([x > 2.0 for x in w] if cap else [False] * 6)
        assert terms.ratio.tolist() == pytest.approx(w, rel=1e-6)


def test_decoupled_equals_ppo_on_policy():
    """Data sampled by the current policy: both losses, values and gradients, are -A."""
    torch.manual_seed(0)
    base = torch.randn(8)
    adv = torch.randn(8)
    grads = []
    for loss in (ppo_loss, decoupled_loss):
        logp = base.clone().requires_grad_(True)
        terms = loss(logp, base.clone(), adv, 0.2, 0.28, 2.0)
        terms.loss.sum().backward()
        assert terms.loss.tolist() == pytest.approx((-adv).tolist(), rel=1e-6)
        assert not terms.clipped.any() and not terms.truncated.any()
        grads.append(logp.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_decoupled_clips_against_a_proximal_policy():
    """With a proximal policy other than the current one, PPO's clip applies to
    pi / pi_proximal, and the weight is pi_proximal / pi_behaviour."""
    logp = torch.zeros(2, requires_grad=True)
    prox = torch.tensor([-0.5, 0.0])  # ratio e^0.5 ~ 1.65 (clipped for A > 0), then 1
    behaviour = torch.tensor([-0.5, 0.7])  # weights 1 and e^-0.7
    terms = decoupled_loss(logp, behaviour, torch.tensor([1.0, 1.0]), 0.2, 0.2, 2.0, proximal_logp=prox)
    terms.loss.sum().backward()
    assert terms.clipped.tolist() == [True, False]
    assert terms.loss.tolist() == pytest.approx([-1.2, -math.exp(-0.7)], rel=1e-6)
    assert logp.grad is not None
    assert logp.grad.tolist() == pytest.approx([0.0, -math.exp(-0.7)], rel=1e-6)


def test_asymmetric_clip_range():
    logp = torch.zeros(2, requires_grad=True)
    # ratio e^0.25 ~ 1.284: clipped with clip_high 0.2, not with 0.3.
    terms = ppo_loss(logp, torch.tensor([-0.25, -0.25]), torch.tensor([1.0, 1.0]), 0.2, 0.3)
    assert terms.loss.tolist() == pytest.approx([-math.exp(0.25)] * 2)
    assert not terms.clipped.any()
    terms = ppo_loss(logp, torch.tensor([-0.25, -0.25]), torch.tensor([1.0, 1.0]), 0.2, 0.2)
    assert terms.loss.tolist() == pytest.approx([-1.2, -1.2])


def test_k3_kl_by_hand():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.0, -1.0, -1.0])
    # ref - logp = 0, 1, -0.5 -> e^d - d - 1
    assert k3_kl(logp, ref).tolist() == pytest.approx([0.0, E - 2.0, math.exp(-0.5) - 0.5], rel=1e-6)
    # Gradient: d/dlogp (e^(ref-logp) - (ref-logp) - 1) = 1 - e^(ref-logp).
    lp = logp.clone().requires_grad_(True)
    k3_kl(lp, ref).sum().backward()
    assert lp.grad is not None
    assert lp.grad.tolist() == pytest.approx([0.0, 1 - E, 1 - math.exp(-0.5)], rel=1e-6)


def test_advantage_weighted_sft_is_sum_of_ce_times_advantage_over_mask():
    # Two sequences: targets with log-probs (-1, -2) and (-0.5), advantages (1, 2) and (0.5).
    logp = torch.tensor([-1.0, -2.0, -0.5])
    adv = torch.tensor([1.0, 2.0, 0.5])
    per_token = weighted_sft_loss(logp, adv)
    weights = torch.tensor(sum(([w] * n for w, n in zip(token_weights([2, 1], "token"), [2, 1])), []))
    # sum(ce * A * mask) / sum(mask) = (1*1 + 2*2 + 0.5*0.5) / 3
    assert float((per_token * weights).sum()) == pytest.approx((1 + 4 + 0.25) / 3)


def test_token_weights_per_aggregation_mode():
    lengths = [3, 1, 0, 4]
    assert token_weights(lengths, "token") == pytest.approx([1 / 8, 1 / 8, 0.0, 1 / 8])
    # Mean over the 3 sequences with targets of each one's token mean.
    assert token_weights(lengths, "sequence") == pytest.approx([1 / 9, 1 / 3, 0.0, 1 / 12])
    # Dr.GRPO: sum / (sequences * constant).
    assert token_weights(lengths, "constant", constant=10) == pytest.approx([1 / 30, 1 / 30, 0.0, 1 / 30])
    with pytest.raises(ValueError):
        token_weights(lengths, "median")


def test_advantage_normalisation_and_clipping():
    adv = torch.tensor([1.0, 2.0, 3.0, 6.0])
    std = math.sqrt(3.5)
    assert normalize_advantages(adv, "none").tolist() == adv.tolist()
    assert normalize_advantages(adv, "batch", eps=0.0).tolist() == pytest.approx([-2 / std, -1 / std, 0, 3 / std])
    assert normalize_advantages(adv, "batch", clip=1.0, eps=0.0).tolist() == pytest.approx([-1.0, -1 / std, 0, 1.0])
    assert normalize_advantages(adv, "none", clip=2.5).tolist() == [1.0, 2.0, 2.5, 2.5]

    # Global: running statistics over every batch so far.
    moments = RunningMoments()
    first = normalize_advantages(torch.tensor([1.0, 2.0]), "global", moments, eps=0.0)
    assert first.tolist() == pytest.approx([-1.0, 1.0])  # mean 1.5, std 0.5
    second = normalize_advantages(torch.tensor([3.0, 6.0]), "global", moments, eps=0.0)
    assert second.tolist() == pytest.approx([0.0, 3 / std])  # over 1, 2, 3, 6
    assert (moments.count, moments.mean, moments.std) == (4, pytest.approx(3.0), pytest.approx(std))  # type: ignore[comparison-overlap]  # approx's stub type does not say it equals floats
    restored = RunningMoments()
    restored.load_state_dict(moments.state_dict())
    assert (restored.count, restored.mean, restored.std) == (4, pytest.approx(3.0), pytest.approx(std))  # type: ignore[comparison-overlap]  # approx's stub type does not say it equals floats


def test_lr_schedule_warmup_then_cosine_or_constant():
    assert [lr_factor(s, 4, 10, "cosine") for s in (0, 3, 4)] == pytest.approx([0.2, 0.8, 1.0])
    assert lr_factor(7, 4, 10, "cosine") == pytest.approx(0.5)  # half way through the decay
    assert lr_factor(10, 4, 10, "cosine") == pytest.approx(0.0)
    assert lr_factor(12, 4, 10, "cosine", min_ratio=0.1) == pytest.approx(0.1)
    assert [lr_factor(s, 2, 10, "constant") for s in (0, 1, 2, 9)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])
    assert lr_factor(5, 0, 0, "cosine") == 1.0  # no known end: no decay
