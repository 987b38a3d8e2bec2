"""Sampling penalties in the torch engine (frequency, presence, repetition) against a
plain Hugging Face reference loop: they shape the choice of token per row, only for the
rows that ask, follow a row as others join and leave, and never touch the reported
logprobs (the policy's own)."""

from __future__ import annotations

import asyncio

import pytest

from penalty_reference import penalised_greedy
from services.common.errors import InvalidArgument
from services.inference.generation_types import Completion, GenerationRequest, SamplingOptions
from services.inference.torch_engine.engine import GenerationEngine

PROMPT = [1, 20, 21, 22, 10, 30, 31]
OTHER = [1, 9, 9, 40, 41]


def greedy(**kw) -> SamplingOptions:
    return SamplingOptions(temperature=0.0, ignore_eos=True, **kw)


reference = penalised_greedy


async def run(engine: GenerationEngine, request: GenerationRequest) -> list[Completion]:
    return await engine.submit(request).completions()


PENALTIES = [
    dict(presence_penalty=2.0),
    dict(frequency_penalty=2.0),
    dict(frequency_penalty=0.7, presence_penalty=-0.3),
    dict(repetition_penalty=3.0),
    dict(repetition_penalty=0.5),
    dict(repetition_penalty=1.8, frequency_penalty=0.5, presence_penalty=0.5),
]


@pytest.mark.parametrize("penalties", PENALTIES, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
async def test_greedy_with_penalties_matches_the_reference_loop(engine, hf_model, penalties):
    steps = 24
    plain, _ = reference(hf_model, PROMPT, steps)
    expected, expected_logprobs = reference(
        hf_model,
        PROMPT,
        steps,
        penalties.get("frequency_penalty", 0.0),
        penalties.get("presence_penalty", 0.0),
        penalties.get("repetition_penalty", 1.0),
    )
    assert expected != plain, "the penalty should change this greedy output"
    [c] = await run(engine, GenerationRequest(PROMPT, greedy(max_new_tokens=steps, **penalties)))
    assert list(c.output_ids) == expected
    # Reported logprobs are the policy's own, not the penalised distribution's.
    assert list(c.output_logprobs) == pytest.approx(expected_logprobs, abs=1e-4)


async def test_a_large_presence_penalty_avoids_repeats(engine, hf_model):
    plain, _ = reference(hf_model, PROMPT, 20)
    assert len(set(plain)) < len(plain)
    [c] = await run(engine, GenerationRequest(PROMPT, greedy(max_new_tokens=20, presence_penalty=2.0)))
    assert len(set(c.output_ids)) == len(c.output_ids)


async def test_neutral_penalties_change_nothing(engine, hf_model):
    plain, plain_logprobs = reference(hf_model, PROMPT, 16)
    neutral = greedy(max_new_tokens=16, frequency_penalty=0.0, presence_penalty=0.0, repetition_penalty=1.0)
    for options in (greedy(max_new_tokens=16), neutral):
        [c] = await run(engine, GenerationRequest(PROMPT, options))
        assert list(c.output_ids) == plain
        assert list(c.output_logprobs) == pytest.approx(plain_logprobs, abs=1e-4)


async def test_mixed_batch_rows_get_their_solo_results_as_rows_come_and_go(engine):
    """Penalised and plain rows share batches; short requests finish early so rows move
    slots, and late ones join mid-run: every sample still gets exactly its solo output."""
    requests = [
        GenerationRequest(PROMPT, greedy(max_new_tokens=24, presence_penalty=1.5, frequency_penalty=0.5)),
        GenerationRequest(PROMPT, greedy(max_new_tokens=24)),
        GenerationRequest(OTHER, greedy(max_new_tokens=5)),
        GenerationRequest(OTHER, greedy(max_new_tokens=20, repetition_penalty=2.0, n=2)),
        GenerationRequest([1, 33, 34], greedy(max_new_tokens=6, frequency_penalty=2.0)),
        GenerationRequest(
            [1, 12, 13, 14],
            SamplingOptions(temperature=1.0, seed=3, max_new_tokens=18, ignore_eos=True, presence_penalty=1.0),
        ),
    ]
    solo = [[list(c.output_ids) for c in await run(engine, r)] for r in requests]

    async def late(request: GenerationRequest, delay: float) -> list[Completion]:
        await asyncio.sleep(delay)
        return await run(engine, request)

    together = await asyncio.gather(*(late(r, 0.0 if i % 2 == 0 else 0.02) for i, r in enumerate(requests)))
    assert [[list(c.output_ids) for c in cs] for cs in together] == solo


async def test_seeded_sampling_with_a_penalty_is_reproducible(engine):
    request = GenerationRequest(
        PROMPT, SamplingOptions(temperature=1.0, seed=9, max_new_tokens=16, frequency_penalty=1.0, n=2)
    )
    first = [list(c.output_ids) for c in await run(engine, request)]
    second = [list(c.output_ids) for c in await run(engine, request)]
    assert first == second


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (SamplingOptions(frequency_penalty=2.5), "frequency_penalty must be in [-2, 2]"),
        (SamplingOptions(frequency_penalty=float("nan")), "frequency_penalty"),
        (SamplingOptions(presence_penalty=-2.01), "presence_penalty must be in [-2, 2]"),
        (SamplingOptions(repetition_penalty=0.0), "repetition_penalty must be a finite number > 0"),
        (SamplingOptions(repetition_penalty=-1.0), "repetition_penalty"),
        (SamplingOptions(repetition_penalty=float("inf")), "repetition_penalty"),
    ],
)
async def test_bad_penalties_are_invalid_arguments(engine, options, message):
    with pytest.raises(InvalidArgument, match=message.replace("[", r"\[").replace("]", r"\]")):
        engine.submit(GenerationRequest(PROMPT, options))


async def test_rows_without_penalties_pay_nothing(engine, monkeypatch):
    from services.inference.torch_engine import batch

    def boom(*args, **kwargs):
        raise AssertionError("penalty state built for a batch without penalised rows")

    monkeypatch.setattr(batch._Penalties, "apply", boom)
    monkeypatch.setattr(batch._Penalties, "count", boom)
    [c] = await run(engine, GenerationRequest(PROMPT, greedy(max_new_tokens=8, repetition_penalty=1.0)))
    assert len(c.output_ids) == 8
