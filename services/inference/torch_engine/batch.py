"""The running batch: samples decoded together, one KV-cache row each, and per-sample
bookkeeping (tokens, logprobs, version spans, stop conditions, results to hand back).

Requests join between two decode steps: their prompts are prefilled together into fresh
cache rows (one prefill per request, copied into its n rows) while the running rows keep
their cache untouched; finished rows leave the same way. Only the engine's worker thread
touches these objects, except `RequestState.cancelled`, which the event loop sets and the
worker reads between steps.

Logprobs, sampled and top-k alike, are the policy's own: log_softmax of the raw logits,
whatever the request's temperature, top-k, top-p or penalties (those shape only the
choice of token). Top-k alternatives are computed only for the rows that asked for them.

Penalties (frequency, presence, repetition) are applied per row, only to the rows that
ask for them, to a copy of the logits the sampler sees. Each penalised sample keeps its
own generated-token counts ([V] floats, updated as its tokens are sampled) on its
SampleState, so they follow it wherever its row moves; batches stack them once per
change of membership and keep the samples' counts as views of that stack.

Above the ~450-line guide on purpose: the batch, its rows and their per-sample state
change together at every step (join, decode, penalise, finish), and split apart each
would have to reach into the others' internals.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from services.inference.generation_types import (
    Completion,
    FinishReason,
    GenerationRequest,
    TokenChunk,
    TopLogprobs,
    VersionSpan,
)
from services.inference.torch_engine.runner import ModelRunner
from services.inference.torch_engine.sampling import choose_tokens, sample_plain
from services.inference.torch_engine.spans import write_request_spans

Event = TokenChunk | Completion | BaseException
_SUBMITTED = itertools.count()


class RequestState:
    """A submitted request as the worker sees it."""

    def __init__(
        self,
        spec: GenerationRequest,
        max_new_tokens: int,
        stop_ids: frozenset[int],
        generator: torch.Generator,
        loop: asyncio.AbstractEventLoop,
        queue: asyncio.Queue[list[Event]],
    ) -> None:
        self.spec = spec
        self.input_ids = list(spec.input_ids)
        self.max_new_tokens = max_new_tokens
        self.stop_ids = stop_ids
        self.generator = generator
        self.cancelled = False
        self.prompt_logprobs: tuple[float, ...] = ()
        self.prompt_top_logprobs: tuple[TopLogprobs, ...] = ()
        # Which tokens the prompt holds ([V] bool), for repetition_penalty; made when a
        # penalised row of this request first samples.
        self.prompt_mask: torch.Tensor | None = None
        self.outbox: list[Event] = []
        # The KV-cache tokens this request may come to hold: what it counts against the
        # batch's token bound while any of its rows run.
        rows = self.n if max_new_tokens > 0 else 0
        self.reserved_tokens = rows * (len(self.input_ids) + max_new_tokens)
        self.rows_left = self.n
        # Submission order: rows drawing from one generator draw in (seq, sample) order.
        self.seq = next(_SUBMITTED)
        # Where the submitter iterates the results.
        self.loop = loop
        self.queue = queue
        # Tracing (spans.py): the context the request was submitted in (None: untraced,
        # and nothing below is noted), the shard's name and the timestamps (ns).
        self.trace_ctx: Any = None
        self.shard = ""
        self.submitted_ns = 0
        self.admitted_ns = 0
        self.prefilled_ns = 0
        self.admitted_with = 0
        self.samples_done: list[SampleState] = []
        self.error: BaseException | None = None

    @property
    def n(self) -> int:
        return self.spec.sampling.n


class SampleState:
    """One of a request's n samples."""

    def __init__(self, request: RequestState, index: int) -> None:
        self.request = request
        self.index = index
        self.tokens = list(request.input_ids)
        self.output_ids: list[int] = []
        self.output_logprobs: list[float] = []
        self.output_top_logprobs: list[TopLogprobs] = []
        self.spans: list[VersionSpan] = []
        self.finish_reason: FinishReason | None = None
        # Traced requests only: when each of `spans` began, and when the sample ended (ns).
        self.span_times: list[int] = []
        self.finished_ns = 0
        self.first_token_at = 0.0
        self._text_searched = 0
        # Penalised samples only: how often each token was generated so far ([V] float32,
        # made when the row first samples; a view of its batch's stacked counts).
        self.counts: torch.Tensor | None = None

    def append(self, token: int, logprob: float, version: int, top: TopLogprobs | None = None) -> None:
        if not self.output_ids:
            self.first_token_at = time.monotonic()
        if not self.spans or self.spans[-1].version != version:
            self.spans.append(VersionSpan(len(self.output_ids), version))
            if self.request.trace_ctx is not None:
                self.span_times.append(time.time_ns())
        self.tokens.append(token)
        self.output_ids.append(token)
        self.output_logprobs.append(logprob)
        if top is not None:
            self.output_top_logprobs.append(top)
        if self.request.spec.stream:
            tops = () if top is None else (top,)
            self.request.outbox.append(TokenChunk(self.index, (token,), (logprob,), version, tops))

    def finish(self, reason: FinishReason, matched_stop: str = "") -> None:
        self.finish_reason = reason
        if self.request.trace_ctx is not None:
            self.finished_ns = time.time_ns()
            self.request.samples_done.append(self)
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
                output_top_logprobs=tuple(self.output_top_logprobs),
                prompt_top_logprobs=self.request.prompt_top_logprobs,
                first_token_at=self.first_token_at,
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
    """Samples decoded together, one row each, over one SlotKVCache whose row r belongs
    to samples[r].

    `stale` means the rows' keys and values were computed by weights that are no longer
    served: they are recomputed from the rows' full token sequences before the next token
    (after a weight commit, so that no token after it attends to old-weight keys).
    """

    def __init__(self, runner: ModelRunner, decode: Callable[[list[int]], str], max_rows: int) -> None:
        self.runner = runner
        self.decode = decode
        self.cache = runner.new_cache(max_rows)
        self.samples: list[SampleState] = []
        self.stale = False
        self.tokens_generated = 0
        self.reserved_tokens = 0
        self._touched: dict[int, RequestState] = {}
        self._params: _Params | None = None

    @property
    def size(self) -> int:
        return len(self.samples)

    def admit(self, requests: Sequence[RequestState], version: int) -> None:
        """Prefill the new prompts (one prefill per request, whatever its n) into new
        cache rows, n rows per request, and pick each new row's first token. Running
        rows are not touched."""
        for r in requests:
            self._touched[id(r)] = r
            if r.trace_ctx is not None:
                r.admitted_ns, r.admitted_with = time.time_ns(), len(requests)
        first = self.size
        last_logits: list[torch.Tensor] = []
        for group in _length_groups(requests):
            want_all = any(r.spec.wants_prompt_logprobs for r in group)
            src = [i for i, r in enumerate(group) if r.max_new_tokens > 0 for _ in range(r.n)]
            dest = list(range(self.size, self.size + len(src)))
            logits = self.runner.prefill(self.cache, [r.input_ids for r in group], dest, src, all_logits=want_all)
            width = logits.shape[1]
            for i, r in enumerate(group):
                if r.trace_ctx is not None:
                    r.prefilled_ns = time.time_ns()
                if r.spec.wants_prompt_logprobs:
                    r.prompt_logprobs, r.prompt_top_logprobs = _prompt_logprobs(
                        logits[i, width - len(r.input_ids) :], r.input_ids, r.spec.prompt_top_logprobs
                    )
                for j in range(r.n):
                    sample = SampleState(r, j)
                    if r.max_new_tokens == 0:
                        sample.finish(FinishReason.LENGTH)
                    else:
                        self.samples.append(sample)
                if r.max_new_tokens > 0:
                    self.reserved_tokens += r.reserved_tokens
            if src:
                last_logits.append(logits[:, -1][torch.tensor(src, device=logits.device)])
        if not last_logits:
            return
        self._params = None
        self._advance(torch.cat(last_logits), version, first)
        self._prune()

    def step(self, version: int) -> None:
        """One more token for every row."""
        if self.stale:
            # Recompute every row's keys under the weights now served, and take the next
            # token from that pass.
            last = self._recompute()
            self.stale = False
        else:
            tokens = torch.tensor([s.tokens[-1] for s in self.samples], dtype=torch.long, device=self.runner.device)
            last = self.runner.decode(self.cache, tokens)
        self._advance(last, version, 0)
        self._prune()

    def _recompute(self) -> torch.Tensor:
        """Every row's keys and values from its tokens, under the weights served now;
        returns the logits after each row's last token [rows, V]. Each request's prompt
        is prefilled once into all its rows (as at admission), then each row's generated
        tokens run in one pass over it: a group of n samples costs one prompt and n
        completions so far, not n prompts."""
        if not all(s.output_ids for s in self.samples):
            rows = list(range(self.size))
            return self.runner.prefill(self.cache, [s.tokens for s in self.samples], rows, rows, all_logits=False)[
                :, -1
            ]
        requests: dict[int, RequestState] = {}
        rows_of: dict[int, list[int]] = {}
        for row, s in enumerate(self.samples):
            requests.setdefault(id(s.request), s.request)
            rows_of.setdefault(id(s.request), []).append(row)
        for group in _length_groups(list(requests.values())):
            dest = [row for r in group for row in rows_of[id(r)]]
            src = [i for i, r in enumerate(group) for _ in rows_of[id(r)]]
            self.runner.prefill(self.cache, [r.input_ids for r in group], dest, src, all_logits=False)
        return self.runner.extend(self.cache, [s.output_ids for s in self.samples])

    def invalidate_cache(self) -> None:
        self.stale = bool(self.samples)

    def reap_cancelled(self) -> None:
        for s in self.samples:
            if s.request.cancelled and s.finish_reason is None:
                s.finish(FinishReason.ABORT)
                self._touched[id(s.request)] = s.request
        self._prune()

    def abort_unstarted(self, request: RequestState) -> None:
        """End a request that never got rows (cancelled while it waited)."""
        for j in range(request.n):
            SampleState(request, j).finish(FinishReason.ABORT)
        self._touched[id(request)] = request

    def fail(self, requests: Sequence[RequestState], error: BaseException) -> None:
        """End every row (and `requests`, which may not have rows yet) with `error`."""
        doomed = {id(r): r for r in requests}
        doomed.update({id(s.request): s.request for s in self.samples})
        for r in doomed.values():
            r.outbox.append(error)
            r.error = error
            self._touched[id(r)] = r
        self.samples, self._params, self.stale, self.reserved_tokens = [], None, False, 0
        self.cache.clear()

    def flush(self) -> None:
        """Hand the events of every request touched since the last flush to the asyncio
        side: one wake-up per event loop, not one per request (fewer thread switches
        while the next step runs)."""
        touched, self._touched = self._touched, {}
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestState, list[Event]]]] = {}
        for r in touched.values():
            if r.outbox:
                events, r.outbox = r.outbox, []
                by_loop.setdefault(r.loop, []).append((r, events))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:
                # The submitters' event loop is gone: nobody is listening any more.
                for r, _ in items:
                    r.cancelled = True

    def _advance(self, logits: torch.Tensor, version: int, first: int) -> None:
        """Sample the next token of rows first.. from their logits [rows, V]."""
        samples = self.samples[first:]
        logits = logits.float()
        vocab = logits.shape[-1]
        params = self._sampling_params(vocab) if first == 0 else _Params.of(samples, self.runner.device, vocab)
        pen = params.penalties
        # Penalties change only what the sampler sees (a penalised copy); rows that asked
        # for none, and every batch where no row did, sample from the raw logits.
        sampled_from = logits if pen is None else pen.apply(logits)
        if params.plain:
            tokens = sample_plain(sampled_from, params.temperature, params.generators[0], params.plain_order)
        else:
            tokens = choose_tokens(
                sampled_from, params.temperature, params.top_p, params.top_k, params.generators, params.keys
            )
        if pen is not None:
            pen.count(tokens)
        # Logprobs under the policy itself (raw logits), whatever the sampling temperature
        # or penalties.
        lse = torch.logsumexp(logits, dim=-1)
        logprobs = logits.gather(-1, tokens[:, None]).squeeze(-1) - lse
        tops: list[TopLogprobs | None] = [None] * len(samples)
        if params.top_rows is not None:
            # Only the rows that asked, with the largest k any of them asked for; each
            # row keeps its own k. Same logits minus the same logsumexp as the sampled
            # logprob, so a sampled token among the top k has exactly its logprob there.
            rows = params.top_rows
            values, ids = logits[rows].topk(min(params.max_top, logits.shape[-1]), dim=-1)
            values = values - lse[rows, None]
            for row, row_ids, row_values in zip(params.top_row_list, ids.tolist(), values.tolist()):
                k = params.top_counts[row]
                tops[row] = TopLogprobs(tuple(row_ids[:k]), tuple(row_values[:k]))
        self.tokens_generated += len(samples)
        for sample, token, logprob, top in zip(samples, tokens.tolist(), logprobs.tolist(), tops):
            sample.append(token, logprob, version, top)
            self._touched[id(sample.request)] = sample.request
            self._check_finished(sample, token)

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
        for s in self.samples:
            if s.finish_reason is not None:
                s.request.rows_left -= 1
                if s.request.rows_left == 0:
                    self.reserved_tokens -= s.request.reserved_tokens
        order = self.cache.remove_rows(keep)
        self.samples = [self.samples[i] for i in order]
        self._params = None
        if not self.samples:
            self.stale = False

    def _sampling_params(self, vocab: int) -> _Params:
        if self._params is None:
            self._params = _Params.of(self.samples, self.runner.device, vocab)
        return self._params


