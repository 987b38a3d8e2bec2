"""vLLM /generate bodies (atroposlib's VLLMServer, server_type "vllm") ->
GenerateRequest, and Completions -> vllm_api_server.py's reply."""

from __future__ import annotations

import pytest

from clotho.v1 import inference_service_pb2 as ipb
from clotho.v1 import policy_pb2
from services.common.errors import InvalidArgument
from services.demo.tiny_model import ALPHABET, SPECIAL_TOKENS
from services.gateway.generation.sglang_api.protocol import parse_generate
from services.gateway.generation.vllm_api.protocol import (
    DEFAULT_MAX_TOKENS,
    is_vllm_body,
    parse_vllm,
    render,
    stream_line,
)

EOS = SPECIAL_TOKENS.index("<eos>")


def ids_of(text: str) -> list[int]:
    return [len(SPECIAL_TOKENS) + ALPHABET.index(c) for c in text]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def test_what_vllm_server_sends_maps_to_the_engine_request():
    # atroposlib's VLLMServer: {"prompt": {"prompt_token_ids": ...}, "logprobs": 0, **kwargs}
    call = parse_vllm(
        {
            "prompt": {"prompt_token_ids": [5, 6, 7]},
            "logprobs": 0,
            "n": 4,
            "max_tokens": 32,
            "temperature": 0.7,
            "top_p": 0.9,
            "top_k": 20,
            "stop": ["User:", "</answer>"],
            "stop_token_ids": [3],
            "seed": 11,
            "ignore_eos": True,
        }
    )
    request = call.request()
    assert list(request.input_ids) == [5, 6, 7] and call.text is None
    sp = request.sampling_params
    assert (sp.n, sp.max_new_tokens, sp.top_k, sp.seed, sp.ignore_eos) == (4, 32, 20, 11, True)
    assert sp.temperature == pytest.approx(0.7) and sp.top_p == pytest.approx(0.9)
    assert list(sp.stop) == ["User:", "</answer>"] and list(sp.stop_token_ids) == [3]
    assert call.logprobs == 0 and call.prompt_logprobs is None and not request.return_prompt_logprobs
    assert (request.top_logprobs, request.prompt_top_logprobs) == (0, 0)
    # logprobs k / prompt_logprobs k ask the engine for the k most likely tokens too.
    request = parse_vllm({"prompt": {"prompt_token_ids": [5]}, "logprobs": 5, "prompt_logprobs": 2}).request()
    assert (request.top_logprobs, request.prompt_top_logprobs, request.return_prompt_logprobs) == (5, 2, True)
    assert not request.stream and request.request_id


def test_vllm_defaults():
    call = parse_vllm({"prompt": "hi"})
    sp = call.sampling
    assert call.text == "hi" and call.input_ids is None
    assert sp.max_new_tokens == DEFAULT_MAX_TOKENS and sp.n == 1  # vLLM's max_tokens default
    assert not sp.HasField("temperature") and not sp.HasField("top_k") and not sp.HasField("seed")
    assert call.logprobs is None and call.skip_special_tokens and call.detokenize and not call.stream
    # max_tokens null: the engine's own limit; top_k -1 and 0: every token.
    assert not parse_vllm({"prompt": "hi", "max_tokens": None}).sampling.HasField("max_new_tokens")
    assert not parse_vllm({"prompt": "hi", "top_k": -1}).sampling.HasField("top_k")
    assert parse_vllm({"prompt": {"prompt_token_ids": [1]}, "prompt_logprobs": 1}).request().return_prompt_logprobs
    assert parse_vllm({"prompt": {"prompt": "hello"}}).text == "hello"


def test_dispatch_by_body_shape():
    assert is_vllm_body({"prompt": "hi"})
    assert is_vllm_body({"prompt": {"prompt_token_ids": [1]}, "logprobs": 0})
    # Every body SGLang's parser accepts has text or input_ids: SGLang's.
    for body in ({"text": "hi"}, {"input_ids": [1]}, {"text": "hi", "prompt": "x"}, {"input_ids": [1], "prompt": "x"}):
        parse_generate({k: v for k, v in body.items() if k != "prompt"})
        assert not is_vllm_body(body)
    assert not is_vllm_body({}) and not is_vllm_body([1]) and not is_vllm_body({"sampling_params": {}})


