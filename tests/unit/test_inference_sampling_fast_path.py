"""The sampler's fast path (every row samples its whole softmax from one generator)
draws exactly the tokens the general path draws, in the same generator order, and the
engine takes it only where it applies."""

from __future__ import annotations

import asyncio
import dataclasses

import torch

from services.inference.generation_types import GenerationRequest, SamplingOptions
from services.inference.torch_engine import batch as batch_module
from services.inference.torch_engine.engine import GenerationEngine
from services.inference.torch_engine.sampling import choose_tokens, sample_plain


def test_fast_path_draws_what_the_general_path_draws():
    torch.manual_seed(0)
    rows, vocab = 7, 50
    logits = torch.randn(rows, vocab) * 3
    temperature = torch.tensor([1.0, 0.7, 1.3, 1.0, 2.0, 0.5, 1.0])
    keys = [(3, 1), (1, 0), (3, 0), (2, 2), (1, 1), (2, 0), (2, 1)]
    order = torch.tensor(sorted(range(rows), key=keys.__getitem__))
    for seed in range(20):
        general, fast = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        want = choose_tokens(
            logits, temperature, torch.ones(rows), torch.zeros(rows, dtype=torch.long), [general] * rows, keys
        )
        assert torch.equal(sample_plain(logits, temperature, fast, order), want)
        assert torch.equal(general.get_state(), fast.get_state())
    # Rows already in key order need no permutation.
    general, fast = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    in_order = [(0, i) for i in range(rows)]
    want = choose_tokens(
        logits, temperature, torch.ones(rows), torch.zeros(rows, dtype=torch.long), [general] * rows, in_order
    )
    assert torch.equal(sample_plain(logits, temperature, fast, None), want)


async def run(engine: GenerationEngine, requests: list[GenerationRequest]) -> list:
    done = await asyncio.gather(*(engine.submit(r).completions() for r in requests))
    return [(c.output_ids, c.output_logprobs, c.version_spans) for cs in done for c in cs]


def workload() -> list[GenerationRequest]:
    """Rows of three requests on the engine's generator; the first one ends first, so
    rows from the end move into its place (out of their drawing order)."""

    def opts(n: int, new: int) -> SamplingOptions:
        return SamplingOptions(temperature=1.0, max_new_tokens=new, ignore_eos=True, n=n)

    return [
        GenerationRequest([1, 20, 21, 22], opts(4, 2)),
        GenerationRequest([1, 9], opts(3, 6)),
        GenerationRequest([1, 30, 31, 32, 33, 34], opts(2, 8)),
    ]


async def test_engine_samples_the_same_with_and_without_the_fast_path(tiny_model_dir, monkeypatch):
    fast_calls = 0
    reordered = False
    real = batch_module.sample_plain

    def counted(*args):
        nonlocal fast_calls, reordered
        fast_calls += 1
        reordered |= args[3] is not None
        return real(*args)

    of = batch_module._Params.of

    def general_only(cls, *args):
        return dataclasses.replace(of(*args), plain=False)

    monkeypatch.setattr(batch_module, "sample_plain", counted)
    results = []
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(batch_module._Params, "of", classmethod(general_only))
        engine = GenerationEngine(tiny_model_dir, max_batch_size=16, seed=4)
        try:
            results.append(await run(engine, workload()))
        finally:
            engine.close()
        if fast:
            assert fast_calls > 0 and reordered
            fast_calls = 0
    assert fast_calls == 0
    assert results[0] == results[1]


async def test_fast_path_only_where_it_applies(tiny_model_dir, monkeypatch):
    taken: list[bool] = []
    of = batch_module._Params.of

    def recorded(cls, *args):
        params = of(*args)
        taken.append(params.plain)
        return params

    monkeypatch.setattr(batch_module._Params, "of", classmethod(recorded))
    engine = GenerationEngine(tiny_model_dir, max_batch_size=16)
    try:
        cases = {
            "plain": SamplingOptions(temperature=0.8, max_new_tokens=2, n=2),
            "greedy": SamplingOptions(temperature=0.0, max_new_tokens=2, n=2),
            "top_k": SamplingOptions(temperature=1.0, top_k=5, max_new_tokens=2, n=2),
            "top_p": SamplingOptions(temperature=1.0, top_p=0.9, max_new_tokens=2, n=2),
            "own generator": SamplingOptions(temperature=1.0, seed=1, max_new_tokens=2, n=2),
        }
        for name, options in cases.items():
            taken.clear()
            await engine.submit(GenerationRequest([1, 9, 8], options)).completions()
            assert taken and all(taken) == (name in ("plain", "own generator")), name
        # Two requests with different generators in one batch: the general path.
        taken.clear()
        streams = [
            engine.submit(GenerationRequest([1, 9], SamplingOptions(temperature=1.0, seed=s, max_new_tokens=3)))
            for s in (1, 2)
        ]
        await asyncio.gather(*(s.completions() for s in streams))
        assert False in taken
    finally:
        engine.close()
