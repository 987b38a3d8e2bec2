"""Continuous batching in the torch engine: requests join and leave a running batch
between decode steps and come out exactly as they do alone; running rows are never
prefilled again when others join; the bounds on rows and KV tokens queue requests; a
weight commit lands between two steps for every row in flight."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from services.common.errors import InvalidArgument
from services.inference.generation_types import (
    Completion,
    FinishReason,
    GenerationRequest,
    SamplingOptions,
    TokenChunk,
    VersionSpan,
)
from services.inference.torch_engine.engine import GenerationEngine
from waiting import wait_until


def greedy(**kw) -> SamplingOptions:
    return SamplingOptions(temperature=0.0, ignore_eos=True, **kw)


def seeded(seed: int, **kw) -> SamplingOptions:
    return SamplingOptions(temperature=1.0, seed=seed, ignore_eos=True, **kw)


# Different prompt lengths, output lengths, samplers and n, so rows join and leave at
# different steps.
REQUESTS = [
    GenerationRequest([1, 20, 21, 22, 10, 30, 31], greedy(max_new_tokens=24), stream=True),
    GenerationRequest([1, 9], greedy(max_new_tokens=10), stream=True),
    GenerationRequest([1, 40, 41, 42, 43, 44, 12, 13, 14, 15, 16], seeded(7, max_new_tokens=16, top_k=20), stream=True),
    GenerationRequest([5, 6, 7, 8, 9], seeded(11, max_new_tokens=12, n=3, top_p=0.9), stream=True),
    GenerationRequest([1, 33, 34], greedy(max_new_tokens=16, n=2), stream=True),
    GenerationRequest([1, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28], seeded(3, max_new_tokens=8), stream=True),
]


class Watched:
    """A request's events as they arrive."""

    def __init__(self, engine: GenerationEngine, request: GenerationRequest) -> None:
        self.chunks = 0
        self.completions: dict[int, Completion] = {}
        self.task = asyncio.ensure_future(self._run(engine.submit(request)))

    async def _run(self, stream) -> None:
        async for event in stream:
            if isinstance(event, TokenChunk):
                self.chunks += 1
            else:
                self.completions[event.index] = event

    async def result(self) -> list[Completion]:
        await self.task
        return [self.completions[i] for i in sorted(self.completions)]


def record_prefills(engine: GenerationEngine) -> list[list[list[int]]]:
    """Every prefill pass's sequences, as the runner is asked for them."""
    calls: list[list[list[int]]] = []
    original = engine.runner.prefill

    def prefill(cache, sequences, dest, src, all_logits):
        calls.append([list(s) for s in sequences])
        return original(cache, sequences, dest, src, all_logits)

    engine.runner.prefill = prefill  # type: ignore[method-assign]
    return calls


class DecodeGate:
    """Stops the engine's worker before a chosen decode pass until released, so a test
    can act while rows are known to be mid-decode (however fast the worker runs)."""

    def __init__(self, engine: GenerationEngine) -> None:
        self.passes = 0
        self._pause_at: int | None = None
        self._paused = threading.Event()
        self._go = threading.Event()
        original = engine.runner.decode

        def decode(cache, tokens):
            if self._pause_at is not None and self.passes >= self._pause_at:
                self._pause_at = None
                self._paused.set()
                self._go.wait()
                self._go.clear()
            self.passes += 1
            return original(cache, tokens)

        engine.runner.decode = decode  # type: ignore[method-assign]

    def arm(self, passes: int) -> None:
        """Hold the worker once `passes` more decode passes have run (call it while the
        worker is held or idle, so that the count starts from a known pass)."""
        self._paused.clear()
        self._pause_at = self.passes + passes

    async def held(self) -> None:
        await asyncio.to_thread(self._paused.wait)

    def release(self) -> None:
        self._go.set()


@pytest.fixture
def engine(tiny_model_dir):
    eng = GenerationEngine(tiny_model_dir, max_batch_size=16)
    yield eng
    eng.close()


async def test_requests_joining_a_running_batch_match_their_solo_runs(engine):
    alone = [await Watched(engine, r).result() for r in REQUESTS]

    prefills = record_prefills(engine)
    gate = DecodeGate(engine)
    gate.arm(3)
    watched = [Watched(engine, REQUESTS[0])]
    for request in REQUESTS[1:]:
        # Join while the earlier ones are mid-decode: the worker is held three decode
        # passes after the last one joined (every request decodes at least 8 tokens).
        await gate.held()
        assert engine.active_samples > 0
        watched.append(Watched(engine, request))
        gate.arm(3)
        gate.release()
    await gate.held()
    gate.release()
    together = [await w.result() for w in watched]

    for request, solo, joined in zip(REQUESTS, alone, together):
        assert len(joined) == request.sampling.n
        for a, b in zip(solo, joined):
            assert b.output_ids == a.output_ids
            assert b.finish_reason is FinishReason.LENGTH and len(b.output_ids) == request.sampling.max_new_tokens
            torch.testing.assert_close(
                torch.tensor(b.output_logprobs), torch.tensor(a.output_logprobs), atol=1e-4, rtol=0
            )
    assert len({c.output_ids for c in together[3]}) > 1, "the n seeded samples should differ"

    # Running rows were never prefilled again: each pass holds only newcomers' prompts,
    # and a request with n samples was prefilled once.
    prompts = [list(r.input_ids) for r in REQUESTS]
    passed = [seq for call in prefills for seq in call]
    assert sorted(passed) == sorted(prompts)


