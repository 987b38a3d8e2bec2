"""The batch of samples being decoded together, its KV cache, and per-sample bookkeeping
(tokens, logprobs, version spans, stop conditions, results to hand back).

Only the engine's worker thread touches these objects, except `RequestState.cancelled`,
which the event loop sets and the worker reads between steps.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from transformers import DynamicCache

from services.inference.api import Completion, FinishReason, GenerationRequest, TokenChunk, VersionSpan
from services.inference.runner import ModelRunner
from services.inference.sampling import choose_tokens

Event = TokenChunk | Completion | BaseException


class RequestState:
    """A submitted request as the worker sees it."""

    def __init__(
        self,
        spec: GenerationRequest,
        max_new_tokens: int,
        stop_ids: frozenset[int],
        generator: torch.Generator,
        deliver: Callable[[list[Event]], None],
    ) -> None:
        self.spec = spec
        self.input_ids = list(spec.input_ids)
        self.max_new_tokens = max_new_tokens
        self.stop_ids = stop_ids
        self.generator = generator
        self.cancelled = False
        self.prompt_logprobs: tuple[float, ...] = ()
        self.outbox: list[Event] = []
        self._deliver = deliver

    @property
    def n(self) -> int:
        return self.spec.sampling.n

    def flush(self) -> None:
        """Hand this step's events to the asyncio side in one call."""
        if self.outbox:
            events, self.outbox = self.outbox, []
            try:
                self._deliver(events)
            except RuntimeError:
                # The caller's event loop is gone: nobody is listening any more.
                self.cancelled = True


class SampleState:
    """One of a request's n samples."""

    def __init__(self, request: RequestState, index: int) -> None:
        self.request = request
        self.index = index
        self.tokens = list(request.input_ids)
        self.output_ids: list[int] = []
        self.output_logprobs: list[float] = []
        self.spans: list[VersionSpan] = []
        self.finish_reason: FinishReason | None = None
        self._text_searched = 0

    def append(self, token: int, logprob: float, version: int) -> None:
        if not self.spans or self.spans[-1].version != version:
            self.spans.append(VersionSpan(len(self.output_ids), version))
        self.tokens.append(token)
        self.output_ids.append(token)
        self.output_logprobs.append(logprob)
        if self.request.spec.stream:
            self.request.outbox.append(TokenChunk(self.index, (token,), (logprob,), version))

    def finish(self, reason: FinishReason, matched_stop: str = "") -> None:
        self.finish_reason = reason
        self.request.outbox.append(
            Completion(
                index=self.index,
                output_ids=tuple(self.output_ids),
                output_logprobs=tuple(self.output_logprobs),
                finish_reason=reason,
                matched_stop=matched_stop,
                version_spans=tuple(self.spans),
                prompt_logprobs=self.request.prompt_logprobs,
                prompt_tokens=len(self.request.input_ids),
            )
        )

    def find_stop_string(self, decode: Callable[[list[int]], str]) -> str | None:
        """The stop string that now appears in the decoded output, if any (earliest wins).
        Only text that could contain a new match is searched."""
        stops = self.request.spec.sampling.stop
        text = decode(self.output_ids)
        start = max(0, self._text_searched - max(len(s) for s in stops) + 1)
        self._text_searched = len(text)
        found = [(pos, s) for s in stops if s and (pos := text.find(s, start)) >= 0]
        return min(found)[1] if found else None


