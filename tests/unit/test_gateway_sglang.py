"""SGLang /generate bodies -> GenerateRequest, and Completion -> SGLang result JSON."""

from __future__ import annotations

import pytest

from clotho.v1 import inference_service_pb2 as ipb
from clotho.v1 import policy_pb2
from services.common.errors import InvalidArgument
from services.gateway.generation.sglang_api.protocol import parse_generate, result_json


def test_single_prompt_with_sampling_params():
    call = parse_generate(
        {
            "input_ids": [5, 6, 7],
            "sampling_params": {
                "max_new_tokens": 8,
                "temperature": 0.5,
                "top_p": 0.9,
                "top_k": -1,
                "n": 1,
                "stop": "\n",
                "stop_token_ids": [2],
                "ignore_eos": True,
                "seed": 11,
                "min_p": 0.1,
            },
            "return_logprob": True,
            "rid": "req-1",
        }
    )
    assert call.single and not call.batched and not call.stream
    request = call.request(0)
    assert list(request.input_ids) == [5, 6, 7]
    sp = request.sampling_params
    assert (sp.max_new_tokens, sp.top_k, sp.seed, sp.ignore_eos) == (8, 0, 11, True)
    assert sp.HasField("temperature") and not sp.HasField("top_k")  # -1 = every token
    assert list(sp.stop) == ["\n"] and list(sp.stop_token_ids) == [2]
    assert request.request_id == "req-1"
    assert not request.return_prompt_logprobs


def test_penalties_reach_the_engine():
    call = parse_generate(
        {
            "input_ids": [[1], [2]],
            "sampling_params": [
                {"frequency_penalty": 0.5, "presence_penalty": -1, "repetition_penalty": 1.2},
                {"temperature": 0},
            ],
        }
    )
    sp = call.request(0).sampling_params
    assert (sp.frequency_penalty, sp.presence_penalty) == (0.5, -1.0)
    assert sp.repetition_penalty == pytest.approx(1.2)
    plain = call.request(1).sampling_params
    assert not any(plain.HasField(k) for k in ("frequency_penalty", "presence_penalty", "repetition_penalty"))


def test_batches_and_n_make_lists():
    call = parse_generate({"input_ids": [[1, 2], [3]], "sampling_params": [{"n": 2}, {"n": 3, "sampling_seed": 4}]})
    assert call.batched and not call.single
    assert [p.n for p in call.prompts] == [2, 3]
    assert call.request(1).sampling_params.seed == 4
    assert not parse_generate({"text": "hi", "sampling_params": {"n": 2}}).single
    assert parse_generate({"text": ["a", "b"]}).batched


@pytest.mark.parametrize(
    "body, message",
    [
        ({}, "exactly one of text or input_ids"),
        ({"text": "a", "input_ids": [1]}, "exactly one of text or input_ids"),
        ({"input_ids": []}, "input_ids must be a non-empty list"),
        ({"input_ids": [1, "a"]}, "input_ids[1] must be a token id"),
        ({"input_ids": [[1], [2, -3]]}, "input_ids[1][1] must be a token id"),
        ({"text": "a", "sampling_params": {"temperature": "hot"}}, "sampling_params.temperature must be a number"),
        ({"text": "a", "sampling_params": {"top_p": 0}}, "sampling_params.top_p must be in (0.0, 1.0]"),
        ({"text": "a", "sampling_params": {"n": 0}}, "sampling_params.n must be between 1"),
        (
            {"text": "a", "sampling_params": {"frequency_penalty": 3}},
            "sampling_params.frequency_penalty must be in [-2.0, 2.0]",
        ),
        (
            {"text": "a", "sampling_params": {"presence_penalty": "x"}},
            "sampling_params.presence_penalty must be a number",
        ),
        (
            {"text": "a", "sampling_params": {"repetition_penalty": 0}},
            "sampling_params.repetition_penalty must be in (0.0, inf), got 0",
        ),
        (
            {"text": "a", "sampling_params": {"max_new_tokens": 1.5}},
            "sampling_params.max_new_tokens must be an integer",
        ),
        ({"text": "a", "sampling_params": {"stop": [1]}}, "sampling_params.stop must be a string or a list"),
        ({"text": ["a", "b"], "sampling_params": [{}]}, "sampling_params has 1 entries but there are 2 prompts"),
        ({"text": "a", "return_logprob": "yes"}, "return_logprob must be true or false"),
        ([1, 2], "the body must be a JSON object"),
    ],
)
def test_bad_bodies_name_the_field(body, message):
    with pytest.raises(InvalidArgument) as info:
        parse_generate(body)
    assert message in str(info.value)


