"""The torch generation engine against the plain Hugging Face model it wraps."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from services.common.errors import FailedPrecondition, InvalidArgument
from services.inference.generation_types import (
    Completion,
    FinishReason,
    GenerationRequest,
    SamplingOptions,
    TokenChunk,
    VersionSpan,
)
from services.inference.torch_engine.engine import GenerationEngine

PROMPT = [1, 20, 21, 22, 10, 30, 31]


def greedy(sampling: SamplingOptions | None = None, **kw: Any) -> SamplingOptions:
    base: dict[str, Any] = dict(temperature=0.0, ignore_eos=True)
    base.update(kw)
    return SamplingOptions(**base)


@torch.no_grad()
def reference_greedy(model, prompt: list[int], steps: int) -> list[int]:
    """Step-by-step argmax, recomputing the whole sequence each step (no cache)."""
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


@torch.no_grad()
def reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1."""
    logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)


async def run(engine: GenerationEngine, request: GenerationRequest) -> list[Completion]:
    return await engine.submit(request).completions()


async def test_greedy_equals_stepwise_argmax_of_hf_model(engine, hf_model):
    expected = reference_greedy(hf_model, PROMPT, 24)
    [c] = await run(engine, GenerationRequest(PROMPT, greedy(max_new_tokens=24)))
    assert list(c.output_ids) == expected
    assert c.finish_reason is FinishReason.LENGTH
    assert c.prompt_tokens == len(PROMPT)
    assert c.version_spans == (VersionSpan(0, 0),)

    # n samples decode from copies of one prefill's cache rows.
    samples = await run(engine, GenerationRequest(PROMPT, greedy(max_new_tokens=24, n=3)))
    assert [list(s.output_ids) for s in samples] == [expected] * 3


async def test_logprobs_are_policy_log_softmax_whatever_the_temperature(engine, hf_model):
    request = GenerationRequest(
        PROMPT,
        SamplingOptions(temperature=1.7, top_k=20, top_p=0.9, max_new_tokens=20, seed=5, ignore_eos=True),
        return_prompt_logprobs=True,
    )
    [c] = await run(engine, request)
    full = PROMPT + list(c.output_ids)
    ref = reference_logprobs(hf_model, full)
    torch.testing.assert_close(torch.tensor(c.output_logprobs), ref[len(PROMPT) - 1 :], atol=1e-4, rtol=0)
    assert c.prompt_logprobs[0] == 0.0
    torch.testing.assert_close(torch.tensor(c.prompt_logprobs[1:]), ref[: len(PROMPT) - 1], atol=1e-4, rtol=0)


async def test_scoring_a_fixed_sequence_with_zero_new_tokens(engine, hf_model):
    seq = [1, 40, 41, 42, 43, 44, 12, 13]
    [c] = await run(engine, GenerationRequest(seq, greedy(max_new_tokens=0), return_prompt_logprobs=True))
    assert c.output_ids == () and c.finish_reason is FinishReason.LENGTH
    assert len(c.prompt_logprobs) == len(seq) and c.prompt_logprobs[0] == 0.0
    torch.testing.assert_close(
        torch.tensor(c.prompt_logprobs[1:]), reference_logprobs(hf_model, seq), atol=1e-4, rtol=0
    )


async def test_prompts_of_different_lengths_batched_match_one_at_a_time(engine, hf_model):
    prompts = [[1, 9], [1, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29], [5, 6, 7, 8, 9]]
    alone = [(await run(engine, GenerationRequest(p, greedy(max_new_tokens=12))))[0] for p in prompts]

    # Hold the batch with a long request so the three queue up and are admitted together.
    blocker = engine.submit(GenerationRequest(PROMPT, greedy(max_new_tokens=400), stream=True))
    events = aiter(blocker)
    assert isinstance(await anext(events), TokenChunk)
    streams = [engine.submit(GenerationRequest(p, greedy(max_new_tokens=12))) for p in prompts]
    blocker.cancel()
    rest = [e async for e in events]
    assert isinstance(rest[-1], Completion) and rest[-1].finish_reason is FinishReason.ABORT
    together = [(await s.completions())[0] for s in streams]

    for p, a, b in zip(prompts, alone, together):
        assert list(b.output_ids) == list(a.output_ids) == reference_greedy(hf_model, p, 12)
        torch.testing.assert_close(torch.tensor(b.output_logprobs), torch.tensor(a.output_logprobs), atol=1e-4, rtol=0)


