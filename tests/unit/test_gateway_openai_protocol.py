"""OpenAI bodies -> SamplingParams, validation that names the field, decoding of
results (stop-string cuts, logprob shapes) and streamed text deltas that never leak
a stop string."""

from __future__ import annotations

import pytest

from clotho.v1 import inference_service_pb2 as ipb
from services.demo.tiny_model import ALPHABET, SPECIAL_TOKENS, build_tokenizer
from services.gateway.generation.openai_api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    RequestInvalid,
    validate,
)
from services.gateway.generation.openai_api.render import (
    StreamText,
    TokenStrings,
    chat_logprobs,
    completion_logprobs,
    render,
)

EOS = SPECIAL_TOKENS.index("<eos>")


def ids_of(text: str) -> list[int]:
    return [len(SPECIAL_TOKENS) + ALPHABET.index(c) for c in text]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def test_chat_body_to_sampling_params():
    body = validate(
        ChatCompletionRequest,
        {
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
            "n": 3,
            "max_tokens": 9,
            "max_completion_tokens": 7,
            "temperature": 0,
            "top_p": 1,
            "top_k": -1,
            "stop": ["x", ""],
            "seed": -1,
            "presence_penalty": 0.5,
            "ignore_eos": True,
            "stop_token_ids": [4],
            "unknown_extension": {"kept": True},
        },
    )
    sp = body.sampling_params(body.max_new_tokens)
    assert (sp.n, sp.max_new_tokens, sp.temperature, sp.top_p) == (3, 7, 0.0, 1.0)
    assert not sp.HasField("top_k")  # -1: every token
    assert sp.seed == 2**64 - 1 and list(sp.stop) == ["x"] and list(sp.stop_token_ids) == [4] and sp.ignore_eos
    assert body.template_messages() == [{"role": "user", "content": "ab"}]
    assert sp.presence_penalty == 0.5
    assert not sp.HasField("frequency_penalty") and not sp.HasField("repetition_penalty")


def test_penalties_reach_the_engine():
    body = validate(
        CompletionRequest, {"prompt": "a", "frequency_penalty": -1.5, "presence_penalty": 2, "repetition_penalty": 1.25}
    )
    sp = body.sampling_params(body.max_new_tokens)
    assert (sp.frequency_penalty, sp.presence_penalty, sp.repetition_penalty) == (-1.5, 2.0, 1.25)


def test_completion_prompt_forms():
    assert validate(CompletionRequest, {"prompt": "hi"}).prompt == ["hi"]
    assert validate(CompletionRequest, {"prompt": ["a", "b"]}).prompt == ["a", "b"]
    assert validate(CompletionRequest, {"prompt": [1, 2]}).prompt == [[1, 2]]
    assert validate(CompletionRequest, {"prompt": [[1], [2, 3]]}).prompt == [[1], [2, 3]]
    body = validate(CompletionRequest, {"prompt": "hi"})
    assert body.sampling_params(body.max_new_tokens).max_new_tokens == 16