@dataclass(frozen=True)
class _Penalties:
    """The penalised rows of a set of rows and their state: `counts` [P, V] stacks those
    samples' generated-token counts (each sample's `counts` is a view of its row here,
    so updates land on the sample and survive the next restacking)."""

    rows: torch.Tensor
    counts: torch.Tensor
    prompt: torch.Tensor
    frequency: torch.Tensor
    presence: torch.Tensor
    repetition: torch.Tensor

    @classmethod
    def of(cls, samples: Sequence[SampleState], device: torch.device, vocab: int) -> _Penalties | None:
        rows = [i for i, s in enumerate(samples) if s.request.spec.sampling.penalised]
        if not rows:
            return None
        mine = [samples[i] for i in rows]
        for s in mine:
            if s.counts is None:
                s.counts = torch.zeros(vocab, dtype=torch.float32, device=device)
            r = s.request
            if r.prompt_mask is None:
                r.prompt_mask = torch.zeros(vocab, dtype=torch.bool, device=device)
                r.prompt_mask[torch.tensor(r.input_ids, dtype=torch.long, device=device)] = True
        counts = torch.stack([s.counts for s in mine])  # type: ignore[misc]
        for i, s in enumerate(mine):
            s.counts = counts[i]
        opts = [s.request.spec.sampling for s in mine]

        def column(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)[:, None]

        return cls(
            torch.tensor(rows, dtype=torch.long, device=device),
            counts,
            torch.stack([s.request.prompt_mask for s in mine]),  # type: ignore[misc]
            column([o.frequency_penalty for o in opts]),
            column([o.presence_penalty for o in opts]),
            column([o.repetition_penalty for o in opts]),
        )

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """A copy of `logits` [B, V] with the penalised rows penalised (the vLLM order:
        repetition, then frequency and presence; temperature comes after, in the
        sampler). A penalty at its neutral value (1 or 0) leaves a logit exactly as is."""
        x = logits[self.rows]
        generated = self.counts > 0
        seen = generated | self.prompt
        x = torch.where(seen, torch.where(x > 0, x / self.repetition, x * self.repetition), x)
        x = x - self.frequency * self.counts - self.presence * generated.float()
        out = logits.clone()
        out[self.rows] = x
        return out

    def count(self, tokens: torch.Tensor) -> None:
        """Add the tokens just sampled (one per row of the batch) to the counts."""
        index = torch.arange(self.rows.numel(), device=self.counts.device)
        self.counts[index, tokens[self.rows]] += 1


