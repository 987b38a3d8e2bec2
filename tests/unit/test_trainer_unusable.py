"""The trainer judges every sequence: what it cannot train on is dropped and counted,
an unusable optional field falls back for that sequence and is counted, and the batch
is never failed for either (services/trainer/batching.py)."""

from __future__ import annotations

import math

import pytest
import torch

from clotho.v1 import scored_data_pb2 as sd
from services.trainer.batching import BatchConfig, prepare
from services.trainer.losses import group_advantages


def seq(tokens, score, **fields):
    return sd.ScoredSequence(tokens=tokens, masks=[-100] + tokens[1:], score=score, **fields)


def test_optional_fields_of_the_wrong_length_fall_back_per_sequence_and_are_counted():
    # run-api lets advantages of any length through; the gateway returns them as sent.
    group = sd.ScoredGroup(
        sequences=[
            seq([1, 2, 3], 1.0, advantages=[0.5, 0.5]),  # one short: group advantage
            seq([1, 4, 5], 0.0, advantages=[7.0, 8.0, 9.0]),  # usable: its own
            seq([1, 6], 0.5, inference_logprobs=[-0.1, -0.2, -0.3], ref_logprobs=[-1.0]),
        ]
    )
    b = prepare([group])
    group_adv = group_advantages([1.0, 0.0, 0.5])
    s0, s1, s2 = b.sequences
    assert s0.advantages.tolist() == pytest.approx([group_adv[0]] * 2, rel=1e-5)
    assert s1.advantages.tolist() == pytest.approx([8.0, 9.0])
    assert torch.isnan(s2.old_logprobs).all() and torch.isnan(s2.ref_logprobs).all()
    assert s2.advantages.tolist() == pytest.approx([group_adv[2]], rel=1e-5)
    assert b.fallbacks == {"advantages_length": 1, "inference_logprobs_length": 1, "ref_logprobs_length": 1}
    assert b.dropped == {}


def test_non_finite_optional_fields_fall_back():
    # A float beyond float32 arrives as inf on the wire: not a number to train with.
    group = sd.ScoredGroup(
        sequences=[
            seq([1, 2, 3], 1.0, advantages=[0.0, math.inf, 1.0], inference_logprobs=[0.0, math.nan, -1.0]),
            seq([1, 4, 5], 0.0),
        ]
    )
    b = prepare([group])
    s0, _ = b.sequences
    assert torch.isfinite(s0.advantages).all()
    assert s0.advantages.tolist() == pytest.approx([group_advantages([1.0, 0.0])[0]] * 2, rel=1e-5)
    assert torch.isnan(s0.old_logprobs).all()
    assert b.fallbacks == {"advantages_non_finite": 1, "inference_logprobs_non_finite": 1}


def test_unusable_sequences_are_dropped_counted_and_left_out_of_group_statistics():
    good = [seq([1, 2, 3], 1.0), seq([1, 2, 4], 0.0)]
    bad = [
        sd.ScoredSequence(tokens=[], masks=[], score=1.0),
        seq([1, 2, 99], 1.0),  # outside a vocabulary of 50
        seq([1, -2, 3], 1.0),
        seq([1, 2, 3], math.nan),
        seq([1, 2, 3], -math.inf),
    ]
    b = prepare([sd.ScoredGroup(sequences=good + bad, env_id=3)], BatchConfig(vocab_size=50))
    assert len(b.sequences) == 2
    expected = group_advantages([1.0, 0.0])
    assert [s.advantages[0].item() for s in b.sequences] == pytest.approx(expected, rel=1e-5)
    assert b.scores == [1.0, 0.0] and b.env_scores == {3: [1.0, 0.0]}
    assert b.dropped == {"empty": 1, "token_out_of_vocab": 2, "non_finite_score": 2}
    # Without a known vocabulary only negative ids are out.
    b = prepare([sd.ScoredGroup(sequences=good + bad)])
    assert b.dropped == {"empty": 1, "token_out_of_vocab": 1, "non_finite_score": 2}


def test_a_batch_with_nothing_usable_is_refused_naming_why():
    with pytest.raises(ValueError, match="no usable sequences .*sequence 0: non_finite_score"):
        prepare([sd.ScoredGroup(sequences=[seq([1, 2], math.nan)])])