@pytest.mark.parametrize(
    "body, message",
    [
        ({"prompt": 5}, 'prompt must be a string or {"prompt_token_ids": [...]}'),
        ({"prompt": ""}, "prompt must not be empty"),
        ({"prompt": {"prompt_token_ids": []}}, "prompt.prompt_token_ids must be a non-empty list"),
        ({"prompt": {"prompt_token_ids": [1, "a"]}}, "prompt.prompt_token_ids[1] must be a token id"),
        ({"prompt": {"multi_modal_data": {}}}, "prompt has fields this server does not support: multi_modal_data"),
        ({"prompt": "a", "temperature": "hot"}, "temperature must be a number"),
        ({"prompt": "a", "temperature": -1}, "temperature must be in [0.0, inf]"),
        ({"prompt": "a", "top_p": 0}, "top_p must be in (0.0, 1.0]"),
        ({"prompt": "a", "top_k": -2}, "top_k must be between -1"),
        ({"prompt": "a", "n": 0}, "n must be between 1"),
        ({"prompt": "a", "max_tokens": 0}, "max_tokens must be between 1"),
        ({"prompt": "a", "max_tokens": 1.5}, "max_tokens must be an integer"),
        ({"prompt": "a", "seed": -1}, "seed must be between 0"),
        ({"prompt": "a", "stop": [1]}, "stop must be a string or a list of strings"),
        ({"prompt": "a", "stop_token_ids": [-1]}, "stop_token_ids[0] must be a token id"),
        ({"prompt": "a", "logprobs": True}, "logprobs must be an integer"),
        ({"prompt": "a", "logprobs": -1}, "logprobs must be between 0 and 20"),
        ({"prompt": "a", "prompt_logprobs": 21}, "prompt_logprobs must be between 0 and 20"),
        ({"prompt": "a", "ignore_eos": 1}, "ignore_eos must be true or false"),
        ({"prompt": "a", "stream": "yes"}, "stream must be true or false"),
        (
            {"prompt": "a", "max_new_tokens": 4},
            "unknown field(s), not vLLM SamplingParams: max_new_tokens (vLLM spells it max_tokens)",
        ),
        ({"prompt": "a", "model": "m", "foo": 1}, "unknown field(s), not vLLM SamplingParams: foo, model"),
        (
            {"prompt": "a", "min_p": 0.1, "min_tokens": 2, "logit_bias": {"5": 1.0}},
            'cannot honour (only their defaults are accepted): min_p=0.1, min_tokens=2, logit_bias={"5": 1.0}',
        ),
        ({"prompt": "a", "presence_penalty": 2.5}, "presence_penalty must be in [-2.0, 2.0], got 2.5"),
        ({"prompt": "a", "frequency_penalty": "1"}, "frequency_penalty must be a number"),
        ({"prompt": "a", "repetition_penalty": 0}, "repetition_penalty must be in (0.0, inf), got 0"),
        ({"prompt": "a", "n": 2, "best_of": 4}, "best_of=4"),
        ({"prompt": "a", "structured_outputs": {"regex": "a+"}}, "structured_outputs="),
    ],
)
def test_bad_bodies_name_the_field(body, message):
    with pytest.raises(InvalidArgument) as info:
        parse_vllm(body)
    assert message in str(info.value)


def test_harmless_and_default_valued_fields_are_accepted():
    call = parse_vllm(
        {
            "prompt": "a",
            "n": 2,
            "best_of": 2,
            "presence_penalty": 0.0,
            "frequency_penalty": 0,
            "repetition_penalty": 1.0,
            "min_p": 0,
            "min_tokens": 0,
            "logit_bias": {},
            "bad_words": [],
            "logits_processors": None,
            "spaces_between_special_tokens": False,
            "output_kind": 2,
            "skip_reading_prefix_cache": True,
            "detokenize": False,
            "skip_special_tokens": False,
            "include_stop_str_in_output": True,
        }
    )
    assert (call.detokenize, call.skip_special_tokens, call.include_stop_str_in_output) == (False, False, True)