async def test_n_seeded_samples_are_reproducible(engine):
    def request(seed: int) -> GenerationRequest:
        return GenerationRequest(
            PROMPT, SamplingOptions(temperature=1.0, n=4, seed=seed, max_new_tokens=16, ignore_eos=True)
        )

    first = await run(engine, request(123))
    again = await run(engine, request(123))
    other = await run(engine, request(124))
    assert [c.index for c in first] == [0, 1, 2, 3]
    assert [c.output_ids for c in first] == [c.output_ids for c in again]
    assert [c.output_logprobs for c in first] == [c.output_logprobs for c in again]
    assert len({c.output_ids for c in first}) > 1, "the n samples should differ from each other"
    assert [c.output_ids for c in first] != [c.output_ids for c in other]


async def test_streamed_chunks_add_up_to_the_completion(engine):
    stream = engine.submit(
        GenerationRequest(PROMPT, SamplingOptions(n=2, seed=1, max_new_tokens=10, ignore_eos=True), stream=True)
    )
    chunks: dict[int, list[int]] = {0: [], 1: []}
    finals: dict[int, Completion] = {}
    async for event in stream:
        if isinstance(event, TokenChunk):
            assert event.index not in finals, "chunks of a sample come before its completion"
            assert event.version == 0 and len(event.token_ids) == len(event.logprobs) == 1
            chunks[event.index] += event.token_ids
        else:
            finals[event.index] = event
    assert sorted(finals) == [0, 1]
    assert all(chunks[i] == list(finals[i].output_ids) for i in (0, 1))


async def test_finish_reasons(engine, hf_model):
    continuation = reference_greedy(hf_model, PROMPT, 30)
    decode = engine.tokenizer.decode

    # A stop token ends the sample at its first occurrence, the token included.
    stop_token = continuation[5]
    k = continuation.index(stop_token)
    [c] = await run(engine, GenerationRequest(PROMPT, greedy(max_new_tokens=30, stop_token_ids=(stop_token,))))
    assert c.finish_reason is FinishReason.STOP and c.matched_stop == str(stop_token)
    assert list(c.output_ids) == continuation[: k + 1]

    # A stop string: reported, tokens not trimmed.
    stop = decode(continuation[8:10])
    end = next(j for j in range(1, 31) if stop in decode(continuation[:j]))
    [c] = await run(engine, GenerationRequest(PROMPT, greedy(max_new_tokens=30, stop=("@never@", stop))))
    assert c.finish_reason is FinishReason.STOP and c.matched_stop == stop
    assert list(c.output_ids) == continuation[:end]

    # eos stops unless ignore_eos.
    # (The random tiny model hardly ever picks its real eos, so one of its greedy tokens
    # plays eos here.)
    eos_stop = continuation[3]
    engine_eos = engine.eos_token_ids
    engine.eos_token_ids = {eos_stop}
    try:
        [stopped] = await run(engine, GenerationRequest(PROMPT, SamplingOptions(temperature=0.0, max_new_tokens=30)))
        [ignored] = await run(engine, GenerationRequest(PROMPT, greedy(max_new_tokens=30)))
    finally:
        engine.eos_token_ids = engine_eos
    assert stopped.finish_reason is FinishReason.STOP and stopped.output_ids[-1] == eos_stop
    assert len(stopped.output_ids) == continuation.index(eos_stop) + 1
    assert ignored.finish_reason is FinishReason.LENGTH and len(ignored.output_ids) == 30

    [c] = await run(engine, GenerationRequest(PROMPT, greedy(max_new_tokens=7)))
    assert c.finish_reason is FinishReason.LENGTH and len(c.output_ids) == 7 and c.matched_stop == ""


