"""Batches -> packed micro-batches -> loss and gradient, on the tiny model: packing is
exact, the assembled loss is the hand formula, accumulation and data order do not
change the gradient, and a few steps learn."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from clotho.v1 import scored_data_pb2 as sd
from services.trainer.batching import BatchConfig, pack, prepare
from services.trainer.grpo import LossConfig, accumulate, grpo_backward, metrics, micro_batch_loss, token_logprobs
from services.trainer.losses import k3_kl, ppo_loss

PROMPT = [1, 10, 11, 12, 13]


@pytest.fixture(scope="module")
def base_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


@pytest.fixture
def model(base_model):
    return copy.deepcopy(base_model).train()


def seq(completion: list[int], score: float, prompt: list[int] = PROMPT, **extra) -> sd.ScoredSequence:
    return sd.ScoredSequence(tokens=prompt + completion, masks=[-100] * len(prompt) + completion, score=score, **extra)


def batch() -> list[sd.ScoredGroup]:
    return [
        sd.ScoredGroup(env_id=0, sequences=[seq([20, 21, 22], 1.0), seq([23, 24], 0.0), seq([25, 26, 27, 28], 0.5)]),
        sd.ScoredGroup(
            env_id=3, sequences=[seq([30, 31], 2.0, prompt=[1, 14, 15]), seq([32, 33, 34], -2.0, prompt=[1, 14, 15])]
        ),
    ]


def alone_logprobs(model, tokens: list[int]) -> list[float]:
    """Log-prob of tokens[1:] given their prefix, the sequence run on its own (the
    reference packing must match), aligned with tokens (1.0 at position 0)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens]), use_cache=False).logits[0]
    logp = torch.log_softmax(logits[:-1].float(), -1).gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0]
    return [1.0] + logp.tolist()


def with_logprobs(groups, shift: float, model, field: str = "inference_logprobs") -> list[sd.ScoredGroup]:
    out = copy.deepcopy(groups)
    for g in out:
        for s in g.sequences:
            lp = alone_logprobs(model, list(s.tokens))
            getattr(s, field)[:] = [1.0 if m == -100 else v + shift for m, v in zip(s.masks, lp)]
    return out


def test_packed_logprobs_equal_unpacked(model):
    """Transformers builds a block-diagonal causal mask from position ids that restart
    at 0 (attention_mask None, no cache): sequences packed in one row do not see each
    other. If that ever stops being true, packing is wrong and this fails."""
    b = prepare(batch())
    rows = pack(b.sequences, range(len(b.sequences)), budget=64)
    assert len(rows) == 1 and rows[0].real_tokens == b.num_tokens  # one row, no padding
    with torch.no_grad():
        logp, _ = token_logprobs(model, rows[0])
    expected = []
    for i in rows[0].seq_index.unique_consecutive().tolist():
        s = b.sequences[i]
        lp = alone_logprobs(model, s.tokens)
        expected += [lp[t] for t in s.targets]
    torch.testing.assert_close(logp, torch.tensor(expected), atol=1e-5, rtol=1e-5)


def test_prepare_targets_advantages_logprobs_and_truncation():
    groups = batch()
    override = [0.0] * 5 + [9.0, -9.0, 3.0, 1.5]
    groups[0].sequences[2].advantages[:] = override
    groups[0].sequences[0].inference_logprobs[:] = [1.0] * 5 + [-0.1, -0.2, -0.3]
    b = prepare(groups, BatchConfig(std_eps=0.0))
    s0, s1, s2, s3 = b.sequences[:4]
    # Targets are the completion tokens (positions 5.. of the 5-token prompt).
    assert s0.targets == [5, 6, 7] and s3.targets == [3, 4]
    g0 = [(1.0 - 0.5) / math.sqrt(1 / 6), (0.0 - 0.5) / math.sqrt(1 / 6)]
    assert s0.advantages.tolist() == pytest.approx([g0[0]] * 3, rel=1e-5)
    assert s1.advantages.tolist() == pytest.approx([g0[1]] * 2, rel=1e-5)
    assert s2.advantages.tolist() == pytest.approx([9.0, -9.0, 3.0, 1.5])  # per-token override
    assert s3.advantages.tolist() == pytest.approx([1.0, 1.0])  # (2 - 0) / 2
    assert s0.old_logprobs.tolist() == pytest.approx([-0.1, -0.2, -0.3])
    assert torch.isnan(s1.old_logprobs).all() and torch.isnan(s0.ref_logprobs).all()
    assert [s.weight for s in b.sequences] == pytest.approx([1 / 14] * 5)
    assert b.env_scores == {0: [1.0, 0.0, 0.5], 3: [2.0, -2.0]}

    truncated = prepare(groups, BatchConfig(max_token_len=6))
    assert [len(s.targets) for s in truncated.sequences] == [1, 1, 1, 2, 3]

    bad = sd.ScoredSequence(tokens=[1, 2, 3], masks=[-100, 2], score=1.0)
    with pytest.raises(ValueError, match="2 masks for 3 tokens"):
        prepare([sd.ScoredGroup(sequences=[bad])])