def test_penalties_are_mapped_not_refused():
    call = parse_vllm({"prompt": "a", "presence_penalty": 0.5, "frequency_penalty": -1, "repetition_penalty": 1.3})
    sp = call.sampling
    assert (sp.presence_penalty, sp.frequency_penalty) == (0.5, -1.0)
    assert sp.repetition_penalty == pytest.approx(1.3)
    plain = parse_vllm({"prompt": "a"}).sampling
    assert not any(plain.HasField(k) for k in ("presence_penalty", "frequency_penalty", "repetition_penalty"))


def completion(ids, reason, matched="", logprobs=None, prompt_logprobs=(), tops=(), prompt_tops=()):
    return ipb.Completion(
        output_top_logprobs=[ipb.TopLogprobs(token_ids=t, logprobs=lp) for t, lp in tops],
        prompt_top_logprobs=[ipb.TopLogprobs(token_ids=t, logprobs=lp) for t, lp in prompt_tops],
        output_ids=ids,
        output_logprobs=logprobs if logprobs is not None else [-(k + 1) / 4 for k in range(len(ids))],
        finish_reason=reason,
        matched_stop=matched,
        version_spans=[policy_pb2.VersionSpan(start_token=0, version=2)],
        prompt_logprobs=list(prompt_logprobs),
        prompt_tokens=3,
    )


def encoded(call, ids):
    """The call with its text prompt tokenized, as the route does."""
    call.input_ids = ids
    return call


def test_reply_has_vllm_api_server_shape(tokenizer):
    call = parse_vllm({"prompt": {"prompt_token_ids": ids_of("hey")}, "n": 2, "logprobs": 0})
    done = [
        completion(ids_of("ok") + [EOS], ipb.FINISH_REASON_STOP, str(EOS)),
        completion(ids_of("abc"), ipb.FINISH_REASON_LENGTH),
    ]
    out = render(tokenizer, call, done)
    a, b, c, o, k = ids_of("abcok")
    assert out == {
        "text": ["ok", "abc"],
        "prompt": "hey",
        "finish_reasons": ["stop", "length"],
        "logprobs": [
            [[{str(o): -0.25}], [{str(k): -0.5}], [{str(EOS): -0.75}]],
            [[{str(a): -0.25}], [{str(b): -0.5}], [{str(c): -0.75}]],
        ],
        "prompt_token_ids": ids_of("hey"),
        "token_ids": [[o, k, EOS], [a, b, c]],
    }
    # Without logprobs: text, prompt and finish_reasons only; a text prompt is echoed.
    out = render(tokenizer, encoded(parse_vllm({"prompt": "hey"}), ids_of("hey")), done[:1])
    assert out == {"text": ["ok"], "prompt": "hey", "finish_reasons": ["stop"]}