@pytest.mark.parametrize(
    "model, body, param, words",
    [
        (CompletionRequest, {"prompt": [1, "a"]}, "prompt", "list of token ids"),
        (CompletionRequest, {"prompt": "a", "n": 2, "best_of": 3}, "best_of", "equal to n"),
        (CompletionRequest, {"prompt": "a", "suffix": "z"}, "suffix", "not supported"),
        (CompletionRequest, {"prompt": "a", "top_p": 0}, "top_p", "greater than 0"),
        (CompletionRequest, {"prompt": "a", "seed": "1"}, "seed", "integer"),
        (CompletionRequest, {"prompt": "a", "frequency_penalty": 2.5}, "frequency_penalty", "less than or equal"),
        (CompletionRequest, {"prompt": "a", "presence_penalty": -3}, "presence_penalty", "greater than or equal"),
        (CompletionRequest, {"prompt": "a", "repetition_penalty": 0}, "repetition_penalty", "greater than 0"),
        (ChatCompletionRequest, {"messages": [{"content": "x"}]}, "messages[0].role", "required"),
        (ChatCompletionRequest, {"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "valid"),
        (ChatCompletionRequest, {"messages": [{"role": "user"}], "max_tokens": 0}, "max_tokens", "greater than"),
        (
            ChatCompletionRequest,
            {"messages": [{"role": "user"}], "response_format": {"type": "json_schema"}},
            "response_format.type",
            "not supported",
        ),
        (ChatCompletionRequest, {"messages": [{"role": "user"}], "stream": "yes"}, "stream", "boolean"),
    ],
)
def test_invalid_bodies_name_the_field(model, body, param, words):
    with pytest.raises(RequestInvalid) as err:
        validate(model, body).check()
    assert err.value.param == param
    assert str(err.value).startswith(param) and words in str(err.value)
    assert "list[int]" not in str(err.value)  # union member tags are not field names


def test_render_cuts_text_and_logprob_tokens_at_a_stop_string(tokenizer):
    ids = ids_of("ab;cd")
    completion = ipb.Completion(
        output_ids=ids, output_logprobs=[-1.0] * 5, finish_reason=ipb.FINISH_REASON_STOP, matched_stop=";c"
    )
    r = render(tokenizer, completion, [";c"], True, False, True)
    assert (r.text, r.finish_reason, r.matched_stop, r.completion_tokens) == ("ab", "stop", ";c", 5)
    assert r.tokens == ["a", "b"] and r.token_ids == ids[:2]
    kept = render(tokenizer, completion, [";c"], True, True, False)  # no_stop_trim
    assert kept.text == "ab;cd"

    eos = ipb.Completion(
        output_ids=[*ids_of("ok"), EOS],
        output_logprobs=[-1.0, -2.0, -3.0],
        finish_reason=ipb.FINISH_REASON_STOP,
        matched_stop=str(EOS),
    )
    r = render(tokenizer, eos, [], True, False, True)
    assert (r.text, r.matched_stop, r.tokens) == ("ok", EOS, ["o", "k", "<eos>"])
    length = ipb.Completion(output_ids=ids_of("o"), output_logprobs=[-1.0], finish_reason=ipb.FINISH_REASON_LENGTH)
    assert render(tokenizer, length, [], True, False, False).finish_reason == "length"


def test_logprob_shapes():
    chat = chat_logprobs(["é", "b"], [-0.5, -1.0], 3)
    assert chat["refusal"] is None
    assert chat["content"][0] == {
        "token": "é",
        "logprob": -0.5,
        "bytes": [0xC3, 0xA9],
        "top_logprobs": [{"token": "é", "logprob": -0.5, "bytes": [0xC3, 0xA9]}],
    }
    assert chat_logprobs(["a"], [-1.0], None)["content"][0]["top_logprobs"] == []
    legacy = completion_logprobs(["h", "el", "lo"], ["h", "el", "lo"], [None, -1.0, -2.0], start_offset=4)
    assert legacy == {
        "tokens": ["h", "el", "lo"],
        "token_logprobs": [None, -1.0, -2.0],
        "top_logprobs": [None, {"el": -1.0}, {"lo": -2.0}],
        "text_offset": [4, 5, 7],
    }


def test_stream_text_holds_back_a_possible_stop_string():
    st = StreamText(["END", "xy"])
    assert st.update("hello E") == "hello "  # "E" could begin "END"
    assert st.update("hello EN") == ""
    assert st.update("hello ENX") == "ENX"  # it did not
    assert st.update("hello ENX x") == " "
    assert st.update("hello ENX xEND") == "x"  # never the stop string itself
    assert st.final("hello ENX x") == ""

    plain = StreamText([])
    assert plain.update("ab") == "ab"
    assert plain.update("abc\ufffd") == "c"  # half a character waits for the rest
    assert plain.update("abcé") == "é"
    assert plain.final("abcéf") == "f"


# ---- top logprobs -----------------------------------------------------------------


def tops(*positions):
    return [ipb.TopLogprobs(token_ids=[t for t, _ in p], logprobs=[lp for _, lp in p]) for p in positions]


def test_top_logprobs_k_asked_of_the_engine():
    chat = {"messages": [{"role": "user", "content": "a"}]}
    assert validate(ChatCompletionRequest, {**chat, "logprobs": True, "top_logprobs": 20}).top_logprobs_k == 20
    assert validate(ChatCompletionRequest, {**chat, "logprobs": True}).top_logprobs_k == 0
    assert validate(ChatCompletionRequest, {**chat, "logprobs": False}).top_logprobs_k == 0
    assert validate(CompletionRequest, {"prompt": "a", "logprobs": 5}).top_logprobs_k == 5
    assert validate(CompletionRequest, {"prompt": "a", "logprobs": 0}).top_logprobs_k == 0
    assert validate(CompletionRequest, {"prompt": "a"}).top_logprobs_k == 0
    # Up to 20 (OpenAI's legacy bound is 5; the engine's is 20).
    for model, body, param in (
        (CompletionRequest, {"prompt": "a", "logprobs": 21}, "logprobs"),
        (ChatCompletionRequest, {**chat, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ):
        with pytest.raises(RequestInvalid) as err:
            validate(model, body)
        assert err.value.param == param and "less than or equal to 20" in str(err.value)


def test_token_strings_decode_each_id_once(tokenizer):
    calls = []

    class Counting:
        def decode(self, ids, skip_special_tokens=False):
            calls.append(list(ids))
            return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    strings = TokenStrings(Counting())
    a, b = ids_of("ab")
    alts = strings.alternatives(tops([(a, -0.5), (EOS, -1.0)], [(EOS, -0.25), (a, -2.0), (b, -3.0)], []), 4, 2)
    assert alts == [[("a", -0.5), ("<eos>", -1.0)], [("<eos>", -0.25), ("a", -2.0)], None, None]
    assert sorted(calls) == [[EOS], [a]]  # special tokens kept, each id decoded once


def test_render_gives_each_kept_token_its_alternatives(tokenizer):
    ids = ids_of("ab;cd")
    completion = ipb.Completion(
        output_ids=ids, output_logprobs=[-1.0] * 5, finish_reason=ipb.FINISH_REASON_STOP, matched_stop=";c"
    )
    completion.output_top_logprobs.extend(tops(*[[(t, -1.0), (EOS, -2.0)] for t in ids]))
    r = render(tokenizer, completion, [";c"], True, False, True, 1)
    assert r.tokens == ["a", "b"] and r.alternatives == [[("a", -1.0)], [("b", -1.0)]]  # cut at the stop string
    assert render(tokenizer, completion, [";c"], True, False, True).alternatives == []  # not asked


def test_chat_top_logprobs_are_the_k_most_likely():
    alts = [[("b", -0.25), ("é", -0.5), ("c", -3.0)], None]
    chat = chat_logprobs(["é", "x"], [-0.5, -1.0], 2, alts)
    assert chat["content"][0] == {
        "token": "é",
        "logprob": -0.5,
        "bytes": [0xC3, 0xA9],
        "top_logprobs": [
            {"token": "b", "logprob": -0.25, "bytes": [ord("b")]},
            {"token": "é", "logprob": -0.5, "bytes": [0xC3, 0xA9]},
        ],
    }
    # A position the engine sent no alternatives for lists the sampled token alone.
    assert chat["content"][1]["top_logprobs"] == [{"token": "x", "logprob": -1.0, "bytes": [ord("x")]}]
    # top_logprobs 0 (or unset): empty lists, as OpenAI.
    assert chat_logprobs(["é"], [-0.5], 0, alts)["content"][0]["top_logprobs"] == []


def test_legacy_top_logprobs_are_the_k_most_likely_plus_the_sampled_token():
    alts = [None, [("b", -0.25), ("c", -0.5)], [("d", -0.1), ("e", -0.2)], None]
    legacy = completion_logprobs(
        ["a", "b", "x", "y"], ["a", "b", "x", "y"], [None, -0.25, -4.0, -1.0], alternatives=alts
    )
    assert legacy["top_logprobs"] == [
        None,  # the echoed first prompt token
        {"b": -0.25, "c": -0.5},  # the sampled token among the k: k entries
        {"d": -0.1, "e": -0.2, "x": -4.0},  # not among them: k + 1, the sampled one last
        {"y": -1.0},  # no alternatives sent: the sampled token alone
    ]
    assert list(legacy["top_logprobs"][2]) == ["d", "e", "x"]  # most likely first
