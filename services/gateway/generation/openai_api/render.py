"""OpenAI's JSON for InferenceService results: choices, finish reasons, stop
strings, logprobs in the chat and the legacy completions shapes, usage, and the
text a stream may send so far.

Logprobs are the policy's own (before temperature, top-k and top-p), the sampled
token's and its alternatives alike, from the engine's top-k logprobs (at most 20 per
position). Chat: `logprobs: true, top_logprobs: k` gives each `logprobs.content[j]`
the k most likely tokens, most likely first, as `{token, logprob, bytes}`. Legacy
completions: `logprobs: k` gives each `top_logprobs[j]` a `{token: logprob}` dict of
the k most likely tokens plus the sampled one (k or k + 1 entries, as OpenAI: 0 gives
the sampled token alone); with `echo`, the prompt positions too (None for the first).
A token's string is the token decoded alone, special tokens kept. Should the engine
return no alternatives for a position (an inference service that predates them), that
position lists the sampled token alone.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from clotho.v1 import inference_service_pb2 as pb
from services.gateway.generation.openai_api.protocol import FINISH_REASONS

Alternatives = list[tuple[str, float]]


class TokenStrings:
    """Token id -> the token's string as logprobs show it (decoded alone, special
    tokens kept), each id decoded once: alternatives name the same few ids over and
    over. Tokenizer thread only."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def alternatives(self, tops: Sequence[pb.TopLogprobs], count: int, k: int) -> list[Alternatives | None]:
        """The k most likely tokens at each of `count` positions (None where `tops`
        has no entry)."""
        out: list[Alternatives | None] = []
        for i in range(count):
            top = tops[i] if i < len(tops) else None
            if top is None or not top.token_ids:
                out.append(None)
            else:
                out.append([(self(t), lp) for t, lp in zip(top.token_ids[:k], top.logprobs[:k])])
        return out


@dataclass
class Rendered:
    """One sample, decoded: what both routes' choices are built from."""

    text: str
    finish_reason: str | None
    matched_stop: int | str | None
    # Per kept token (the ones the text covers): id, logprob, token string, text piece.
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    # Per kept token, its alternatives (token string, logprob), most likely first, when
    # top logprobs were asked for; None where the engine sent none.
    alternatives: list[Alternatives | None] = field(default_factory=list)
    completion_tokens: int = 0


def matched_stop(completion: pb.Completion, stops: list[str]) -> int | str | None:
    if completion.finish_reason != pb.FINISH_REASON_STOP:
        return None
    matched = completion.matched_stop
    if matched in stops:
        return matched
    if matched.lstrip("-").isdigit():
        return int(matched)
    return completion.output_ids[-1] if completion.output_ids else None


def stop_cut(text: str, completion: pb.Completion, stops: list[str], no_stop_trim: bool) -> int | None:
    """Where the text ends when a stop string ended the sample: OpenAI leaves the stop
    string out."""
    matched = completion.matched_stop
    if no_stop_trim or completion.finish_reason != pb.FINISH_REASON_STOP or matched not in stops:
        return None
    cut = text.find(matched)
    return cut if cut >= 0 else None


def render(
    tokenizer: Any,
    completion: pb.Completion,
    stops: list[str],
    skip_special: bool,
    no_stop_trim: bool,
    with_tokens: bool,
    top_logprobs: int = 0,
    strings: TokenStrings | None = None,
) -> Rendered:
    """Decode a Completion (runs in the tokenizer thread). With a stop string the text
    is cut before it and the tokens past the cut are left out of the logprobs. With
    `top_logprobs` k, each kept token's k most likely alternatives too."""
    ids = list(completion.output_ids)
    text = tokenizer.decode(ids, skip_special_tokens=skip_special)
    cut = stop_cut(text, completion, stops, no_stop_trim)
    if cut is not None:
        text = text[:cut]
    out = Rendered(
        text=text,
        finish_reason=FINISH_REASONS.get(completion.finish_reason),
        matched_stop=matched_stop(completion, stops),
        completion_tokens=len(ids),
    )
    if with_tokens:
        strings = strings or TokenStrings(tokenizer)
        offset = 0
        for tok, lp in zip(ids, completion.output_logprobs):
            if cut is not None and offset >= cut:
                break
            piece = tokenizer.decode([tok], skip_special_tokens=skip_special)
            out.token_ids.append(tok)
            out.logprobs.append(lp)
            out.tokens.append(strings(tok))
            out.pieces.append(piece)
            offset += len(piece)
        if top_logprobs > 0:
            out.alternatives = strings.alternatives(completion.output_top_logprobs, len(out.token_ids), top_logprobs)
    return out