def completion(reason, matched="", ids=(9, 10, 2), logprobs=(-0.5, -1.0, -0.25), version=3):
    return ipb.Completion(
        output_ids=list(ids),
        output_logprobs=list(logprobs),
        finish_reason=reason,
        matched_stop=matched,
        version_spans=[policy_pb2.VersionSpan(start_token=0, version=version)],
        prompt_logprobs=[0.0, -2.0, -3.0],
        prompt_tokens=3,
    )


def test_result_json_has_sglang_shape_and_logprob_triples():
    call = parse_generate({"input_ids": [5, 6, 7], "return_logprob": True, "logprob_start_len": 1, "rid": "r"})
    prompt = call.prompts[0]
    out = result_json(prompt, completion(ipb.FINISH_REASON_STOP, "2"), "ab", "r")
    assert out["text"] == "ab" and out["output_ids"] == [9, 10, 2]
    meta = out["meta_info"]
    assert meta["id"] == "r"
    assert meta["finish_reason"] == {"type": "stop", "matched": 2}
    assert (meta["prompt_tokens"], meta["completion_tokens"], meta["weight_version"]) == (3, 3, "3")
    assert meta["output_token_logprobs"] == [[-0.5, 9, None], [-1.0, 10, None], [-0.25, 2, None]]
    assert meta["input_token_logprobs"] == [[-2.0, 6, None], [-3.0, 7, None]]


def test_finish_reasons_and_stop_trimming():
    prompt = parse_generate({"input_ids": [1], "sampling_params": {"stop": ["END"]}}).prompts[0]
    stopped = result_json(prompt, completion(ipb.FINISH_REASON_STOP, "END"), "abcEND", "r")
    assert stopped["text"] == "abc"
    assert stopped["meta_info"]["finish_reason"] == {"type": "stop", "matched": "END"}
    assert "output_token_logprobs" not in stopped["meta_info"]
    length = result_json(prompt, completion(ipb.FINISH_REASON_LENGTH), "abc", "r")
    assert length["meta_info"]["finish_reason"] == {"type": "length", "length": 3}
    aborted = result_json(prompt, completion(ipb.FINISH_REASON_ABORT, "shutting down"), "", "r")
    assert aborted["meta_info"]["finish_reason"] == {"type": "abort", "message": "shutting down"}
    # Stopped by eos with no explicit match: the last token is what matched.
    eos = result_json(prompt, completion(ipb.FINISH_REASON_STOP, ""), "ab", "r")
    assert eos["meta_info"]["finish_reason"] == {"type": "stop", "matched": 2}


# ---- top logprobs (top_logprobs_num) --------------------------------------------------


def tops(*positions):
    """TopLogprobs per position from [(token_id, logprob), ...] lists ([] = empty)."""
    return [ipb.TopLogprobs(token_ids=[t for t, _ in p], logprobs=[lp for _, lp in p]) for p in positions]


def test_top_logprobs_num_is_asked_of_the_engine_with_return_logprob():
    request = parse_generate({"input_ids": [1, 2], "return_logprob": True, "top_logprobs_num": 5}).request(0)
    assert (request.top_logprobs, request.prompt_top_logprobs, request.return_prompt_logprobs) == (5, 0, False)
    # Prompt logprobs (logprob_start_len >= 0): the prompt positions' alternatives too.
    request = parse_generate(
        {"input_ids": [1, 2], "return_logprob": True, "top_logprobs_num": 3, "logprob_start_len": 0}
    ).request(0)
    assert (request.top_logprobs, request.prompt_top_logprobs, request.return_prompt_logprobs) == (3, 3, True)
    # Without return_logprob SGLang returns no logprobs at all: nothing is asked for.
    request = parse_generate({"input_ids": [1], "top_logprobs_num": 4}).request(0)
    assert (request.top_logprobs, request.prompt_top_logprobs) == (0, 0)
    for body in (
        {"input_ids": [1], "return_logprob": True},
        {"input_ids": [1], "return_logprob": True, "top_logprobs_num": None},
    ):
        assert parse_generate(body).request(0).top_logprobs == 0


def test_top_logprobs_num_per_prompt_in_a_batch():
    call = parse_generate(
        {"input_ids": [[1], [2], [3]], "return_logprob": [True, True, False], "top_logprobs_num": [2, 0, 7]}
    )
    assert [p.top_logprobs_num for p in call.prompts] == [2, 0, 7]
    assert [call.request(i).top_logprobs for i in range(3)] == [2, 0, 0]
    call = parse_generate({"input_ids": [[1], [2]], "return_logprob": True, "top_logprobs_num": 20})
    assert [call.request(i).top_logprobs for i in range(2)] == [20, 20]