@pytest.mark.parametrize(
    ("input_ids", "options", "message"),
    [
        ([], SamplingOptions(), "input_ids is empty"),
        ([1, 57], SamplingOptions(), "input_ids[1] = 57 is outside the vocabulary"),
        ([-1], SamplingOptions(), "input_ids[0] = -1 is outside the vocabulary"),
        ([1] * 500, SamplingOptions(max_new_tokens=13), "exceeds max_context_len 512"),
        ([1] * 513, SamplingOptions(), "more than max_context_len 512"),
        ([1], SamplingOptions(top_p=0.0), "top_p"),
        ([1], SamplingOptions(temperature=-1.0), "temperature"),
        ([1], SamplingOptions(n=17), "n must be between 1 and max_batch_size 16"),
    ],
)
async def test_bad_requests_are_invalid_arguments(engine, input_ids, options, message):
    with pytest.raises(InvalidArgument, match=message.replace("[", r"\[").replace("]", r"\]")):
        engine.submit(GenerationRequest(input_ids, options))


async def test_default_max_new_tokens_is_clamped_to_the_context(engine):
    [c] = await run(engine, GenerationRequest([1] * 505, SamplingOptions(temperature=0.0, ignore_eos=True)))
    assert len(c.output_ids) == 7 and c.finish_reason is FinishReason.LENGTH


def perturbed(model, scale: float = 0.05, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: p.detach() + scale * torch.randn(p.shape, generator=gen) for name, p in model.named_parameters()}


async def test_commit_mid_generation_switches_weights_between_steps(tiny_model_dir, hf_model):
    eng = GenerationEngine(tiny_model_dir)
    try:
        new_weights = perturbed(hf_model)
        new_model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
        new_model.load_state_dict(new_weights, strict=False)
        steps = 150
        stream = eng.submit(GenerationRequest(PROMPT, greedy(max_new_tokens=steps), stream=True))
        chunks, commit, completion = 0, None, None
        async for event in stream:
            if isinstance(event, TokenChunk):
                chunks += 1
                if chunks == 5:
                    commit = eng.commit_weights(new_weights, version=1, step=7)
            else:
                completion = event
        assert commit is not None and completion is not None
        policy = await asyncio.wrap_future(commit)
        assert (policy.version, policy.step) == (1, 7) and eng.policy == policy

        spans = completion.version_spans
        assert len(spans) == 2 and spans[0] == VersionSpan(0, 0) and spans[1].version == 1
        k = spans[1].start_token
        assert 5 <= k < steps, f"commit landed at token {k}"
        out = list(completion.output_ids)
        assert out[:k] == reference_greedy(hf_model, PROMPT, k)
        assert out[k:] == reference_greedy(new_model, PROMPT + out[:k], steps - k)
        assert out[k:] != reference_greedy(hf_model, PROMPT + out[:k], steps - k), "perturbation too small to tell"
        ref_new = reference_logprobs(new_model, PROMPT + out)
        torch.testing.assert_close(
            torch.tensor(completion.output_logprobs[k:]), ref_new[len(PROMPT) - 1 + k :], atol=1e-4, rtol=0
        )

        # Every later token is stamped with the new version.
        [after] = await run(eng, GenerationRequest(PROMPT, greedy(max_new_tokens=5)))
        assert after.version_spans == (VersionSpan(0, 1),)
        assert list(after.output_ids) == reference_greedy(new_model, PROMPT, 5)
    finally:
        eng.close()


async def test_rejected_commits_leave_weights_and_version_alone(tiny_model_dir, hf_model):
    eng = GenerationEngine(tiny_model_dir)
    try:
        before = await run(eng, GenerationRequest(PROMPT, greedy(max_new_tokens=0), return_prompt_logprobs=True))
        good = perturbed(hf_model)
        with pytest.raises(FailedPrecondition, match="expected 1"):
            await asyncio.wrap_future(eng.commit_weights(good, version=2))
        bad_shape = dict(good)
        bad_shape["lm_head.weight"] = bad_shape["lm_head.weight"][:-1]
        with pytest.raises(InvalidArgument, match="lm_head.weight"):
            await asyncio.wrap_future(eng.commit_weights(bad_shape, version=1))
        missing = {k: v for k, v in good.items() if k != "model.norm.weight"}
        with pytest.raises(InvalidArgument, match="model.norm.weight"):
            await asyncio.wrap_future(eng.commit_weights(missing, version=1))
        after = await run(eng, GenerationRequest(PROMPT, greedy(max_new_tokens=0), return_prompt_logprobs=True))
        assert eng.policy.version == 0
        assert after[0].prompt_logprobs == before[0].prompt_logprobs
    finally:
        eng.close()
