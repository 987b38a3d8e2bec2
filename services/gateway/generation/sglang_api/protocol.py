"""SGLang's native `/generate` request and response, translated to and from
InferenceService.Generate.

Request: `text` (str or list) or `input_ids` (list[int] or list[list[int]]),
`sampling_params` (one dict, or one per prompt), `return_logprob`,
`logprob_start_len`, `top_logprobs_num`, `return_text_in_logprobs`, `rid`, `stream`.
Response: one object for a single prompt with n=1, else a list, prompt-major then
sample, each `{"text", "output_ids", "meta_info": {...}}` as SGLang writes it.

`frequency_penalty`, `presence_penalty` and `repetition_penalty` in sampling_params go
to the engine with SGLang's semantics (the same as SamplingParams').

Logprobs (with `return_logprob`) are the policy's own, before temperature, top-k,
top-p and penalties. `meta_info.output_token_logprobs` has one `[logprob, token_id, text]` per
generated token, and with `logprob_start_len` >= 0 `input_token_logprobs` one per
prompt position from there (the first prompt token's logprob None). `top_logprobs_num`
k (at most 20, the engine's bound) adds, as SGLang's TokenizerManager does,
`output_top_logprobs`: per generated token the k most likely `[logprob, token_id,
text]`, most likely first; and with prompt logprobs `input_top_logprobs`, the same per
prompt position from `logprob_start_len` (None for the first prompt token, which has
no context). `text` is the token decoded alone with `return_text_in_logprobs`, else
None.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from clotho.v1 import inference_service_pb2 as pb
from services.common.errors import InvalidArgument
from services.gateway.generation.json_fields import INT32_MAX, UINT32_MAX, Fields, is_int, read_sampling

log = logging.getLogger(__name__)

# Sampling parameters handled by the gateway itself rather than the engine.
_GATEWAY_SAMPLING = {"skip_special_tokens", "no_stop_trim", "spaces_between_special_tokens"}
_UINT32, _INT32 = UINT32_MAX, INT32_MAX
# The most alternatives per position: the engine's bound (MAX_TOP_LOGPROBS in
# services/inference/generation_types.py).
MAX_TOP_LOGPROBS = 20


@dataclass
class Prompt:
    """One prompt of a /generate call, ready to send."""

    input_ids: list[int] | None
    text: str | None
    sampling: pb.SamplingParams
    n: int
    stop: list[str]
    return_logprob: bool
    logprob_start_len: int
    rid: str
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    top_logprobs_num: int = 0

    @property
    def prompt_logprobs(self) -> bool:
        """Whether the result carries prompt logprobs (input_token_logprobs)."""
        return self.return_logprob and self.logprob_start_len >= 0

    @property
    def top_logprobs_k(self) -> int:
        """Alternatives per position the result carries (0: no top logprobs fields)."""
        return self.top_logprobs_num if self.return_logprob else 0


@dataclass
class GenerateCall:
    """A parsed /generate body."""

    prompts: list[Prompt]
    batched: bool
    stream: bool = False
    return_text_in_logprobs: bool = False
    single: bool = field(init=False)

    def __post_init__(self) -> None:
        self.single = not self.batched and self.prompts[0].n == 1

    def request(self, i: int) -> pb.GenerateRequest:
        prompt = self.prompts[i]
        assert prompt.input_ids is not None
        return pb.GenerateRequest(
            input_ids=prompt.input_ids,
            sampling_params=prompt.sampling,
            return_prompt_logprobs=prompt.prompt_logprobs,
            stream=self.stream,
            request_id=prompt.rid,
            top_logprobs=prompt.top_logprobs_k,
            prompt_top_logprobs=prompt.top_logprobs_k if prompt.prompt_logprobs else 0,
        )


def _per_prompt(name: str, value: Any, count: int, batched: bool, check) -> list[Any]:
    """A value given once for every prompt, or as a list with one per prompt."""
    if batched and isinstance(value, list):
        if len(value) != count:
            raise InvalidArgument(f"{name} has {len(value)} entries but there are {count} prompts")
        for i, v in enumerate(value):
            check(f"{name}[{i}]", v)
        return list(value)
    check(name, value)
    return [value] * count


def _sampling(where: str, params: Any) -> tuple[pb.SamplingParams, int, list[str], bool, bool]:
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise InvalidArgument(f"{where} must be an object, got {type(params).__name__}")
    out = pb.SamplingParams()

    fields = Fields(params, where)
    integer = fields.integer

    if (v := integer("max_new_tokens", 0, _UINT32)) is not None:
        out.max_new_tokens = v
    # SGLang's "all tokens" top_k is -1; it also spells the seed sampling_seed.
    read_sampling(fields, out, "seed" if params.get("seed") is not None else "sampling_seed")
    n = integer("n", 1, _UINT32)
    if n is not None:
        out.n = n

    stops = fields.strings("stop")
    out.stop.extend(stops)

    stop_ids = params.get("stop_token_ids")
    if stop_ids is not None:
        if not isinstance(stop_ids, list) or not all(is_int(t) and -_INT32 - 1 <= t <= _INT32 for t in stop_ids):
            raise InvalidArgument(f"{where}.stop_token_ids must be a list of token ids, got {stop_ids!r}")
        out.stop_token_ids.extend(stop_ids)

    flags = {
        key: fields.flag(key, default)
        for key, default in (("ignore_eos", False), ("skip_special_tokens", True), ("no_stop_trim", False))
    }
    out.ignore_eos = flags["ignore_eos"]

    known = {
        "max_new_tokens",
        "temperature",
        "top_p",
        "top_k",
        "n",
        "seed",
        "sampling_seed",
        "stop",
        "stop_token_ids",
        "ignore_eos",
        "frequency_penalty",
        "presence_penalty",
        "repetition_penalty",
    } | _GATEWAY_SAMPLING
    ignored = sorted(set(params) - known)
    if ignored:
        log.debug("ignoring sampling params the engine does not support: %s", ignored)
    return out, n or 1, stops, flags["skip_special_tokens"], flags["no_stop_trim"]


def parse_generate(body: Any) -> GenerateCall:
    """Validate a /generate body; InvalidArgument names the offending field."""
    if not isinstance(body, dict):
        raise InvalidArgument("the body must be a JSON object")
    text, input_ids = body.get("text"), body.get("input_ids")
    if (text is None) == (input_ids is None):
        raise InvalidArgument("give exactly one of text or input_ids")

    texts: list[str] | None = None
    ids: list[list[int]] | None = None
    if text is not None:
        if isinstance(text, str):
            texts, batched = [text], False
        elif isinstance(text, list) and text and all(isinstance(t, str) for t in text):
            texts, batched = list(text), True
        else:
            raise InvalidArgument("text must be a string or a non-empty list of strings")
        count = len(texts)
    else:
        if not isinstance(input_ids, list) or not input_ids:
            raise InvalidArgument("input_ids must be a non-empty list of token ids or of lists of token ids")
        batched = isinstance(input_ids[0], list)
        rows = input_ids if batched else [input_ids]
        for i, row in enumerate(rows):
            where = f"input_ids[{i}]" if batched else "input_ids"
            if not isinstance(row, list) or not row:
                raise InvalidArgument(f"{where} must be a non-empty list of token ids")
            for k, tok in enumerate(row):
                if not is_int(tok) or not 0 <= tok <= _INT32:
                    raise InvalidArgument(f"{where}[{k}] must be a token id, got {tok!r}")
        ids = [list(r) for r in rows]
        count = len(ids)

    def any_ok(_w: str, _v: Any) -> None:
        return None

    def bool_ok(where: str, v: Any) -> None:
        if not isinstance(v, bool):
            raise InvalidArgument(f"{where} must be true or false, got {v!r}")

    def int_ok(where: str, v: Any) -> None:
        if not is_int(v):
            raise InvalidArgument(f"{where} must be an integer, got {v!r}")

    def top_ok(where: str, v: Any) -> None:
        if v is None:
            return
        if not is_int(v):
            raise InvalidArgument(f"{where} must be an integer, got {v!r}")
        if not 0 <= v <= MAX_TOP_LOGPROBS:
            raise InvalidArgument(f"{where} must be between 0 and {MAX_TOP_LOGPROBS}, got {v}")

    def rid_ok(where: str, v: Any) -> None:
        if v is not None and not isinstance(v, str):
            raise InvalidArgument(f"{where} must be a string, got {v!r}")

    samplings = _per_prompt("sampling_params", body.get("sampling_params"), count, batched, any_ok)
    logprobs = _per_prompt("return_logprob", body.get("return_logprob", False), count, batched, bool_ok)
    starts = _per_prompt("logprob_start_len", body.get("logprob_start_len", -1), count, batched, int_ok)
    tops = _per_prompt("top_logprobs_num", body.get("top_logprobs_num"), count, batched, top_ok)
    rids = _per_prompt("rid", body.get("rid"), count, batched, rid_ok)
    if batched and isinstance(body.get("rid"), str):
        # As SGLang does: one string for a batch is the prefix of per-prompt ids.
        rids = [f"{body['rid']}_{i}" for i in range(count)]
    stream = body.get("stream", False)
    bool_ok("stream", stream)
    text_in_logprobs = body.get("return_text_in_logprobs", False)
    bool_ok("return_text_in_logprobs", text_in_logprobs)

    prompts = []
    for i in range(count):
        where = f"sampling_params[{i}]" if isinstance(body.get("sampling_params"), list) else "sampling_params"
        sampling, n, stops, skip_special, no_trim = _sampling(where, samplings[i])
        prompts.append(
            Prompt(
                input_ids=ids[i] if ids is not None else None,
                text=texts[i] if texts is not None else None,
                sampling=sampling,
                n=n,
                stop=stops,
                return_logprob=logprobs[i],
                logprob_start_len=starts[i],
                rid=rids[i] or uuid.uuid4().hex,
                skip_special_tokens=skip_special,
                no_stop_trim=no_trim,
                top_logprobs_num=tops[i] or 0,
            )
        )
    return GenerateCall(prompts=prompts, batched=batched, stream=stream, return_text_in_logprobs=text_in_logprobs)


_INT_TEXT = re.compile(r"-?\d+")


def finish_reason(prompt: Prompt, completion: pb.Completion) -> dict[str, Any] | None:
    """SGLang's finish_reason object: stop (with the token id or string matched),
    length (with the tokens generated) or abort (with a message)."""
    reason = completion.finish_reason
    if reason == pb.FINISH_REASON_STOP:
        matched: Any = completion.matched_stop
        if matched in prompt.stop:
            pass
        elif _INT_TEXT.fullmatch(matched):
            matched = int(matched)
        elif not matched:
            matched = completion.output_ids[-1] if completion.output_ids else None
        return {"type": "stop", "matched": matched}
    if reason == pb.FINISH_REASON_LENGTH:
        return {"type": "length", "length": len(completion.output_ids)}
    if reason == pb.FINISH_REASON_ABORT:
        return {"type": "abort", "message": completion.matched_stop or "aborted"}
    return None


def trim_stop(prompt: Prompt, completion: pb.Completion, text: str) -> str:
    """SGLang cuts the output text at a matched stop string unless no_stop_trim."""
    matched = completion.matched_stop
    if (
        completion.finish_reason == pb.FINISH_REASON_STOP
        and not prompt.no_stop_trim
        and matched
        and matched in prompt.stop
    ):
        cut = text.find(matched)
        if cut != -1:
            return text[:cut]
    return text


def weight_version(completion: pb.Completion) -> str:
    spans = completion.version_spans
    return str(spans[-1].version) if spans else "0"


# A token id's text, decoded alone (return_text_in_logprobs).
TokenText = Callable[[int], str]


def top_entry(top: pb.TopLogprobs | None, k: int, token_text: TokenText | None = None) -> list[list[Any]] | None:
    """One position of SGLang's output_top_logprobs / input_top_logprobs: the k most
    likely `[logprob, token_id, text]`, most likely first; None where the position has
    none (the first prompt token), as SGLang's detokenize_top_logprobs_tokens."""
    if top is None or not top.token_ids:
        return None
    return [
        [lp, tid, token_text(tid) if token_text is not None else None]
        for tid, lp in zip(top.token_ids[:k], top.logprobs[:k])
    ]