def test_stale_sequences_are_dropped_and_counted():
    groups = batch()
    versions = [5, 3, 1, 4, 2]
    for s, v in zip((s for g in groups for s in g.sequences), versions):
        s.policy_version = v
    b = prepare(groups, BatchConfig(max_staleness=2), policy_version=5)
    # Staleness 0, 2, 4, 1, 3: the ones 4 and 3 versions old are dropped.
    assert b.staleness == [0, 2, 4, 1, 3] and b.stale_dropped == 2
    assert [s.staleness for s in b.sequences] == [0, 2, 1]
    # Advantages still come from the whole group: sequence 0 keeps its group's value.
    assert b.sequences[0].advantages[0].item() == pytest.approx(prepare(batch()).sequences[0].advantages[0].item())


def test_micro_batch_loss_is_the_hand_formula(model):
    """Packed loss with off-policy logprobs, truncation and KL = sum over targets of
    weight * (PPO term + kl_coef * k3), every term computed from unpacked log-probs."""
    groups = with_logprobs(batch(), shift=-0.4, model=model)
    groups = with_logprobs(groups, shift=0.3, model=model, field="ref_logprobs")
    config = LossConfig(clip_low=0.2, clip_high=0.28, is_cap=1.3, kl_coef=0.05)
    b = prepare(groups, BatchConfig(aggregation="sequence"))
    rows = pack(b.sequences, range(len(b.sequences)), budget=16)  # several rows
    assert len(rows) > 1
    total = sum(float(micro_batch_loss(model, r, config)[0].detach()) for r in rows)

    expected = 0.0
    for s in b.sequences:
        lp = torch.tensor([alone_logprobs(model, s.tokens)[t] for t in s.targets])
        terms = ppo_loss(lp, s.old_logprobs, s.advantages, 0.2, 0.28, 1.3)
        kl = k3_kl(lp, s.ref_logprobs)
        expected += float(((terms.loss + 0.05 * kl) * s.weight).sum())
    assert total == pytest.approx(expected, rel=1e-4, abs=1e-6)
    # Ratio e^0.4 ~ 1.49 > cap 1.3 everywhere.
    m = metrics(b, accumulate(model, rows, config))
    assert m.is_truncated_fraction == 1.0 and m.ratio_mean == pytest.approx(math.exp(0.4), rel=1e-4)
    # k3 with ref - logp = 0.3 at every target.
    assert m.kl == pytest.approx(math.exp(0.3) - 0.3 - 1, rel=1e-4)


def test_decoupled_loss_weights_stale_tokens_instead_of_clipping_them(model):
    """Data sampled by a policy the trainer now finds e^0.4 ~ 1.49 times likelier at every
    target: PPO clips every positive-advantage token (ratio > 1.28); the decoupled loss
    clips none and gives the on-policy gradient scaled by the truncated weight (cap 1.3)."""
    stale = with_logprobs(batch(), shift=-0.4, model=model)
    ppo = grpo_backward(model, stale, LossConfig(clip_low=0.2, clip_high=0.28, is_cap=1.3))
    assert ppo.clip_fraction > 0.3
    model.zero_grad()
    config = LossConfig(clip_low=0.2, clip_high=0.28, is_cap=1.3, policy_loss="decoupled")
    m = grpo_backward(model, stale, config)
    decoupled = [p.grad.clone() for p in model.parameters()]
    assert m.clip_fraction == 0.0 and m.is_truncated_fraction == 1.0
    assert m.ratio_mean == pytest.approx(math.exp(0.4), rel=1e-4)
    model.zero_grad()
    on_policy = grpo_backward(model, with_logprobs(batch(), shift=0.0, model=model), config)
    assert m.loss == pytest.approx(1.3 * on_policy.loss, rel=1e-4)
    for g, p in zip(decoupled, model.parameters()):
        torch.testing.assert_close(g, 1.3 * p.grad, atol=1e-6, rtol=1e-4)
    with pytest.raises(ValueError, match="policy_loss"):
        LossConfig(policy_loss="ppo2")


