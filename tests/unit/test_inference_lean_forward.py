"""The engine's lean Llama forward (torch_engine/lean_llama.py) gives bit-for-bit the
logits and cache contents of the transformers model on every kind of pass the engine
runs (prefill of left-padded prompts with all or last logits, decode steps, extend), and
an engine serving through it samples the same tokens and logprobs as one calling the
model."""

from __future__ import annotations

import asyncio

import pytest
import torch

from services.inference.generation_types import GenerationRequest, SamplingOptions
from services.inference.torch_engine.engine import GenerationEngine
from services.inference.torch_engine.lean_llama import LeanLlama
from services.inference.torch_engine.runner import ModelRunner


def passes(runner: ModelRunner) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Logits of a prefill (all positions), a prefill into more rows (last), three decode
    steps and an extend; then every layer's K and V."""
    cache = runner.new_cache(8)
    out = [runner.prefill(cache, [[1, 20, 21, 22, 10, 30, 31], [1, 9]], [0, 1], [0, 1], all_logits=True)]
    out.append(runner.prefill(cache, [[1, 40, 41, 42]], [2, 3], [0, 0], all_logits=False))
    for step in range(3):
        out.append(runner.decode(cache, torch.tensor([5 + step, 6, 7, 8 + step])))
    out.append(runner.extend(cache, [[3, 4], [5], [6, 7, 8], [9]]))
    return out, [*cache.k, *cache.v]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@torch.inference_mode()
def test_lean_forward_equals_the_model_bit_for_bit(tiny_model_dir, dtype):
    lean = ModelRunner(tiny_model_dir, "cpu", dtype)
    assert lean.lean is not None
    plain = ModelRunner(tiny_model_dir, "cpu", dtype)
    plain.lean = None
    (got, got_kv), (want, want_kv) = passes(lean), passes(plain)
    for g, w in zip([*got, *got_kv], [*want, *want_kv], strict=True):
        assert g.shape == w.shape
        assert torch.equal(g, w)


def test_lean_forward_applies_only_to_plain_llama(tiny_model_dir):
    runner = ModelRunner(tiny_model_dir, "cpu", "float32")
    assert LeanLlama.supports(runner.model)
    runner.model.train()
    assert not LeanLlama.supports(runner.model)
    runner.model.eval()
    runner.model.config.num_key_value_heads = 1
    assert not LeanLlama.supports(runner.model)


async def sample(engine: GenerationEngine) -> list:
    options = SamplingOptions(temperature=1.0, seed=3, max_new_tokens=6, n=4, ignore_eos=True)
    streams = [engine.submit(GenerationRequest(p, options)) for p in ([1, 20, 21], [1, 9, 8, 7, 6])]
    done = await asyncio.gather(*(s.completions() for s in streams))
    return [(c.output_ids, c.output_logprobs) for cs in done for c in cs]


async def test_an_engine_samples_the_same_through_either_forward(tiny_model_dir):
    results = []
    for use_lean in (True, False):
        engine = GenerationEngine(tiny_model_dir, max_batch_size=16)
        if not use_lean:
            engine.runner.lean = None
        try:
            results.append(await sample(engine))
        finally:
            engine.close()
    assert results[0] == results[1]
