"""vLLM's `/generate` dialect (the request and reply of Atropos'
example_trainer/vllm_api_server.py, which atroposlib's `VLLMServer`, server_type
"vllm", talks to), translated to and from InferenceService.Generate.

It shares the path with SGLang's `/generate` (sglang_api/api_router.py): a body with `prompt`
and neither `text` nor `input_ids` is vLLM's (`is_vllm_body`); every body SGLang's
parser accepts has one of those, so SGLang's answers do not change.

Request: `prompt`, a string or `{"prompt_token_ids": [...]}` (or `{"prompt": "..."}`),
`stream`, and vLLM `SamplingParams` fields at the top level. Served: `n`,
`max_tokens` (vLLM's default of 16 when absent; null: up to the engine's limit),
`temperature`, `top_p`, `top_k` (0 or -1: all), `seed`, `presence_penalty`,
`frequency_penalty` (each in [-2, 2]), `repetition_penalty` (> 0; vLLM's semantics,
which SamplingParams documents), `stop` (strings),
`stop_token_ids`, `ignore_eos`, `logprobs`, `prompt_logprobs`,
`include_stop_str_in_output`, `skip_special_tokens`, `detokenize` (false: empty
text). Accepted and ignored, as they change no sampling: `spaces_between_special_tokens`,
`output_kind`, `flat_logprobs`, `stream_interval`, `skip_clone`,
`skip_reading_prefix_cache`, `routed_experts_prompt_start`. SamplingParams fields the
engine cannot honour (`min_p`, `min_tokens`, `length_penalty`, `logit_bias`, structured
outputs, beam search, ...) are accepted at their default values only; other values are
refused with 400, listing them. A name SamplingParams does not have is refused with
400 (vLLM refuses it too).

Logprobs are the policy's own (raw logits, whatever the temperature or penalties:
vLLM's default `raw_logprobs`). As vLLM, `logprobs: k` gives each generated position a dict of the
sampled token first, then the k most likely tokens (k or k + 1 entries; `logprobs: 0`,
what VLLMServer sends, just the sampled one), from the engine's `top_logprobs`; and
`prompt_logprobs: k` gives each prompt position the prompt token then the k most
likely (`None` for the first position). k is at most 20, the engine's bound and
vLLM's default `max_logprobs`; vLLM's -1 (the whole vocabulary) is refused.

Reply, as vllm_api_server.py's: `{"text": [...], "prompt": "...", "finish_reasons":
[...]}` ("stop", "length" or "abort"), and when `logprobs` is not None also
`logprobs` (per output, per token `[{"<token id>": logprob, ...}]`),
`prompt_token_ids` and `token_ids` (per output); with `prompt_logprobs`,
`prompt_logprobs` (per prompt position `{"<token id>": logprob, ...}`, `None` first,
as vLLM's RequestOutput has it: vllm_api_server.py leaves it out, but atroposlib's
`VLLMServer.get_logprobs` reads it). Text follows vLLM: a stop string is cut off
(kept with `include_stop_str_in_output`), and the text of the stop token (eos or one
of `stop_token_ids`) that ended a sample is left out. With `stream: true` that server
answers one newline-terminated JSON line per engine output, and as it asks for the
final output only, that is one line `{"text": [prompt + text, ...]}`; so does this
one (serving.py). Completions go through InferencePool, which records their version
receipts.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any

from clotho.v1 import inference_service_pb2 as pb
from services.common.errors import InvalidArgument
from services.gateway.generation.json_fields import INT32_MAX, UINT32_MAX, Fields, is_int, read_sampling

log = logging.getLogger(__name__)

_UINT32, _INT32 = UINT32_MAX, INT32_MAX
# vLLM's SamplingParams.max_tokens default.
DEFAULT_MAX_TOKENS = 16
# The most alternatives per position: the engine's bound (MAX_TOP_LOGPROBS in
# services/inference/generation_types.py), and vLLM's default max_logprobs.
MAX_LOGPROBS = 20

SERVED = frozenset(
    {
        "n",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "stop",
        "stop_token_ids",
        "ignore_eos",
        "logprobs",
        "prompt_logprobs",
        "include_stop_str_in_output",
        "skip_special_tokens",
        "detokenize",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
    }
)
# SamplingParams fields that change no sampling: accepted with any value, ignored.
HARMLESS = frozenset(
    {
        "spaces_between_special_tokens",
        "output_kind",
        "flat_logprobs",
        "stream_interval",
        "skip_clone",
        "skip_reading_prefix_cache",
        "routed_experts_prompt_start",
    }
)


def _empty(value: Any) -> bool:
    return value is None or value == [] or value == {}


# SamplingParams fields the engine cannot honour: accepted only when they ask for
# nothing (their default), each with the test of that.
DEFAULT_ONLY: dict[str, Any] = {
    "min_p": lambda v: v == 0,
    "min_tokens": lambda v: v == 0,
    "best_of": lambda v: v is None,  # checked against n below
    "use_beam_search": lambda v: v is False,
    "length_penalty": lambda v: v == 1,
    "early_stopping": lambda v: v is False,
    "logits_processors": _empty,
    "truncate_prompt_tokens": lambda v: v is None,
    "guided_decoding": lambda v: v is None,
    "structured_outputs": lambda v: v is None,
    "logit_bias": _empty,
    "allowed_token_ids": lambda v: v is None,
    "bad_words": _empty,
    "extra_args": _empty,
    "logprob_token_ids": lambda v: v is None,
    "prompt_logprob_token_ids": lambda v: v is None,
    "prompt_logprob_start": lambda v: v is None,
    "thinking_token_budget": lambda v: v is None or v == -1,
    "repetition_detection": lambda v: v is None,
    "trace_decode_token_ids": lambda v: v is None,
}
_PROMPT_KEYS = frozenset({"prompt_token_ids", "prompt", "cache_salt"})
_FINISH = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_ABORT: "abort",
}


@dataclass
class VllmCall:
    """A parsed vLLM /generate body (one prompt, n samples)."""

    input_ids: list[int] | None
    text: str | None
    sampling: pb.SamplingParams
    n: int
    stop: list[str]
    logprobs: int | None
    prompt_logprobs: int | None
    include_stop_str_in_output: bool
    skip_special_tokens: bool
    detokenize: bool
    stream: bool
    request_id: str

    def request(self) -> pb.GenerateRequest:
        assert self.input_ids is not None
        return pb.GenerateRequest(
            input_ids=self.input_ids,
            sampling_params=self.sampling,
            return_prompt_logprobs=self.prompt_logprobs is not None,
            top_logprobs=self.logprobs or 0,
            prompt_top_logprobs=self.prompt_logprobs or 0,
            request_id=self.request_id,
        )


def is_vllm_body(body: Any) -> bool:
    """vLLM's body has `prompt`; SGLang's has `text` or `input_ids`."""
    return isinstance(body, dict) and "prompt" in body and body.get("text") is None and body.get("input_ids") is None


def _token_ids(where: str, value: Any, allow_empty: bool = False) -> list[int]:
    if not isinstance(value, list) or (not value and not allow_empty):
        raise InvalidArgument(
            f"{where} must be a {'' if allow_empty else 'non-empty '}list of token ids, got {value!r}"
        )
    for k, tok in enumerate(value):
        if not is_int(tok) or not 0 <= tok <= _INT32:
            raise InvalidArgument(f"{where}[{k}] must be a token id, got {tok!r}")
    return list(value)


def _prompt(value: Any) -> tuple[list[int] | None, str | None]:
    if isinstance(value, str):
        if not value:
            raise InvalidArgument("prompt must not be empty")
        return None, value
    if isinstance(value, dict):
        unknown = sorted(set(value) - _PROMPT_KEYS)
        if unknown:
            raise InvalidArgument(
                f"prompt has fields this server does not support: {', '.join(unknown)} "
                '(give {"prompt_token_ids": [...]} or {"prompt": "..."})'
            )
        ids, text = value.get("prompt_token_ids"), value.get("prompt")
        if ids is not None:
            return _token_ids("prompt.prompt_token_ids", ids), None
        if isinstance(text, str) and text:
            return None, text
        raise InvalidArgument(
            "prompt must have prompt_token_ids (a non-empty list of token ids) or a non-empty prompt string"
        )
    raise InvalidArgument(f'prompt must be a string or {{"prompt_token_ids": [...]}}, got {type(value).__name__}')


def parse_vllm(body: dict[str, Any]) -> VllmCall:
    """Validate a vLLM /generate body; InvalidArgument names the offending field(s)."""
    params = {k: v for k, v in body.items() if k not in ("prompt", "stream")}
    unknown = sorted(set(params) - SERVED - HARMLESS - set(DEFAULT_ONLY))
    if unknown:
        hint = " (vLLM spells it max_tokens)" if {"max_new_tokens", "max_completion_tokens"} & set(unknown) else ""
        raise InvalidArgument(f"unknown field(s), not vLLM SamplingParams: {', '.join(unknown)}{hint}")

    fields = Fields(params)
    integer, flag = fields.integer, fields.flag

    out = pb.SamplingParams()
    n = integer("n", 1, _UINT32) or 1
    out.n = n
    if "max_tokens" not in params:
        out.max_new_tokens = DEFAULT_MAX_TOKENS
    elif (v := integer("max_tokens", 1, _UINT32)) is not None:
        out.max_new_tokens = v
    # vLLM's "all tokens" top_k is 0 or -1.
    read_sampling(fields, out)

    stops = fields.strings("stop")
    out.stop.extend(s for s in stops if s)
    if params.get("stop_token_ids") is not None:
        out.stop_token_ids.extend(_token_ids("stop_token_ids", params["stop_token_ids"], allow_empty=True))
    out.ignore_eos = flag("ignore_eos", False)

    logprobs = integer("logprobs", 0, MAX_LOGPROBS)
    prompt_logprobs = integer("prompt_logprobs", 0, MAX_LOGPROBS)

    refused = []
    for key, is_default in DEFAULT_ONLY.items():
        if key not in params:
            continue
        value = params[key]
        ok = (value is None or value == n) if key == "best_of" else is_default(value)
        if not ok:
            refused.append(f"{key}={json.dumps(value)}")
    if refused:
        raise InvalidArgument(
            "sampling parameters this engine cannot honour (only their defaults are accepted): " + ", ".join(refused)
        )

    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidArgument(f"stream must be true or false, got {stream!r}")
    if "prompt" not in body:
        raise InvalidArgument("prompt is required")
    input_ids, text = _prompt(body["prompt"])
    return VllmCall(
        input_ids=input_ids,
        text=text,
        sampling=out,
        n=n,
        stop=[s for s in stops if s],
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        include_stop_str_in_output=flag("include_stop_str_in_output", False),
        skip_special_tokens=flag("skip_special_tokens", True),
        detokenize=flag("detokenize", True),
        stream=stream,
        request_id=uuid.uuid4().hex,
    )


# ---- replies (tokenizer work: run in the tokenizer's thread) ---------------------------


def output_text(tokenizer: Any, call: VllmCall, completion: pb.Completion) -> str:
    """An output's text as vLLM gives it: a matched stop string cut off (kept with
    include_stop_str_in_output), the text of a stop token that ended it left out."""
    if tokenizer is None or not call.detokenize:
        return ""
    ids = list(completion.output_ids)
    stopped = completion.finish_reason == pb.FINISH_REASON_STOP
    matched = completion.matched_stop
    if stopped and matched and matched in call.stop:
        text = tokenizer.decode(ids, skip_special_tokens=call.skip_special_tokens)
        cut = text.find(matched)
        if cut == -1:
            return text
        return text[: cut + len(matched)] if call.include_stop_str_in_output else text[:cut]
    if stopped and ids and not call.include_stop_str_in_output:
        # Ended by a stop token (eos or one of stop_token_ids): vLLM leaves its text out.
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=call.skip_special_tokens)


def prompt_text(tokenizer: Any, call: VllmCall) -> str:
    if call.text is not None:
        return call.text
    if tokenizer is None or call.input_ids is None:
        return ""
    return tokenizer.decode(call.input_ids)


def _position(token: int, logprob: float, top: pb.TopLogprobs | None, k: int) -> dict[str, float]:
    """One position's logprobs as vLLM keys them: the actual token first, then the k
    most likely (the actual one only once)."""
    entry = {str(token): logprob}
    if top is not None:
        for tid, lp in list(zip(top.token_ids, top.logprobs))[:k]:
            entry.setdefault(str(tid), lp)
    return entry


def _output_logprobs(call: VllmCall, c: pb.Completion) -> list[list[dict[str, float]]]:
    tops = c.output_top_logprobs
    k = call.logprobs or 0
    return [
        [_position(tok, lp, tops[i] if i < len(tops) else None, k)]
        for i, (tok, lp) in enumerate(zip(c.output_ids, c.output_logprobs))
    ]


def _prompt_logprobs(call: VllmCall, completions: list[pb.Completion]) -> list[dict[str, float] | None]:
    assert call.input_ids is not None
    done = next((c for c in completions if len(c.prompt_logprobs)), None)
    lps = list(done.prompt_logprobs) if done is not None else []
    tops = done.prompt_top_logprobs if done is not None else []
    k = call.prompt_logprobs or 0
    return [None] + [
        _position(tok, lps[p], tops[p] if p < len(tops) else None, k) if p < len(lps) else None
        for p, tok in enumerate(call.input_ids)
        if p > 0
    ]


def render(tokenizer: Any, call: VllmCall, completions: list[pb.Completion]) -> dict[str, Any]:
    """vllm_api_server.py's non-streaming reply."""
    assert call.input_ids is not None
    ret: dict[str, Any] = {
        "text": [output_text(tokenizer, call, c) for c in completions],
        "prompt": prompt_text(tokenizer, call),
        "finish_reasons": [_FINISH.get(c.finish_reason) for c in completions],
    }
    if call.logprobs is not None:
        ret["logprobs"] = [_output_logprobs(call, c) for c in completions]
        ret["prompt_token_ids"] = list(call.input_ids)
        ret["token_ids"] = [list(c.output_ids) for c in completions]
    if call.prompt_logprobs is not None:
        ret["prompt_logprobs"] = _prompt_logprobs(call, completions)
    return ret


def stream_line(tokenizer: Any, call: VllmCall, completions: list[pb.Completion]) -> bytes:
    """The one line vllm_api_server.py streams: prompt + text of every output."""
    prompt = prompt_text(tokenizer, call)
    return (json.dumps({"text": [prompt + output_text(tokenizer, call, c) for c in completions]}) + "\n").encode()
