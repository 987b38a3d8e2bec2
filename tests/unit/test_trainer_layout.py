"""The "rows" batch layout (one padded row per sequence, shorter ones sharing a row):
log-probs equal each sequence run alone, and the gradient and metrics equal the packed
layout's (only the padding counted in real_token_fraction differs)."""

from __future__ import annotations

import copy

import pytest
import torch

from clotho.v1 import scored_data_pb2 as sd
from services.trainer.batching import BatchConfig, micro_batches, plan, prepare
from services.trainer.grpo import grpo_backward, token_logprobs

PROMPT = [1, 10, 11, 12, 13]


@pytest.fixture(scope="module")
def base_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def seq(completion: list[int], score: float, prompt: list[int] = PROMPT) -> sd.ScoredSequence:
    return sd.ScoredSequence(tokens=prompt + completion, masks=[-100] * len(prompt) + completion, score=score)


def batch() -> list[sd.ScoredGroup]:
    # Lengths 13, 7, 8, 6, 5, 4: the short ones share rows as wide as the longest.
    return [
        sd.ScoredGroup(
            sequences=[seq([20, 21, 22, 23, 24, 25, 26, 27], 1.0), seq([23, 24], 0.0), seq([25, 26, 27], 0.5)]
        ),
        sd.ScoredGroup(
            sequences=[seq([30, 31, 32], 2.0, prompt=[1, 14, 15]), seq([32, 33], -2.0, prompt=[1, 14, 15])]
            + [seq([34], 1.0, prompt=[1, 16, 17])]
        ),
    ]


def alone(model, tokens: list[int]) -> list[float]:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens]), use_cache=False).logits[0]
    logp = torch.log_softmax(logits[:-1].float(), -1).gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0]
    return [1.0] + logp.tolist()


@pytest.mark.parametrize("budget", [13, 26, 64, 4096])
def test_rows_logprobs_equal_each_sequence_alone(base_model, budget):
    b = prepare(batch())
    plans = plan(b.sequences, range(len(b.sequences)), budget, "rows")
    assert sorted(i for mb in plans for row in mb for i in row) == list(range(len(b.sequences)))
    mbs = micro_batches(b.sequences, range(len(b.sequences)), budget, "rows")
    assert all(mb.length <= max(budget, 13) for mb in mbs)
    if budget >= 26:
        assert any(len(row) > 1 for mb in plans for row in mb)  # some rows are shared
    for mb in mbs:
        with torch.no_grad():
            logp, _ = token_logprobs(base_model, mb)
        expected = []
        for i, n in zip(*mb.seq_index.unique_consecutive(return_counts=True)):
            s = b.sequences[int(i)]
            lp = alone(base_model, s.tokens)
            assert int(n) == len(s.targets)
            expected += [lp[t] for t in s.targets]
        torch.testing.assert_close(logp, torch.tensor(expected), atol=1e-5, rtol=1e-5)


def test_equal_lengths_take_one_row_each(base_model):
    groups = [sd.ScoredGroup(sequences=[seq([20 + k, 21, 22], float(k)) for k in range(4)])]
    b = prepare(groups)
    (mb,) = micro_batches(b.sequences, range(4), 4096, "rows")
    assert tuple(mb.input_ids.shape) == (4, 8) and mb.real_tokens == 32
    assert mb.logit_columns.tolist() == [4, 5, 6]  # the completion columns only


def test_rows_gradient_and_metrics_equal_packed(base_model):
    grads = {}
    found = {}
    for layout in ("packed", "rows"):
        model = copy.deepcopy(base_model).train()
        found[layout] = grpo_backward(model, batch(), batch_config=BatchConfig(layout=layout, micro_batch_tokens=26))
        grads[layout] = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(grads["packed"], grads["rows"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    packed, rows = found["packed"].as_dict(), found["rows"].as_dict()
    assert packed.pop("real_token_fraction") == 1.0 and rows.pop("real_token_fraction") < 1.0
    assert rows == pytest.approx(packed, abs=1e-5)
