"""One request on an SGLang server: a streaming `POST /generate` read as events.

The body carries `input_ids`, `sampling_params`, `return_logprob` and `stream: true`;
the server-sent events carry `output_ids` and `meta_info.output_token_logprobs`
(cumulative by default, incremental with `--stream-output`: both are read),
`meta_info.finish_reason`, and the weight version: `meta_info.weight_versions` spans
where the server has them, else `weight_version`. Prompt logprobs come from
`logprob_start_len: 0` as `meta_info.input_token_logprobs` (first entry None). Top-k
alternatives: `top_logprobs_num` (one k for the prompt and the output: the larger of the
request's two, each list then cut to its own k) returns `meta_info.output_top_logprobs`
(per generated token, cumulative or incremental as output_token_logprobs) and
`input_top_logprobs` (per prompt position, first entry None), each position a list of
[logprob, token_id, text]. The logprobs are whatever the SGLang server computes (the
raw policy's only where it returns original logprobs).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
from opentelemetry import propagate, trace

from services.common.errors import ClothoError, InvalidArgument, Unavailable
from services.inference.generation_types import (
    Completion,
    FinishReason,
    GenerationRequest,
    TokenChunk,
    TopLogprobs,
    VersionSpan,
)

if TYPE_CHECKING:
    from services.inference.sglang_server.shard import SGLangShard

tracer = trace.get_tracer("clotho.inference.sglang")
FINISH_TYPES = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.ABORT}


@dataclass(eq=False)
class _Sample:
    index: int
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    spans: list[VersionSpan] = field(default_factory=list)
    prompt_logprobs: tuple[float, ...] = ()
    prompt_tokens: int = 0
    output_top_logprobs: list[TopLogprobs] = field(default_factory=list)
    prompt_top_logprobs: tuple[TopLogprobs, ...] = ()
    done: bool = False


class SGLangStream:
    """One request on an SGLang shard: a streaming POST /generate read as events."""

    def __init__(self, shard: SGLangShard, request: GenerationRequest, max_new_tokens: int) -> None:
        self.shard = shard
        self.request = request
        self.max_new_tokens = max_new_tokens
        self._n = request.sampling.n
        self._samples = [_Sample(i) for i in range(self._n)]
        self._open = True
        self._agen: AsyncIterator | None = None
        shard._load += self._n

    def __aiter__(self) -> AsyncIterator[TokenChunk | Completion]:
        self._agen = self._events()
        return self._agen

    def cancel(self) -> None:
        """Closing the connection makes SGLang abort the request."""
        agen, self._agen = self._agen, None
        if agen is not None:
            self.shard._spawn(agen.aclose())  # type: ignore[attr-defined]
        self._release()

    def body(self) -> dict[str, Any]:
        opts = self.request.sampling
        sampling: dict[str, Any] = {
            "temperature": opts.temperature,
            "top_p": opts.top_p,
            "top_k": opts.top_k if opts.top_k > 0 else -1,
            "max_new_tokens": self.max_new_tokens,
            "stop": list(opts.stop),
            "stop_token_ids": list(opts.stop_token_ids),
            "ignore_eos": opts.ignore_eos,
            "no_stop_trim": True,
            # SGLang's names and semantics match SamplingParams' (its logprobs, as ever,
            # are what the server reports).
            "frequency_penalty": opts.frequency_penalty,
            "presence_penalty": opts.presence_penalty,
            "repetition_penalty": opts.repetition_penalty,
        }
        body: dict[str, Any] = {
            "return_logprob": True,
            "logprob_start_len": 0 if self.request.wants_prompt_logprobs else -1,
            "stream": True,
        }
        top = max(self.request.top_logprobs, self.request.prompt_top_logprobs)
        if top > 0:
            body["top_logprobs_num"] = top
        ids = list(self.request.input_ids)
        if opts.seed is not None and self._n > 1:
            # One seed for n parallel samples would make them identical: a batch of n
            # copies with seeds seed..seed+n-1 (the prefix cache still shares the prompt).
            body["input_ids"] = [ids] * self._n
            body["sampling_params"] = [dict(sampling, sampling_seed=opts.seed + i) for i in range(self._n)]
        else:
            if opts.seed is not None:
                sampling["sampling_seed"] = opts.seed
            if self._n > 1:
                sampling["n"] = self._n
            body["input_ids"] = ids
            body["sampling_params"] = sampling
        return body

    async def _events(self) -> AsyncIterator[TokenChunk | Completion]:
        shard = self.shard
        # The request's client span; its traceparent goes to SGLang, which continues the
        # trace when launched with --enable-trace.
        span = (
            tracer.start_span(
                "sglang.generate",
                kind=trace.SpanKind.CLIENT,
                attributes={
                    "clotho.shard": shard.name,
                    "clotho.prompt_tokens": len(self.request.input_ids),
                    "clotho.n": self._n,
                    "clotho.max_new_tokens": self.max_new_tokens,
                },
            )
            if trace.get_current_span().is_recording()
            else None
        )
        headers: dict[str, str] = {}
        first_seen = False
        reasons: list[str] = []
        if span is not None:
            propagate.inject(headers, context=trace.set_span_in_context(span))
        try:
            async with shard.client.stream(
                "POST", "/generate", json=self.body(), headers=headers, timeout=httpx.Timeout(30.0, read=None)
            ) as response:
                if response.status_code != 200:
                    text = (await response.aread()).decode(errors="replace")
                    raise _generate_error(response.status_code, text, shard.name)
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if "error" in event:
                        message = (
                            event["error"].get("message", str(event["error"]))
                            if isinstance(event["error"], dict)
                            else str(event["error"])
                        )
                        raise InvalidArgument(f"SGLang shard {shard.name}: {message}")
                    outs = self._consume(event)
                    if span is not None and outs:
                        if not reasons and not first_seen:
                            first_seen = True
                            span.add_event("first_token")
                        reasons += [o.finish_reason.value for o in outs if isinstance(o, Completion)]
                    for out in outs:
                        yield out
        except httpx.HTTPError as exc:
            if span is not None:
                span.set_status(trace.StatusCode.ERROR, str(exc))
            raise Unavailable(f"SGLang shard {shard.name}: {exc or 'connection error'}") from None
        except BaseException as exc:
            if span is not None and not isinstance(exc, GeneratorExit):
                span.set_status(trace.StatusCode.ERROR, str(exc))
            raise
        finally:
            self._release()
            if span is not None:
                span.set_attributes(
                    {
                        "clotho.output_tokens": sum(len(s.output_ids) for s in self._samples),
                        "clotho.finish_reasons": reasons,
                        "clotho.policy_versions": sorted({v.version for s in self._samples for v in s.spans}),
                    }
                )
                span.end()
        for sample in self._samples:
            if not sample.done:
                yield self._completion(sample, FinishReason.ABORT, "")

    def _consume(self, event: dict) -> list[TokenChunk | Completion]:
        sample = self._samples[int(event.get("index", 0)) % self._n]
        meta = event.get("meta_info") or {}
        total = int(meta.get("completion_tokens", len(sample.output_ids)))
        ids = list(event.get("output_ids") or [])
        seen = len(sample.output_ids)
        new_ids = ids[seen:] if len(ids) == total and len(ids) >= seen else ids
        lps = [float(x[0]) if x and x[0] is not None else 0.0 for x in meta.get("output_token_logprobs") or []]
        new_lps = lps[seen:] if len(lps) == total and len(lps) >= seen else lps
        new_lps = (new_lps + [0.0] * len(new_ids))[: len(new_ids)]
        k = self.request.top_logprobs
        new_tops: list[TopLogprobs] = []
        if k > 0:
            tops = [_top_logprobs(x, k) for x in meta.get("output_top_logprobs") or []]
            new_tops = tops[seen:] if len(tops) == total and len(tops) >= seen else tops
            new_tops = (new_tops + [TopLogprobs()] * len(new_ids))[: len(new_ids)]
        if meta.get("input_token_logprobs"):
            sample.prompt_logprobs = tuple(
                float(x[0]) if x and x[0] is not None else 0.0 for x in meta["input_token_logprobs"]
            )
        k_prompt = self.request.prompt_top_logprobs
        if k_prompt > 0 and meta.get("input_top_logprobs"):
            prompt_tops = [_top_logprobs(x, k_prompt) for x in meta["input_top_logprobs"]]
            # One entry per prompt position; any SGLang leaves out are the first ones.
            missing = len(self.request.input_ids) - len(prompt_tops)
            sample.prompt_top_logprobs = (*[TopLogprobs()] * max(0, missing), *prompt_tops)
        sample.prompt_tokens = int(meta.get("prompt_tokens", sample.prompt_tokens) or 0)
        out: list[TokenChunk | Completion] = []
        run_ids: list[int] = []
        run_lps: list[float] = []
        run_tops: list[TopLogprobs] = []
        run_version: int | None = None
        for j, (token, lp) in enumerate(zip(new_ids, new_lps)):
            version = self._version_at(meta, seen + j)
            if not sample.spans or sample.spans[-1].version != version:
                sample.spans.append(VersionSpan(seen + j, version))
            if run_version is not None and version != run_version:
                out.append(TokenChunk(sample.index, tuple(run_ids), tuple(run_lps), run_version, tuple(run_tops)))
                run_ids, run_lps, run_tops = [], [], []
            run_version = version
            run_ids.append(int(token))
            run_lps.append(lp)
            if new_tops:
                run_tops.append(new_tops[j])
        sample.output_ids += [int(t) for t in new_ids]
        sample.logprobs += new_lps
        sample.output_top_logprobs += new_tops
        if run_ids and self.request.stream and run_version is not None:
            out.append(TokenChunk(sample.index, tuple(run_ids), tuple(run_lps), run_version, tuple(run_tops)))
        if not self.request.stream:
            out = []
        finish = meta.get("finish_reason")
        if finish and not sample.done:
            kind = finish.get("type") if isinstance(finish, dict) else str(finish)
            matched = finish.get("matched") if isinstance(finish, dict) else None
            out.append(
                self._completion(
                    sample, FINISH_TYPES.get(kind or "", FinishReason.ABORT), "" if matched is None else str(matched)
                )
            )
        return out

    def _version_at(self, meta: dict, position: int) -> int:
        spans = meta.get("weight_versions")
        if spans:
            for span in spans:
                if span.get("start", 0) <= position < span.get("end", position + 1):
                    return self.shard._version_of(str(span.get("version")))
            return self.shard._version_of(str(spans[-1].get("version")))
        reported = meta.get("weight_version")
        return self.shard._version_of(None if reported is None else str(reported))

    def _completion(self, sample: _Sample, reason: FinishReason, matched: str) -> Completion:
        sample.done = True
        return Completion(
            index=sample.index,
            output_ids=tuple(sample.output_ids),
            output_logprobs=tuple(sample.logprobs),
            finish_reason=reason,
            matched_stop=matched,
            version_spans=tuple(sample.spans) or (VersionSpan(0, self.shard.policy.version),),
            prompt_logprobs=sample.prompt_logprobs if self.request.wants_prompt_logprobs else (),
            prompt_tokens=sample.prompt_tokens or len(self.request.input_ids),
            output_top_logprobs=tuple(sample.output_top_logprobs),
            prompt_top_logprobs=sample.prompt_top_logprobs,
        )

    def _release(self) -> None:
        if self._open:
            self._open = False
            self.shard._load -= self._n


def _top_logprobs(entries: list | None, k: int) -> TopLogprobs:
    """One position of SGLang's output_top_logprobs / input_top_logprobs (a list of
    [logprob, token_id, text], or None where the position has none), most likely first,
    cut to `k`."""
    pairs = [(float(e[0]), int(e[1])) for e in entries or () if e and e[0] is not None]
    pairs.sort(key=lambda pair: -pair[0])
    pairs = pairs[:k]
    return TopLogprobs(tuple(t for _, t in pairs), tuple(lp for lp, _ in pairs))


def _generate_error(status: int, text: str, shard: str) -> ClothoError:
    try:
        payload = json.loads(text)
        message = payload.get("error", {}).get("message") or payload.get("message") or text
    except (ValueError, AttributeError):
        message = text
    if 400 <= status < 500:
        return InvalidArgument(f"SGLang shard {shard}: {message}")
    return Unavailable(f"SGLang shard {shard}: HTTP {status} {message}")