def top_entries(
    tops: Sequence[pb.TopLogprobs], count: int, k: int, token_text: TokenText | None = None
) -> list[list[list[Any]] | None]:
    """`count` positions of output_top_logprobs (None past what the engine sent)."""
    return [top_entry(tops[i] if i < len(tops) else None, k, token_text) for i in range(count)]


def result_json(
    prompt: Prompt,
    completion: pb.Completion,
    text: str,
    rid: str,
    token_texts: list[str] | None = None,
    prompt_token_texts: list[str] | None = None,
    e2e_latency: float | None = None,
    token_text: TokenText | None = None,
) -> dict[str, Any]:
    """One SGLang result object for one sample. `token_text` decodes the top logprobs'
    alternatives (with return_text_in_logprobs)."""
    output_ids = list(completion.output_ids)
    meta: dict[str, Any] = {
        "id": rid,
        "finish_reason": finish_reason(prompt, completion),
        "prompt_tokens": completion.prompt_tokens or len(prompt.input_ids or ()),
        "completion_tokens": len(output_ids),
        "weight_version": weight_version(completion),
        # Clotho: which policy version produced which tokens ([start_token, version]).
        "weight_version_spans": [[s.start_token, s.version] for s in completion.version_spans],
    }
    if prompt.return_logprob:
        texts: Sequence[str | None] = token_texts or [None] * len(output_ids)
        meta["output_token_logprobs"] = [
            [lp, tok, t] for lp, tok, t in zip(completion.output_logprobs, output_ids, texts)
        ]
        start = prompt.logprob_start_len
        if start >= 0 and prompt.input_ids is not None:
            lps = list(completion.prompt_logprobs)
            ptexts: Sequence[str | None] = prompt_token_texts or [None] * len(prompt.input_ids)
            meta["input_token_logprobs"] = [
                [(lps[k] if 0 < k < len(lps) else None), prompt.input_ids[k], ptexts[k]]
                for k in range(start, len(prompt.input_ids))
            ]
        k = prompt.top_logprobs_k
        if k > 0:
            meta["output_top_logprobs"] = top_entries(completion.output_top_logprobs, len(output_ids), k, token_text)
            if start >= 0 and prompt.input_ids is not None:
                ptops = completion.prompt_top_logprobs
                meta["input_top_logprobs"] = [
                    top_entry(ptops[p], k, token_text) if 0 < p < len(ptops) else None
                    for p in range(start, len(prompt.input_ids))
                ]
    if e2e_latency is not None:
        meta["e2e_latency"] = e2e_latency
    return {"text": trim_stop(prompt, completion, text), "output_ids": output_ids, "meta_info": meta}


def result_rid(prompt: Prompt, sample: int) -> str:
    return prompt.rid if prompt.n == 1 else f"{prompt.rid}-{sample}"
