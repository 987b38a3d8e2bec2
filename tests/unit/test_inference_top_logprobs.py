"""Top-k logprobs from the torch engine (GenerateRequest.top_logprobs and
prompt_top_logprobs) against a plain Hugging Face forward pass of the same model:
torch.topk(log_softmax(logits)) at every generated and prompt position, only for the rows
that asked, each row with its own k, streamed per token."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from services.common.errors import InvalidArgument
from services.inference.generation_types import (
    MAX_TOP_LOGPROBS,
    Completion,
    GenerationRequest,
    SamplingOptions,
    TokenChunk,
    TopLogprobs,
)
from services.inference.torch_engine.engine import GenerationEngine

PROMPT = [1, 20, 21, 22, 10, 30, 31]


def greedy(**kw) -> SamplingOptions:
    return SamplingOptions(temperature=0.0, ignore_eos=True, **kw)


@torch.no_grad()
def reference_log_softmax(model, ids: list[int]) -> torch.Tensor:
    """log p(. | ids[:t+1]) for every t: [len(ids), V]."""
    return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def assert_top_matches(top: TopLogprobs, reference_row: torch.Tensor, k: int) -> None:
    values, ids = torch.topk(reference_row, k)
    assert list(top.token_ids) == ids.tolist()
    assert len(top.logprobs) == k
    torch.testing.assert_close(torch.tensor(top.logprobs), values, atol=1e-4, rtol=0)


def check_output_tops(c: Completion, model, prompt: list[int], k: int) -> None:
    """Every generated position's top k equal the reference's, and the sampled token's
    logprob is exactly its entry whenever it is among them."""
    ref = reference_log_softmax(model, prompt + list(c.output_ids))
    assert len(c.output_top_logprobs) == len(c.output_ids)
    for t, (token, logprob, top) in enumerate(zip(c.output_ids, c.output_logprobs, c.output_top_logprobs)):
        assert_top_matches(top, ref[len(prompt) - 1 + t], k)
        if token in top.token_ids:
            assert top.logprobs[top.token_ids.index(token)] == logprob


async def run(engine: GenerationEngine, request: GenerationRequest) -> list[Completion]:
    return await engine.submit(request).completions()


async def test_greedy_top_logprobs_of_generated_and_prompt_positions(engine, hf_model):
    k = 5
    [c] = await run(engine, GenerationRequest(PROMPT, greedy(max_new_tokens=16), top_logprobs=k, prompt_top_logprobs=k))
    check_output_tops(c, hf_model, PROMPT, k)
    # Greedy: the sampled token is the most likely one, with its logprob.
    assert [top.token_ids[0] for top in c.output_top_logprobs] == list(c.output_ids)
    assert [top.logprobs[0] for top in c.output_top_logprobs] == list(c.output_logprobs)

    # One entry per prompt position; the first has no context. prompt_top_logprobs
    # implies the prompt logprobs, and each prompt token among its top k has exactly
    # its logprob there.
    ref = reference_log_softmax(hf_model, PROMPT)
    assert len(c.prompt_top_logprobs) == len(c.prompt_logprobs) == len(PROMPT)
    assert c.prompt_top_logprobs[0] == TopLogprobs() and c.prompt_logprobs[0] == 0.0
    for i in range(1, len(PROMPT)):
        top = c.prompt_top_logprobs[i]
        assert_top_matches(top, ref[i - 1], k)
        if PROMPT[i] in top.token_ids:
            assert top.logprobs[top.token_ids.index(PROMPT[i])] == c.prompt_logprobs[i]


async def test_top_logprobs_are_the_policy_s_whatever_the_sampler(engine, hf_model):
    """Sampled with temperature, top-k and top-p, the alternatives are still the policy's
    own log_softmax (as output_logprobs are), not the sampler's filtered distribution."""
    request = GenerationRequest(
        PROMPT,
        SamplingOptions(temperature=1.7, top_k=10, top_p=0.9, max_new_tokens=24, seed=3, n=2, ignore_eos=True),
        top_logprobs=MAX_TOP_LOGPROBS,
    )
    completions = await run(engine, request)
    found = 0
    for c in completions:
        check_output_tops(c, hf_model, PROMPT, MAX_TOP_LOGPROBS)
        found += sum(t in top.token_ids for t, top in zip(c.output_ids, c.output_top_logprobs))
        assert c.prompt_top_logprobs == () and c.prompt_logprobs == ()
    assert found > 0, "no sampled token among the top 20: the exact-equality check ran on nothing"


async def test_prompt_top_logprobs_alone_scores_a_sequence(engine, hf_model):
    seq = [1, 40, 41, 42, 43, 44, 12, 13]
    [c] = await run(engine, GenerationRequest(seq, greedy(max_new_tokens=0), prompt_top_logprobs=3))
    assert c.output_ids == () and c.output_top_logprobs == ()
    ref = reference_log_softmax(hf_model, seq)
    assert c.prompt_top_logprobs[0] == TopLogprobs()
    for i in range(1, len(seq)):
        assert_top_matches(c.prompt_top_logprobs[i], ref[i - 1], 3)
    expected = ref[:-1].gather(-1, torch.tensor(seq[1:])[:, None]).squeeze(-1)
    torch.testing.assert_close(torch.tensor(c.prompt_logprobs[1:]), expected, atol=1e-4, rtol=0)

    # A one-token prompt: one empty entry.
    [c] = await run(engine, GenerationRequest([1], greedy(max_new_tokens=0), prompt_top_logprobs=3))
    assert c.prompt_top_logprobs == (TopLogprobs(),) and c.prompt_logprobs == (0.0,)