def test_sft_objective_is_advantage_weighted_cross_entropy(model):
    b = prepare(batch())
    rows = pack(b.sequences, range(len(b.sequences)), budget=64)
    loss = float(micro_batch_loss(model, rows[0], LossConfig(objective="sft"))[0].detach())
    ce_adv = [
        -alone_logprobs(model, s.tokens)[t] * float(a) for s in b.sequences for t, a in zip(s.targets, s.advantages)
    ]
    assert loss == pytest.approx(sum(ce_adv) / len(ce_adv), rel=1e-5)


def test_on_policy_ratio_is_one_and_loss_is_minus_mean_advantage(model):
    on_policy = with_logprobs(batch(), shift=0.0, model=model)
    m = grpo_backward(model, on_policy)
    b = prepare(on_policy)
    mean_adv = float(torch.cat([s.advantages for s in b.sequences]).mean())
    assert m.ratio_mean == pytest.approx(1.0, abs=1e-5) and m.ratio_max == pytest.approx(1.0, abs=1e-5)
    assert m.clip_fraction == 0.0 and m.is_truncated_fraction == 0.0
    assert m.loss == pytest.approx(-mean_adv, abs=1e-5)
    assert m.tokens == 14 and m.sequences == 5 and m.real_token_fraction == 1.0
    assert m.mean_score == pytest.approx((1.0 + 0.0 + 0.5 + 2.0 - 2.0) / 5)
    assert m.env_mean_scores == {0: pytest.approx(0.5), 3: pytest.approx(0.0)}
    assert m.entropy > 0

    # Without inference_logprobs the ratio is 1 by construction: same loss and gradient.
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    no_old = grpo_backward(model, batch())
    assert no_old.loss == pytest.approx(m.loss, abs=1e-6)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4)


def test_micro_batches_accumulate_the_same_gradient(model):
    for aggregation in ("token", "sequence"):
        model.zero_grad()
        whole = grpo_backward(
            model, batch(), batch_config=BatchConfig(micro_batch_tokens=4096, aggregation=aggregation)
        )
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        split = grpo_backward(model, batch(), batch_config=BatchConfig(micro_batch_tokens=10, aggregation=aggregation))
        assert split.loss == pytest.approx(whole.loss, abs=1e-6)
        for g, p in zip(grads, model.parameters()):
            torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4)


def test_bf16_autocast_stays_close_to_float32(model):
    b = prepare(batch())
    row = pack(b.sequences, range(len(b.sequences)), budget=64)[0]
    full = float(micro_batch_loss(model, row, LossConfig())[0].detach())
    half = float(micro_batch_loss(model, row, LossConfig(), autocast=torch.bfloat16)[0].detach())
    assert half == pytest.approx(full, abs=0.05)


def test_a_few_steps_raise_the_logprob_of_the_better_completion(model):
    good, bad = [20, 21, 22, 23], [30, 31, 32, 33]
    groups = [sd.ScoredGroup(sequences=[seq(good, 1.0), seq(bad, 0.0)])]

    def completion_logprobs() -> tuple[float, float]:
        good_logprob, bad_logprob = (sum(alone_logprobs(model, PROMPT + c)[len(PROMPT) :]) for c in (good, bad))
        return good_logprob, bad_logprob

    good_before, bad_before = completion_logprobs()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(5):
        optimizer.zero_grad()
        grpo_backward(model, groups)
        optimizer.step()
    good_after, bad_after = completion_logprobs()
    assert good_after > good_before + 0.5
    assert bad_after < bad_before - 0.5