def token_strings(
    tokenizer: Any, ids: list[int], skip_special: bool, strings: TokenStrings | None = None
) -> tuple[list[str], list[str]]:
    """(token strings, text pieces) of ids, for logprobs (tokenizer thread)."""
    strings = strings or TokenStrings(tokenizer)
    return (
        [strings(t) for t in ids],
        [tokenizer.decode([t], skip_special_tokens=skip_special) for t in ids],
    )


def stream_tokens(
    strings: TokenStrings, ids: list[int], skip_special: bool, tops: Sequence[pb.TopLogprobs], k: int
) -> tuple[list[str], list[str], list[Alternatives | None] | None]:
    """(token strings, text pieces, alternatives or None) of a streamed run of tokens
    whose top logprobs are `tops` (tokenizer thread)."""
    tokens, pieces = token_strings(strings.tokenizer, ids, skip_special, strings)
    return tokens, pieces, strings.alternatives(tops, len(ids), k) if k > 0 else None


def _chat_token(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def chat_logprobs(
    tokens: list[str],
    logprobs: list[float],
    top: int | None,
    alternatives: Sequence[Alternatives | None] | None = None,
) -> dict[str, Any]:
    """`choices[i].logprobs` of a chat completion: per token its `top` most likely
    alternatives (the sampled token alone where `alternatives` has none)."""
    content = []
    for j, (tok, lp) in enumerate(zip(tokens, logprobs)):
        entry = _chat_token(tok, lp)
        alts = alternatives[j] if alternatives is not None and j < len(alternatives) else None
        if not top:
            entry["top_logprobs"] = []
        elif alts is None:
            entry["top_logprobs"] = [_chat_token(tok, lp)]
        else:
            entry["top_logprobs"] = [_chat_token(t, v) for t, v in alts[:top]]
        content.append(entry)
    return {"content": content, "refusal": None}


def _legacy_top(token: str, logprob: float, alts: Alternatives | None) -> dict[str, float]:
    """One position of a legacy completion's top_logprobs: the alternatives, most
    likely first, then the sampled token if it is not among them (a token string two
    ids share keeps the likelier one's logprob)."""
    out: dict[str, float] = {}
    for t, v in alts or ():
        out.setdefault(t, v)
    out.setdefault(token, logprob)
    return out


def completion_logprobs(
    tokens: list[str],
    pieces: list[str],
    logprobs: Sequence[float | None],
    start_offset: int = 0,
    alternatives: Sequence[Alternatives | None] | None = None,
) -> dict[str, Any]:
    """`choices[i].logprobs` of a legacy completion; a None logprob (the first prompt
    token of an echo) has no top entry."""
    offsets = []
    at = start_offset
    for piece in pieces:
        offsets.append(at)
        at += len(piece)
    alts = list(alternatives or ())
    alts += [None] * (len(tokens) - len(alts))
    return {
        "tokens": list(tokens),
        "token_logprobs": list(logprobs),
        "top_logprobs": [
            None if lp is None else _legacy_top(tok, lp, alt) for tok, lp, alt in zip(tokens, logprobs, alts)
        ],
        "text_offset": offsets,
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class StreamText:
    """Text deltas of one streamed sample. Holds back what could still turn out to be
    the start of a stop string (OpenAI never sends the stop string) and a trailing
    replacement character (half of a multi-byte character)."""

    def __init__(self, stops: list[str], no_stop_trim: bool = False) -> None:
        self.stops = [] if no_stop_trim else stops
        self.sent = 0

    def _held(self, text: str) -> int:
        """Length of the longest end of `text` that begins some stop string."""
        held = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), held, -1):
                if text.endswith(stop[:k]):
                    held = k
                    break
        return held

    def update(self, text: str) -> str:
        cuts = [p for s in self.stops if (p := text.find(s)) >= 0]
        if cuts:
            safe = min(cuts)
        else:
            safe = len(text) - self._held(text)
            if text.endswith("\ufffd"):
                safe = min(safe, len(text) - 1)
        if safe <= self.sent:
            return ""
        delta = text[self.sent : safe]
        self.sent = safe
        return delta

    def final(self, text: str) -> str:
        delta = text[self.sent :]
        self.sent = max(self.sent, len(text))
        return delta
