"""The "shared_prefix" batch layout (a prompt computed once per group, its completions
attending to it under a 4D mask): the same per-token log-probs, loss, metrics and
gradients as the "rows" layout, for groups sharing a prompt (of different lengths across
groups), a group whose members have different prompts, completions of different
lengths and trees cut by the micro-batch budget; and the split across ranks keeps a
prompt's sequences on one rank."""

from __future__ import annotations

import copy

import pytest
import torch

from clotho.v1 import scored_data_pb2 as sd
from services.trainer.batching import BatchConfig, _trees, micro_batches, plan, prepare, split
from services.trainer.grpo import LossConfig, accumulate, metrics, token_logprobs


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def base_model(request, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=request.param)


def seq(prompt: list[int], completion: list[int], score: float, old: float | None = None) -> sd.ScoredSequence:
    out = sd.ScoredSequence(tokens=prompt + completion, masks=[-100] * len(prompt) + completion, score=score)
    if old is not None:  # sampling log-probs away from the model's: the ratio is clipped somewhere
        out.inference_logprobs.extend([1.0] * len(prompt) + [old] * len(completion))
    return out


def groups() -> list[sd.ScoredGroup]:
    long_prompt = [1, 10, 11, 12, 13, 14, 15, 16, 17]
    short_prompt = [1, 20, 21]
    return [
        # A shared prompt, completions of different lengths.
        sd.ScoredGroup(
            sequences=[
                seq(long_prompt, [30, 31, 32, 33, 34, 35], 1.0, -3.0),
                seq(long_prompt, [36, 37], 0.0, -4.0),
                seq(long_prompt, [30, 38, 39], 0.5, -3.5),
                seq(long_prompt, [31], 0.2, -3.0),
            ]
        ),
        # A shorter shared prompt.
        sd.ScoredGroup(
            sequences=[
                seq(short_prompt, [40, 41, 42], 2.0),
                seq(short_prompt, [43, 44, 45, 46, 47, 48, 49], -2.0),
                seq(short_prompt, [40], 1.0),
            ]
        ),
        # Members with different prompts (one shares the first group's): rows as before.
        sd.ScoredGroup(
            sequences=[
                seq([1, 22, 23, 24], [25, 26], 1.0),
                seq([1, 22, 23, 27, 28], [29, 30, 31], 0.0),
                seq(long_prompt, [32, 33], 0.3),
            ]
        ),
        # A completion with a masked token inside it (targets not contiguous).
        sd.ScoredGroup(
            sequences=[
                sd.ScoredSequence(tokens=short_prompt + [50, 51, 52], masks=[-100] * 3 + [50, -100, 52], score=1.0),
                sd.ScoredSequence(tokens=short_prompt + [53, 54], masks=[-100] * 3 + [53, 54], score=0.0),
            ]
        ),
    ]


def per_sequence_logprobs(model, b, layout: str, budget: int) -> dict[int, torch.Tensor]:
    out: dict[int, list[torch.Tensor]] = {}
    for mb in micro_batches(b.sequences, range(len(b.sequences)), budget, layout):
        with torch.no_grad():
            logp, _ = token_logprobs(model, mb)
        for i in mb.seq_index.unique():
            out.setdefault(int(i), []).append(logp[mb.seq_index == i])
    return {i: torch.cat(v) for i, v in out.items()}


@pytest.mark.parametrize("budget", [10, 24, 40, 4096])
def test_shared_prefix_logprobs_equal_rows(base_model, budget):
    b = prepare(groups())
    rows = per_sequence_logprobs(base_model, b, "rows", budget)
    shared = per_sequence_logprobs(base_model, b, "shared_prefix", budget)
    assert sorted(shared) == sorted(rows) == list(range(len(b.sequences)))
    for i in rows:
        assert shared[i].shape == (len(b.sequences[i].targets),)
        torch.testing.assert_close(shared[i], rows[i], atol=1e-5, rtol=1e-5)


def test_prompts_are_shared_and_computed_once(base_model):
    b = prepare(groups())
    (mb,) = micro_batches(b.sequences, range(len(b.sequences)), 4096, "shared_prefix")
    (plain,) = micro_batches(b.sequences, range(len(b.sequences)), 4096, "rows")
    assert mb.attention_mask is not None and plain.attention_mask is None
    # Long prompt (9) once for 5 sequences, short prompt (3) once for 5: 32 + 12 tokens fewer.
    assert mb.real_tokens == plain.real_tokens - 9 * 4 - 3 * 4
    # Trees by prompt, across groups; a group's members with prompts of their own are
    # trees of one (laid out whole, as in rows).
    assert _trees(b.sequences, range(len(b.sequences))) == [[0, 1, 2, 3, 9], [4, 5, 6, 10, 11], [7], [8]]


def test_no_shared_prompt_is_the_rows_layout(base_model):
    b = prepare([sd.ScoredGroup(sequences=[seq([1, 10 + k], [20, 21, 22], float(k)) for k in range(4)])])
    (shared,) = micro_batches(b.sequences, range(4), 4096, "shared_prefix")
    (plain,) = micro_batches(b.sequences, range(4), 4096, "rows")
    assert shared.attention_mask is None
    for name, value in vars(plain).items():
        other = getattr(shared, name)
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(other, value, rtol=0, atol=0, equal_nan=True, msg=name)
        else:
            assert other == value, name


@pytest.mark.parametrize("budget", [24, 4096])
def test_shared_prefix_gradient_loss_and_metrics_equal_rows(base_model, budget):
    b = prepare(groups())
    grads = {}
    found = {}
    for layout in ("rows", "shared_prefix"):
        model = copy.deepcopy(base_model).train()
        mbs = micro_batches(b.sequences, range(len(b.sequences)), budget, layout)
        sums = accumulate(model, mbs, LossConfig())
        found[layout] = metrics(b, sums).as_dict()
        grads[layout] = [p.grad.clone() for p in model.parameters()]
    for a, c in zip(grads["rows"], grads["shared_prefix"]):
        torch.testing.assert_close(c, a, atol=1e-5, rtol=1e-4)
    assert sum(float(g.abs().sum()) for g in grads["rows"]) > 0
    rows, shared = found["rows"], found["shared_prefix"]
    assert shared.pop("real_token_fraction") != rows.pop("real_token_fraction")
    assert rows["clip_fraction"] > 0
    assert shared == pytest.approx(rows, abs=1e-5)


def test_split_keeps_a_prompt_on_one_rank():
    b = prepare(groups())
    shares = split(b.sequences, 2, "shared_prefix")
    assert sorted(i for s in shares for i in s) == list(range(len(b.sequences)))
    by_prompt: dict[tuple[int, ...], set[int]] = {}
    for r, share in enumerate(shares):
        for i in share:
            s = b.sequences[i]
            by_prompt.setdefault(tuple(s.tokens[: s.targets[0]]), set()).add(r)
    assert all(len(ranks) == 1 for ranks in by_prompt.values())
    assert all(shares)
    # Rows split sequence by sequence, as before.
    assert split(b.sequences, 2) == split(b.sequences, 2, "rows")


def test_split_cuts_a_tree_that_outweighs_a_rank():
    one = [sd.ScoredGroup(sequences=[seq([1, 10, 11, 12], [20 + k, 21], float(k)) for k in range(8)])]
    b = prepare(one)
    shares = split(b.sequences, 2, "shared_prefix")
    assert sorted(len(s) for s in shares) == [4, 4]


def test_batch_config_layout_names():
    assert BatchConfig(layout="shared_prefix").layout == "shared_prefix"
    with pytest.raises(ValueError):
        plan(prepare(groups()).sequences, [0], 64, "trees")