@dataclass(frozen=True)
class _Params:
    """Per-row sampling parameters of a set of rows, as the sampler takes them."""

    temperature: torch.Tensor
    top_p: torch.Tensor
    top_k: torch.Tensor
    generators: list[torch.Generator]
    keys: list[tuple[int, int]]
    # Per row, how many top logprobs it asked for (0 = none); the rows that asked (None
    # when no row did), as a list and as an index tensor; the largest count.
    top_counts: list[int]
    top_row_list: list[int]
    top_rows: torch.Tensor | None
    max_top: int
    # The penalised rows and their state (None when no row asked: the fast path).
    penalties: _Penalties | None
    # Every row samples from its whole softmax with one generator (sample_plain applies),
    # and the rows in the order they draw in (None: row order).
    plain: bool
    plain_order: torch.Tensor | None

    @classmethod
    def of(cls, samples: Sequence[SampleState], device: torch.device, vocab: int) -> _Params:
        opts = [s.request.spec.sampling for s in samples]
        counts = [s.request.spec.top_logprobs for s in samples]
        asked = [i for i, k in enumerate(counts) if k > 0]
        keys = [(s.request.seq, s.index) for s in samples]
        temperature = torch.tensor([o.temperature for o in opts], dtype=torch.float32, device=device)
        top_p = torch.tensor([o.top_p for o in opts], dtype=torch.float32, device=device)
        top_k = torch.tensor([o.top_k for o in opts], dtype=torch.long, device=device)
        generators = [s.request.generator for s in samples]
        # Decided on the tensors choose_tokens reads, with its own tests: no row greedy,
        # none filtered.
        plain = (
            bool(samples)
            and all(g is generators[0] for g in generators)
            and bool((temperature > 0).all())
            and not bool(((top_k > 0) | (top_p < 1)).any())
        )
        order = sorted(range(len(samples)), key=keys.__getitem__) if plain else []
        in_order = order == list(range(len(samples)))
        return cls(
            temperature,
            top_p,
            top_k,
            generators,
            keys,
            counts,
            asked,
            torch.tensor(asked, dtype=torch.long, device=device) if asked else None,
            max(counts, default=0),
            _Penalties.of(samples, device, vocab),
            plain,
            None if in_order else torch.tensor(order, dtype=torch.long, device=device),
        )