def test_stop_text_rules_follow_vllm(tokenizer):
    ids = ids_of("abendcd")
    stop = parse_vllm({"prompt": {"prompt_token_ids": [5]}, "stop": ["end"]})
    assert render(tokenizer, stop, [completion(ids, ipb.FINISH_REASON_STOP, "end")])["text"] == ["ab"]
    keep = parse_vllm({"prompt": {"prompt_token_ids": [5]}, "stop": "end", "include_stop_str_in_output": True})
    assert render(tokenizer, keep, [completion(ids, ipb.FINISH_REASON_STOP, "end")])["text"] == ["abend"]
    # A stop token id (not special): its text is left out unless include_stop_str_in_output.
    x = ids_of("x")[0]
    by_id = parse_vllm({"prompt": {"prompt_token_ids": [5]}, "stop_token_ids": [x]})
    assert render(tokenizer, by_id, [completion(ids_of("abx"), ipb.FINISH_REASON_STOP, str(x))])["text"] == ["ab"]
    keep_id = parse_vllm(
        {"prompt": {"prompt_token_ids": [5]}, "stop_token_ids": [x], "include_stop_str_in_output": True}
    )
    assert render(tokenizer, keep_id, [completion(ids_of("abx"), ipb.FINISH_REASON_STOP, str(x))])["text"] == ["abx"]
    # skip_special_tokens false keeps special tokens other than the stop token.
    raw = parse_vllm({"prompt": {"prompt_token_ids": [5]}, "skip_special_tokens": False})
    bos = SPECIAL_TOKENS.index("<bos>")
    assert render(tokenizer, raw, [completion([bos] + ids_of("a") + [EOS], ipb.FINISH_REASON_STOP, str(EOS))])[
        "text"
    ] == ["<bos>a"]
    # detokenize false: no text; no tokenizer: no text either (ids prompts still work).
    quiet = parse_vllm({"prompt": {"prompt_token_ids": [5]}, "detokenize": False})
    assert render(tokenizer, quiet, [completion(ids, ipb.FINISH_REASON_LENGTH)])["text"] == [""]
    assert render(None, stop, [completion(ids, ipb.FINISH_REASON_LENGTH)])["text"] == [""]
    assert render(None, stop, [completion(ids, ipb.FINISH_REASON_ABORT)])["finish_reasons"] == ["abort"]


def test_logprobs_k_are_the_token_then_the_top_k(tokenizer):
    a, b, c = ids_of("abc")
    call = parse_vllm({"prompt": {"prompt_token_ids": [5]}, "logprobs": 2})
    # Sampled b (not among the top 2) then c (the most likely): 3 entries, then 2.
    done = completion(
        [b, c], ipb.FINISH_REASON_LENGTH, logprobs=[-2.0, -0.5], tops=[([a, c], [-0.25, -0.75]), ([c, a], [-0.5, -1.5])]
    )
    (positions,) = render(tokenizer, call, [done])["logprobs"]
    assert positions == [[{str(b): -2.0, str(a): -0.25, str(c): -0.75}], [{str(c): -0.5, str(a): -1.5}]]
    assert [list(p[0]) for p in positions] == [[str(b), str(a), str(c)], [str(c), str(a)]]  # token first


def test_prompt_logprobs_as_vllm_none_first(tokenizer):
    prompt = ids_of("hey")
    call = parse_vllm({"prompt": {"prompt_token_ids": prompt}, "prompt_logprobs": 0, "max_tokens": 1})
    out = render(
        tokenizer, call, [completion(ids_of("a"), ipb.FINISH_REASON_LENGTH, prompt_logprobs=[0.0, -2.0, -3.0])]
    )
    assert out["prompt_logprobs"] == [None, {str(prompt[1]): -2.0}, {str(prompt[2]): -3.0}]
    assert "logprobs" not in out
    # prompt_logprobs 1: the prompt token, then the most likely one.
    z = ids_of("z")[0]
    call = parse_vllm({"prompt": {"prompt_token_ids": prompt}, "prompt_logprobs": 1, "max_tokens": 1})
    done = completion(
        ids_of("a"),
        ipb.FINISH_REASON_LENGTH,
        prompt_logprobs=[0.0, -2.0, -3.0],
        prompt_tops=[([], []), ([z], [-0.125]), ([prompt[2]], [-3.0])],
    )
    assert render(tokenizer, call, [done])["prompt_logprobs"] == [
        None,
        {str(prompt[1]): -2.0, str(z): -0.125},
        {str(prompt[2]): -3.0},
    ]


def test_stream_line_is_prompt_plus_text(tokenizer):
    call = encoded(parse_vllm({"prompt": "hi ", "stream": True, "n": 2}), ids_of("hi "))
    line = stream_line(
        tokenizer,
        call,
        [completion(ids_of("a"), ipb.FINISH_REASON_LENGTH), completion(ids_of("b"), ipb.FINISH_REASON_LENGTH)],
    )
    assert line == b'{"text": ["hi a", "hi b"]}\n'
