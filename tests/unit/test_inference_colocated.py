"""Colocated mode in the torch engine: it frees its KV cache and pauses, takes the cache
back on resume, and what it generates afterwards is what it would have generated
without the pause (the running rows' keys and values are recomputed)."""

from __future__ import annotations

import asyncio

import torch

from services.inference.generation_types import GenerationRequest, SamplingOptions, TokenChunk
from services.inference.torch_engine.engine import GenerationEngine

PROMPT = [1, 20, 21, 22, 10, 30, 31]


@torch.no_grad()
def reference_greedy(model, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


async def test_release_frees_the_cache_pauses_and_resume_continues_correctly(engine: GenerationEngine, hf_model):
    steps = 40
    expected = reference_greedy(hf_model, PROMPT, steps)
    sampling = SamplingOptions(temperature=0.0, ignore_eos=True, max_new_tokens=steps)
    stream = engine.submit(GenerationRequest(PROMPT, sampling, stream=True))
    events = aiter(stream)
    first = await anext(events)
    assert isinstance(first, TokenChunk)

    released = await asyncio.wrap_future(engine.release_memory())
    assert engine.released
    assert released.phase == "released" and released.kv_cache_bytes == 0 and released.freed_bytes > 0
    assert released.rss_bytes > 0
    # Nothing is generated while the cache is given up.
    generated = engine.tokens_generated
    await asyncio.sleep(0.3)
    assert engine.tokens_generated == generated

    # Requests submitted meanwhile wait.
    waiting = engine.submit(
        GenerationRequest(PROMPT, SamplingOptions(temperature=0.0, ignore_eos=True, max_new_tokens=5))
    )
    await asyncio.sleep(0.1)
    assert engine.tokens_generated == generated

    resumed = await asyncio.wrap_future(engine.resume_memory())
    assert not engine.released and resumed.phase == "resumed"
    tokens = list(first.token_ids)
    async for event in events:
        if isinstance(event, TokenChunk):
            tokens += list(event.token_ids)
    assert tokens == expected
    [late] = await waiting.completions()
    assert list(late.output_ids) == expected[:5]


async def test_release_and_resume_are_idempotent_and_work_when_idle(engine: GenerationEngine, hf_model):
    first = await asyncio.wrap_future(engine.release_memory())
    second = await asyncio.wrap_future(engine.release_memory())
    assert first.phase == second.phase == "released" and second.freed_bytes == 0
    await asyncio.wrap_future(engine.resume_memory())
    await asyncio.wrap_future(engine.resume_memory())
    sampling = SamplingOptions(temperature=0.0, ignore_eos=True, max_new_tokens=8)
    [c] = await engine.submit(GenerationRequest(PROMPT, sampling)).completions()
    assert list(c.output_ids) == reference_greedy(hf_model, PROMPT, 8)