def _deliver(items: list[tuple[RequestState, list[Event]]]) -> None:
    for request, events in items:
        request.queue.put_nowait(events)
        if request.trace_ctx is not None and (request.error is not None or len(request.samples_done) >= request.n):
            write_request_spans(request, request.shard)


def _length_groups(requests: Sequence[RequestState], max_padding: float = 0.25) -> list[list[RequestState]]:
    """Split prompts into prefill passes of similar length, so that left padding adds at
    most `max_padding` of the real tokens to a pass (padding is compute spent on nothing)."""
    groups: list[list[RequestState]] = []
    current: list[RequestState] = []
    real = 0
    for r in sorted(requests, key=lambda r: len(r.input_ids)):
        length = len(r.input_ids)
        if current and length * (len(current) + 1) > (1 + max_padding) * (real + length):
            groups.append(current)
            current, real = [], 0
        current.append(r)
        real += length
    if current:
        groups.append(current)
    return groups


def _prompt_logprobs(
    logits: torch.Tensor, input_ids: Sequence[int], top: int = 0
) -> tuple[tuple[float, ...], tuple[TopLogprobs, ...]]:
    """Logprob of each prompt token given the ones before it, and (when `top` > 0) the
    `top` most likely tokens at each prompt position; the first position has no context
    and gets 0.0 and an empty entry. `logits` are the prompt's rows of the prefill
    output. Both come from one log_softmax, so a prompt token among the top ones has
    exactly its logprob there."""
    first = (TopLogprobs(),) if top > 0 else ()
    if len(input_ids) == 1:
        return (0.0,), first
    targets = torch.tensor(input_ids[1:], dtype=torch.long, device=logits.device)
    log_probs = torch.log_softmax(logits[:-1].float(), dim=-1)
    logprobs = log_probs.gather(-1, targets[:, None]).squeeze(-1)
    tops: tuple[TopLogprobs, ...] = ()
    if top > 0:
        values, ids = log_probs.topk(min(top, log_probs.shape[-1]), dim=-1)
        tops = (*first, *(TopLogprobs(tuple(i), tuple(v)) for i, v in zip(ids.tolist(), values.tolist())))
    return (0.0, *logprobs.tolist()), tops