async def test_bounds_queue_requests_until_rows_and_tokens_free_up(tiny_model_dir):
    eng = GenerationEngine(tiny_model_dir, max_batch_size=2, max_batch_tokens=50)
    try:
        alone = [await Watched(eng, r).result() for r in REQUESTS[:3]]
        with pytest.raises(InvalidArgument, match="more than max_batch_tokens 50"):
            eng.submit(GenerationRequest([1] * 20, greedy(max_new_tokens=10, n=2)))

        # Two rows run; the third waits (rows), then joins when the short one leaves.
        first = Watched(eng, REQUESTS[0])  # 7 + 24 tokens reserved
        await wait_until(lambda: first.chunks >= 1)
        second = Watched(eng, REQUESTS[1])  # 2 + 10
        third = Watched(eng, REQUESTS[2])  # 11 + 16: over the token bound next to the first
        await wait_until(lambda: eng.active_samples == 2 and eng.queued_samples == 1)
        assert eng.load == 3
        await second.result()
        # The second left, but the third still does not fit next to the first's tokens.
        assert eng.queued_samples == 1 and not third.completions
        results = [await first.result(), await second.result(), await third.result()]
        assert [[c.output_ids for c in r] for r in results] == [[c.output_ids for c in r] for r in alone]
        assert eng.queued_samples == 0 and eng.load == 0
    finally:
        eng.close()


def perturbed(model, scale: float = 0.05, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: p.detach() + scale * torch.randn(p.shape, generator=gen) for name, p in model.named_parameters()}


@torch.no_grad()
def reference_greedy(model, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


async def test_commit_lands_between_steps_for_every_row_in_flight(engine, tiny_model_dir):
    old_model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    new_weights = perturbed(old_model, seed=1)
    new_model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    new_model.load_state_dict(new_weights, strict=False)

    a_prompt, b_prompt, c_prompt = [1, 20, 21, 22, 10, 30, 31], [1, 9, 8, 7], [1, 44, 45]
    a = Watched(engine, GenerationRequest(a_prompt, greedy(max_new_tokens=60), stream=True))
    await wait_until(lambda: a.chunks >= 8)
    b = Watched(engine, GenerationRequest(b_prompt, greedy(max_new_tokens=50), stream=True))
    await wait_until(lambda: b.chunks >= 3)
    policy = await asyncio.wrap_future(engine.commit_weights(new_weights, version=1, step=5))
    assert policy.version == 1
    c = Watched(engine, GenerationRequest(c_prompt, greedy(max_new_tokens=10), stream=True))
    [ca], [cb], [cc] = await a.result(), await b.result(), await c.result()

    for prompt, done in ((a_prompt, ca), (b_prompt, cb)):
        spans = done.version_spans
        assert len(spans) == 2 and spans[0] == VersionSpan(0, 0) and spans[1].version == 1
        k = spans[1].start_token
        out = list(done.output_ids)
        # Before the commit: the old weights' greedy continuation; after it: the new
        # weights' continuation of what was generated so far (its KV recomputed).
        assert out[:k] == reference_greedy(old_model, prompt, k)
        assert out[k:] == reference_greedy(new_model, prompt + out[:k], len(out) - k)
    assert cc.version_spans == (VersionSpan(0, 1),)
    assert list(cc.output_ids) == reference_greedy(new_model, c_prompt, 10)


@torch.no_grad()
def test_prompt_prefill_then_extend_equals_prefilling_whole_sequences(tiny_model_dir):
    """The recompute after a commit: each prompt prefilled (shared by its rows), then every
    row's generated tokens in one extend pass, gives the logits and the cache a prefill of
    the whole sequences gives (and the decode step after it agrees)."""
    from services.inference.torch_engine.runner import ModelRunner

    runner = ModelRunner(tiny_model_dir, "cpu", "float32")
    prompts = [[1, 20, 21, 22, 10, 30, 31], [1, 9]]
    outputs = [[5, 6, 7], [8], [40, 41, 42, 43, 44], [3, 3]]
    prompt_of = [0, 0, 1, 1]
    whole = [prompts[p] + o for p, o in zip(prompt_of, outputs)]
    rows = list(range(len(whole)))

    full = runner.new_cache(8)
    want = runner.prefill(full, whole, rows, rows, all_logits=False)[:, -1]
    split = runner.new_cache(8)
    runner.prefill(split, prompts, rows, prompt_of, all_logits=False)
    got = runner.extend(split, outputs)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert [e - s for s, e in zip(split.starts, split.ends)] == [len(w) for w in whole]
    step = torch.tensor([11, 12, 13, 14])
    torch.testing.assert_close(runner.decode(split, step), runner.decode(full, step), atol=1e-4, rtol=0)


async def test_recompute_after_a_commit_prefills_each_prompt_once(engine, tiny_model_dir):
    old_model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    new_weights = perturbed(old_model, seed=2)
    new_model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    new_model.load_state_dict(new_weights, strict=False)
    prefills = record_prefills(engine)

    a_prompt, b_prompt = [1, 20, 21, 22, 10, 30, 31], [1, 9, 8, 7]
    a = Watched(engine, GenerationRequest(a_prompt, greedy(max_new_tokens=40, n=3), stream=True))
    b = Watched(engine, GenerationRequest(b_prompt, greedy(max_new_tokens=40), stream=True))
    await wait_until(lambda: a.chunks >= 12 and b.chunks >= 4)
    await asyncio.wrap_future(engine.commit_weights(new_weights, version=1, step=1))
    done_a, [done_b] = await a.result(), await b.result()

    # Every prefill ran prompts only: the completions so far went through extend.
    assert all(seq in (a_prompt, b_prompt) for call in prefills for seq in call)
    for prompt, done in [*((a_prompt, d) for d in done_a), (b_prompt, done_b)]:
        k = done.version_spans[1].start_token
        out = list(done.output_ids)
        assert out[:k] == reference_greedy(old_model, prompt, k)
        assert out[k:] == reference_greedy(new_model, prompt + out[:k], len(out) - k)