async def test_rows_without_top_logprobs_get_none_and_pay_nothing(engine, monkeypatch):
    calls = []
    topk = torch.Tensor.topk

    def counting_topk(self, *args, **kwargs):
        calls.append(tuple(self.shape))
        return topk(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "topk", counting_topk)
    stream = engine.submit(
        GenerationRequest(PROMPT, greedy(max_new_tokens=8, n=2), return_prompt_logprobs=True, stream=True)
    )
    events = [e async for e in stream]
    assert calls == [], "a batch where no row asked for top logprobs ran topk"
    for e in events:
        if isinstance(e, TokenChunk):
            assert e.top_logprobs == ()
        else:
            assert e.output_top_logprobs == () and e.prompt_top_logprobs == ()
            assert len(e.prompt_logprobs) == len(PROMPT)

    await run(engine, GenerationRequest(PROMPT, greedy(max_new_tokens=3), top_logprobs=2))
    assert len(calls) == 3 and all(shape[0] == 1 for shape in calls), "topk on the asking row only, once per step"


async def test_a_batch_mixing_rows_with_different_k(engine, hf_model):
    """Rows asking for different k (and none) decoded together each get their own, equal
    to what they get alone; streamed chunks carry one entry per token."""
    prompts = [[1, 9], [1, 20, 21, 22, 23, 24, 25, 26], [5, 6, 7, 8, 9], [1, 33, 34]]
    ks = [0, 1, 7, 20]
    requests = [
        GenerationRequest(
            p,
            greedy(max_new_tokens=10, n=2 if k == 7 else 1),
            top_logprobs=k,
            prompt_top_logprobs=3 if k == 1 else 0,
            stream=True,
        )
        for p, k in zip(prompts, ks)
    ]
    alone = [await run(engine, r) for r in requests]

    # Hold the batch with a long request so the four queue up and are admitted together.
    blocker = engine.submit(GenerationRequest(PROMPT, greedy(max_new_tokens=400), stream=True, top_logprobs=4))
    blocker_events = aiter(blocker)
    first = await anext(blocker_events)
    assert isinstance(first, TokenChunk) and len(first.top_logprobs) == 1 and len(first.top_logprobs[0].token_ids) == 4
    streams = [engine.submit(r) for r in requests]
    chunks: list[dict[int, list[TopLogprobs]]] = [{} for _ in requests]
    together: list[list[Completion]] = [[] for _ in requests]
    for i, s in enumerate(streams):
        async for e in s:
            if isinstance(e, TokenChunk):
                assert len(e.top_logprobs) == (len(e.token_ids) if ks[i] else 0)
                chunks[i].setdefault(e.index, []).extend(e.top_logprobs)
            else:
                together[i].append(e)
    blocker.cancel()
    [e async for e in blocker_events]

    for i, (p, k) in enumerate(zip(prompts, ks)):
        assert len(together[i]) == len(alone[i]) == requests[i].sampling.n
        for a, b in zip(alone[i], sorted(together[i], key=lambda c: c.index)):
            assert a.output_ids == b.output_ids
            if k == 0:
                assert b.output_top_logprobs == () and all(v == [] for v in chunks[i].values())
                continue
            check_output_tops(b, hf_model, p, k)
            assert list(b.output_top_logprobs) == chunks[i][b.index]
            assert [t.token_ids for t in a.output_top_logprobs] == [t.token_ids for t in b.output_top_logprobs]
            for ta, tb in zip(a.output_top_logprobs, b.output_top_logprobs):
                torch.testing.assert_close(torch.tensor(ta.logprobs), torch.tensor(tb.logprobs), atol=1e-4, rtol=0)
            if requests[i].prompt_top_logprobs:
                assert len(b.prompt_top_logprobs) == len(p)
                assert [t.token_ids for t in a.prompt_top_logprobs] == [t.token_ids for t in b.prompt_top_logprobs]
            else:
                assert b.prompt_top_logprobs == ()


@pytest.mark.parametrize("field", ["top_logprobs", "prompt_top_logprobs"])
async def test_k_above_the_bound_is_an_invalid_argument(engine, field):
    def request(k: int) -> GenerationRequest:
        top_k: dict[str, Any] = {field: k}
        return GenerationRequest(PROMPT, greedy(max_new_tokens=2), **top_k)

    with pytest.raises(InvalidArgument, match=f"^{field} must be between 0 and 20, got 21"):
        engine.submit(request(21))
    with pytest.raises(InvalidArgument, match=f"^{field} must be between 0 and 20, got -1"):
        engine.submit(request(-1))
    [c] = await run(engine, request(20))
    tops = c.output_top_logprobs if field == "top_logprobs" else c.prompt_top_logprobs[1:]
    assert tops and all(len(t.token_ids) == 20 for t in tops)