@pytest.mark.parametrize(
    "body, message",
    [
        ({"input_ids": [1], "top_logprobs_num": 21}, "top_logprobs_num must be between 0 and 20, got 21"),
        ({"input_ids": [1], "top_logprobs_num": -1}, "top_logprobs_num must be between 0 and 20, got -1"),
        ({"input_ids": [1], "top_logprobs_num": True}, "top_logprobs_num must be an integer"),
        ({"input_ids": [1], "top_logprobs_num": "5"}, "top_logprobs_num must be an integer"),
        ({"input_ids": [1], "top_logprobs_num": [1]}, "top_logprobs_num must be an integer"),  # not batched
        ({"input_ids": [[1], [2]], "top_logprobs_num": [1, 50]}, "top_logprobs_num[1] must be between 0 and 20"),
        ({"input_ids": [[1], [2]], "top_logprobs_num": [1]}, "top_logprobs_num has 1 entries but there are 2"),
    ],
)
def test_bad_top_logprobs_num_names_the_field(body, message):
    with pytest.raises(InvalidArgument) as info:
        parse_generate(body)
    assert message in str(info.value)


def top_completion():
    c = completion(ipb.FINISH_REASON_LENGTH)
    c.output_top_logprobs.extend(tops([(9, -0.5), (4, -1.5)], [(11, -0.75), (10, -1.0)], [(2, -0.25), (3, -2.0)]))
    c.prompt_top_logprobs.extend(tops([], [(6, -2.0), (8, -2.5)], [(1, -0.125), (7, -3.0)]))
    return c


def test_result_json_top_logprobs_have_sglang_shape():
    body = {"input_ids": [5, 6, 7], "return_logprob": True, "top_logprobs_num": 2, "logprob_start_len": 0}
    out = result_json(parse_generate(body).prompts[0], top_completion(), "x", "r")
    meta = out["meta_info"]
    # Per generated token the k most likely [logprob, token_id, text], most likely first.
    assert meta["output_top_logprobs"] == [
        [[-0.5, 9, None], [-1.5, 4, None]],
        [[-0.75, 11, None], [-1.0, 10, None]],
        [[-0.25, 2, None], [-2.0, 3, None]],
    ]
    # Per prompt position from logprob_start_len; the first prompt token has none.
    assert meta["input_top_logprobs"] == [
        None,
        [[-2.0, 6, None], [-2.5, 8, None]],
        [[-0.125, 1, None], [-3.0, 7, None]],
    ]
    assert len(meta["input_top_logprobs"]) == len(meta["input_token_logprobs"]) == 3

    # From logprob_start_len 2; k caps what the engine sent; texts with a decoder.
    body = {**body, "logprob_start_len": 2, "top_logprobs_num": 1}
    out = result_json(parse_generate(body).prompts[0], top_completion(), "x", "r", token_text=lambda t: f"<{t}>")
    meta = out["meta_info"]
    assert meta["output_top_logprobs"] == [[[-0.5, 9, "<9>"]], [[-0.75, 11, "<11>"]], [[-0.25, 2, "<2>"]]]
    assert meta["input_top_logprobs"] == [[[-0.125, 1, "<1>"]]]


def test_result_json_top_logprobs_only_when_asked():
    plain = {"input_ids": [5, 6, 7], "return_logprob": True}
    meta = result_json(parse_generate(plain).prompts[0], top_completion(), "x", "r")["meta_info"]
    assert "output_top_logprobs" not in meta and "input_top_logprobs" not in meta
    # No prompt logprobs (logprob_start_len -1): no input_top_logprobs either.
    meta = result_json(parse_generate({**plain, "top_logprobs_num": 2}).prompts[0], top_completion(), "x", "r")
    assert "output_top_logprobs" in meta["meta_info"] and "input_top_logprobs" not in meta["meta_info"]
    # Without return_logprob, no logprobs at all (as SGLang).
    meta = result_json(parse_generate({"input_ids": [5], "top_logprobs_num": 2}).prompts[0], top_completion(), "", "r")
    assert "output_top_logprobs" not in meta["meta_info"]
    # An engine that sent no alternatives: None per position, the shape kept.
    meta = result_json(
        parse_generate({**plain, "top_logprobs_num": 2}).prompts[0], completion(ipb.FINISH_REASON_STOP), "x", "r"
    )["meta_info"]
    assert meta["output_top_logprobs"] == [None, None, None]