class Batch:
    """Samples decoded together, one row each, sharing one KV cache.

    `cache is None` with rows present means the cache must be rebuilt from the rows'
    full token sequences before the next token (after a weight commit, so that no token
    after it attends to keys and values the old weights computed).
    """

    def __init__(self, runner: ModelRunner, decode: Callable[[list[int]], str]) -> None:
        self.runner = runner
        self.decode = decode
        self.samples: list[SampleState] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None
        self.tokens_generated = 0
        self._touched: dict[int, RequestState] = {}
        self._params: tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Generator]] | None = None

    @property
    def size(self) -> int:
        return len(self.samples)

    def admit(self, requests: Sequence[RequestState], version: int) -> None:
        """Prefill each new prompt once, give each request n rows that share that prefill's
        cache, and pick every row's first token.

        Only called on an empty batch for now; continuous batching will prefill the new
        prompts the same way and merge their cache rows into the running ones.
        """
        assert not self.samples, "admitting into a running batch is not supported yet"
        for r in requests:
            self._touched[id(r)] = r
        want_all = any(r.spec.return_prompt_logprobs for r in requests)
        logits, cache, mask = self.runner.prefill([r.input_ids for r in requests], all_logits=want_all)
        width = mask.shape[1]
        for i, r in enumerate(requests):
            if r.spec.return_prompt_logprobs:
                r.prompt_logprobs = _prompt_logprobs(logits[i, width - len(r.input_ids) :], r.input_ids)
        rows: list[int] = []
        samples: list[SampleState] = []
        for i, r in enumerate(requests):
            for j in range(r.n):
                sample = SampleState(r, j)
                if r.max_new_tokens == 0:
                    sample.finish(FinishReason.LENGTH)
                else:
                    rows.append(i)
                    samples.append(sample)
        if not samples:
            return
        last = logits[:, -1]
        if rows != list(range(len(requests))):
            index = torch.tensor(rows, device=mask.device)
            cache.batch_select_indices(index)
            mask, last = mask[index], last[index]
        self.samples, self.cache, self.mask = samples, cache, mask
        self._params = None
        self._advance(last, version)

    def step(self, version: int) -> None:
        """One more token for every row."""
        if self.cache is None:
            logits, self.cache, self.mask = self.runner.prefill([s.tokens for s in self.samples], all_logits=False)
            last = logits[:, -1]
        else:
            last, self.mask = self.runner.decode(
                [s.tokens[-1] for s in self.samples],
                [len(s.tokens) - 1 for s in self.samples],
                self.cache,
                self.mask,
            )
        self._advance(last, version)

    def invalidate_cache(self) -> None:
        self.cache, self.mask = None, None

    def reap_cancelled(self) -> None:
        for s in self.samples:
            if s.request.cancelled:
                s.finish(FinishReason.ABORT)
                self._touched[id(s.request)] = s.request
        self._prune()

    def fail(self, requests: Sequence[RequestState], error: BaseException) -> None:
        """End every row (and `requests`, which may not have rows yet) with `error`."""
        doomed = {id(r): r for r in requests}
        doomed.update({id(s.request): s.request for s in self.samples})
        for r in doomed.values():
            r.outbox.append(error)
            self._touched[id(r)] = r
        self.samples, self.cache, self.mask, self._params = [], None, None, None

    def flush(self) -> None:
        touched, self._touched = self._touched, {}
        for r in touched.values():
            r.flush()

    def _advance(self, logits: torch.Tensor, version: int) -> None:
        logits = logits.float()
        temperature, top_p, top_k, generators = self._sampling_params()
        tokens = choose_tokens(logits, temperature, top_p, top_k, generators)
        # Logprobs under the policy itself (raw logits), whatever the sampling temperature.
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
        self.tokens_generated += len(self.samples)
        for sample, token, logprob in zip(self.samples, tokens.tolist(), logprobs.tolist()):
            sample.append(token, logprob, version)
            self._touched[id(sample.request)] = sample.request
            self._check_finished(sample, token)
        self._prune()

    def _check_finished(self, sample: SampleState, token: int) -> None:
        request = sample.request
        if token in request.stop_ids:
            sample.finish(FinishReason.STOP, str(token))
        elif request.spec.sampling.stop and (match := sample.find_stop_string(self.decode)) is not None:
            sample.finish(FinishReason.STOP, match)
        elif len(sample.output_ids) >= request.max_new_tokens:
            sample.finish(FinishReason.LENGTH)

    def _prune(self) -> None:
        keep = [i for i, s in enumerate(self.samples) if s.finish_reason is None]
        if len(keep) == len(self.samples):
            return
        if not keep:
            self.samples, self.cache, self.mask, self._params = [], None, None, None
            return
        if self.cache is not None and self.mask is not None:
            index = torch.tensor(keep, device=self.mask.device)
            self.cache.batch_select_indices(index)
            self.mask = self.mask[index]
        self.samples = [self.samples[i] for i in keep]
        self._params = None

    def _sampling_params(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Generator]]:
        if self._params is None:
            device = self.runner.device
            opts = [s.request.spec.sampling for s in self.samples]
            self._params = (
                torch.tensor([o.temperature for o in opts], dtype=torch.float32, device=device),
                torch.tensor([o.top_p for o in opts], dtype=torch.float32, device=device),
                torch.tensor([o.top_k for o in opts], dtype=torch.long, device=device),
                [s.request.generator for s in self.samples],
            )
        return self._params


def _prompt_logprobs(logits: torch.Tensor, input_ids: Sequence[int]) -> tuple[float, ...]:
    """Logprob of each prompt token given the ones before it; the first has no context
    and gets 0.0. `logits` are the prompt's rows of the prefill output."""
    if len(input_ids) == 1:
        return (0.0,)
    targets = torch.tensor(input_ids[1:], dtype=torch.long, device=logits.device)
    logprobs = torch.log_softmax(logits[:-1].float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    return (0.0, *logprobs.tolist())
