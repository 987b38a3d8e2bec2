"""The OpenAI routes through a real gateway process to a fake InferenceService in the
test process: response shapes (checked with the `openai` client library too), n,
logprobs, stop strings, SSE streams, and errors in OpenAI's shape naming the field.
Top logprobs go through a second gateway to a real inference process on the tiny
model, checked against the model's own distribution."""

from __future__ import annotations

import json
from typing import Any, cast

import grpc
import httpx
import openai
import pytest
import pytest_asyncio
from grpc import aio
from service_args import gateway_args

from clotho.v1 import inference_service_pb2 as ipb
from clotho.v1 import inference_service_pb2_grpc as ipb_grpc
from clotho.v1 import policy_pb2
from penalty_reference import penalised_greedy_ids
from services.demo.tiny_model import ALPHABET, SPECIAL_TOKENS

EOS = SPECIAL_TOKENS.index("<eos>")
pytestmark = pytest.mark.asyncio(loop_scope="module")


def char_id(ch: str) -> int:
    return len(SPECIAL_TOKENS) + ALPHABET.index(ch)


def ids_of(text: str) -> list[int]:
    return [char_id(c) for c in text]


def text_of(ids: list[int]) -> str:
    return "".join(ALPHABET[t - len(SPECIAL_TOKENS)] for t in ids if t >= len(SPECIAL_TOKENS))


class FakeInference(ipb_grpc.InferenceServiceServicer):
    """Sample i says "ok <letter i> done" then eos. Stop strings and max_new_tokens
    end it early as the engine does (the tokens that complete a stop string are
    kept). Token j's logprob is -(j+1)/10; streams send one chunk per token."""

    def __init__(self, model_path: str) -> None:
        self.model_path = model_path
        self.requests: list[ipb.GenerateRequest] = []
        self.port = 0

    async def GetModelInfo(self, request, context):
        return ipb.GetModelInfoResponse(
            model_name="tiny",
            model_path=self.model_path,
            max_context_len=512,
            eos_token_id=EOS,
            engine="fake",
            shard_count=1,
        )

    async def Generate(self, request, context):
        self.requests.append(request)
        sp = request.sampling_params
        if sp.max_new_tokens > 1000:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens exceeds the context")
        n = sp.n if sp.HasField("n") else 1
        for i in range(n):
            ids = ids_of(f"ok {'abcdefgh'[i]} done") + [EOS]
            reason, matched = ipb.FINISH_REASON_STOP, str(EOS)
            for end in range(1, len(ids) + 1):
                hit = [s for s in sp.stop if s in text_of(ids[:end])]
                if hit:
                    ids, matched = ids[:end], hit[0]
                    break
            if sp.HasField("max_new_tokens") and len(ids) > sp.max_new_tokens:
                ids, reason, matched = ids[: sp.max_new_tokens], ipb.FINISH_REASON_LENGTH, ""
            logprobs = [-(j + 1) / 10 for j in range(len(ids))]
            if request.stream:
                for j, tok in enumerate(ids):
                    yield ipb.GenerateResponse(
                        index=i, chunk=ipb.TokenChunk(token_ids=[tok], logprobs=[logprobs[j]], version=7)
                    )
            yield ipb.GenerateResponse(
                index=i,
                completion=ipb.Completion(
                    output_ids=ids,
                    output_logprobs=logprobs,
                    finish_reason=reason,
                    matched_stop=matched,
                    version_spans=[policy_pb2.VersionSpan(start_token=0, version=7)],
                    prompt_tokens=len(request.input_ids),
                    prompt_logprobs=[0.0] + [-1.0] * (len(request.input_ids) - 1)
                    if request.return_prompt_logprobs
                    else [],
                ),
            )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fake(tokenizer_dir):
    servicer = FakeInference(tokenizer_dir)
    server = aio.server()
    ipb_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    servicer.port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer
    await server.stop(0)


@pytest.fixture(autouse=True)
def fresh_records(fake):
    fake.requests.clear()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway_url(fake, tmp_path_factory, service_process):
    workdir = tmp_path_factory.mktemp("gateway")
    args = [
        "--http-port",
        "0",
        "--grpc-port",
        "0",
        "--inference",
        f"127.0.0.1:{fake.port}",
        "--grace-seconds",
        "1",
        "--data-dir",
        str(workdir / "store"),
    ]
    async with service_process("services.gateway", args, workdir) as (_, ready):
        yield f"http://127.0.0.1:{ready['http_port']}"


async def sse_events(response: httpx.Response) -> list:
    lines = [line async for line in response.aiter_lines() if line]
    assert lines[-1] == "data: [DONE]", lines[-3:]
    assert all(line.startswith("data: ") for line in lines)
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


async def test_models_lists_the_served_model(gateway_url):
    async with httpx.AsyncClient(base_url=gateway_url, timeout=60) as http:
        models = (await http.get("/v1/models")).json()
        assert models["object"] == "list"
        (card,) = models["data"]
        assert (card["id"], card["object"], card["max_model_len"]) == ("tiny", "model", 512)
        assert (await http.get("/v1/models/tiny")).json()["id"] == "tiny"
        missing = await http.get("/v1/models/other")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


async def test_chat_completion_applies_the_template_and_returns_n_choices_with_logprobs(fake, gateway_url):
    async with httpx.AsyncClient(base_url=gateway_url, timeout=60) as http:
        r = await http.post(
            "/v1/chat/completions",
            json={
                "model": "tiny",
                "messages": [{"role": "user", "content": "hi"}],
                "n": 2,
                "max_tokens": 50,
                "temperature": 0.7,
                "top_p": 0.9,
                "seed": 3,
                "logprobs": True,
                "top_logprobs": 2,
            },
        )
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-") and out["model"] == "tiny"
    assert [c["message"] for c in out["choices"]] == [
        {"role": "assistant", "content": "ok a done"},
        {"role": "assistant", "content": "ok b done"},
    ]
    assert [c["finish_reason"] for c in out["choices"]] == ["stop", "stop"]
    assert out["choices"][0]["matched_stop"] == EOS
    content = out["choices"][1]["logprobs"]["content"]
    # Every generated token, eos included, with OpenAI's fields. (This fake sends no
    # alternatives, as an inference service from before top logprobs: top_logprobs lists
    # the sampled token alone; the real model's are checked below.)
    assert [e["token"] for e in content] == [*"ok b done", "<eos>"]
    assert content[0] == {
        "token": "o",
        "logprob": pytest.approx(-0.1),
        "bytes": [ord("o")],
        "top_logprobs": [{"token": "o", "logprob": pytest.approx(-0.1), "bytes": [ord("o")]}],
    }
    # The prompt (counted once for n) is "<|user|>hi\n<|assistant|>"; 10 tokens per choice.
    assert out["usage"] == {"prompt_tokens": 5, "completion_tokens": 20, "total_tokens": 25}

    (request,) = fake.requests
    assert list(request.input_ids) == [
        SPECIAL_TOKENS.index("<|user|>"),
        *ids_of("hi\n"),
        SPECIAL_TOKENS.index("<|assistant|>"),
    ]
    sp = request.sampling_params
    assert (sp.n, sp.max_new_tokens, sp.seed) == (2, 50, 3)
    assert sp.temperature == pytest.approx(0.7) and sp.top_p == pytest.approx(0.9)
    assert not request.stream


async def test_stop_string_is_cut_from_text_and_logprobs(fake, gateway_url):
    async with httpx.AsyncClient(base_url=gateway_url, timeout=60) as http:
        r = await http.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "stop": [" d", "zz"], "logprobs": True},
        )
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == "ok a"
    assert (choice["finish_reason"], choice["matched_stop"]) == ("stop", " d")
    assert "".join(e["token"] for e in choice["logprobs"]["content"]) == "ok a"
    assert list(fake.requests[0].sampling_params.stop) == [" d", "zz"]
    assert not fake.requests[0].sampling_params.HasField("max_new_tokens")  # chat: no default cap


async def test_chat_stream_sends_role_deltas_finish_and_usage(fake, gateway_url):
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "n": 2,
        "stream": True,
        "stop": " done",
        "logprobs": True,
        "stream_options": {"include_usage": True},
    }
    async with httpx.AsyncClient(base_url=gateway_url, timeout=60) as http:
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = await sse_events(r)
    assert fake.requests[0].stream
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert len({e["id"] for e in events}) == 1
    *chunks, last = events
    assert last["choices"] == [] and last["usage"] == {"prompt_tokens": 5, "completion_tokens": 18, "total_tokens": 23}
    for k, letter in enumerate("ab"):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == k]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        text = "".join(c["delta"].get("content", "") for c in mine)
        # The stop string never goes out, not even in part.
        assert text == f"ok {letter}"
        assert [c["finish_reason"] for c in mine[:-1]] == [None] * (len(mine) - 1)
        assert mine[-1]["finish_reason"] == "stop"
        streamed_tokens = [e["token"] for c in mine if c["logprobs"] for e in c["logprobs"]["content"]]
        assert streamed_tokens == [*f"ok {letter} done"]  # every sampled token's logprob


async def test_completions_prompt_major_choices_logprobs_and_echo(fake, gateway_url):
    async with httpx.AsyncClient(base_url=gateway_url, timeout=60) as http:
        r = await http.post("/v1/completions", json={"model": "tiny", "prompt": ["hi", "yo"], "n": 2, "logprobs": 1})
        out = r.json()
        assert r.status_code == 200, r.text
        assert out["object"] == "text_completion" and out["id"].startswith("cmpl-")
        assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
        assert [c["text"] for c in out["choices"]] == ["ok a done", "ok b done"] * 2
        lp = out["choices"][0]["logprobs"]
        assert lp["tokens"][:3] == ["o", "k", " "]
        assert lp["token_logprobs"][:2] == [pytest.approx(-0.1), pytest.approx(-0.2)]
        assert lp["top_logprobs"][1] == {"k": pytest.approx(-0.2)}
        assert lp["text_offset"][:4] == [0, 1, 2, 3]
        assert out["usage"]["prompt_tokens"] == 4 and out["usage"]["completion_tokens"] == 40
        assert sorted(list(q.input_ids) for q in fake.requests) == sorted([ids_of("hi"), ids_of("yo")])
        # OpenAI's default max_tokens for completions is 16.
        assert {q.sampling_params.max_new_tokens for q in fake.requests} == {16}

        fake.requests.clear()
        r = await http.post(
            "/v1/completions", json={"prompt": ids_of("hi"), "echo": True, "logprobs": 0, "max_tokens": 2}
        )
        (choice,) = r.json()["choices"]
        assert choice["text"] == "hiok" and choice["finish_reason"] == "length"
        lp = choice["logprobs"]
        assert lp["tokens"] == ["h", "i", "o", "k"] and lp["token_logprobs"][:2] == [None, -1.0]
        assert lp["top_logprobs"][0] is None and lp["text_offset"] == [0, 1, 2, 3]
        assert fake.requests[0].return_prompt_logprobs


async def test_completions_stream(fake, gateway_url):
    body = {"prompt": ["hi", "yo"], "stream": True, "max_tokens": 4, "logprobs": 0}
    async with httpx.AsyncClient(base_url=gateway_url, timeout=60) as http:
        async with http.stream("POST", "/v1/completions", json=body) as r:
            events = await sse_events(r)
    choices = [e["choices"][0] for e in events]
    for index in (0, 1):
        mine = [c for c in choices if c["index"] == index]
        assert "".join(c["text"] for c in mine) == "ok a"
        assert mine[-1]["finish_reason"] == "length"
        offsets = [o for c in mine if c["logprobs"] for o in c["logprobs"]["text_offset"]]
        assert offsets == [0, 1, 2, 3]


async def test_the_openai_client_library_reads_every_shape(gateway_url):
    client = openai.AsyncOpenAI(base_url=f"{gateway_url}/v1", api_key="unused", max_retries=0)
    try:
        chat = await client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hi"}],
            n=3,
            max_tokens=20,
            logprobs=True,
            top_logprobs=1,
        )
        assert [c.message.content for c in chat.choices] == ["ok a done", "ok b done", "ok c done"]
        chat_logprobs = chat.choices[2].logprobs
        assert chat_logprobs is not None and chat_logprobs.content is not None
        assert chat_logprobs.content[0].top_logprobs[0].token == "o"
        assert chat.usage is not None
        assert chat.usage.completion_tokens == 30

        completion = await client.completions.create(model="tiny", prompt="hi", max_tokens=2, logprobs=1)
        completion_logprobs = completion.choices[0].logprobs
        assert completion_logprobs is not None
        assert completion.choices[0].text == "ok" and completion_logprobs.tokens == ["o", "k"]

        stream = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], stream=True, stop="e"
        )
        parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        assert "".join(parts) == "ok a don"

        with pytest.raises(openai.BadRequestError) as err:
            await client.chat.completions.create(model="tiny", messages=[], max_tokens=1)
        assert cast(dict[str, Any], err.value.body)["param"] == "messages"
        models = await client.models.list()
        assert [m.id for m in models.data] == ["tiny"]
    finally:
        await client.close()


@pytest.mark.parametrize(
    "route, body, param, words",
    [
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
            "temperature",
            "valid number",
        ),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 0}, "n", "greater than"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": True}, "n", "integer"),
        ("/v1/chat/completions", {"model": "tiny"}, "messages", "required"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content[0].type",
            "not supported",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
            "top_logprobs",
            "requires logprobs",
        ),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": 5}, "stop", "string"),
        ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 1.0}}, "logit_bias", "not supported"),
        ("/v1/completions", {"prompt": []}, "prompt", "non-empty"),
        ("/v1/completions", {"prompt": "hi", "logprobs": 50}, "logprobs", "less than"),
        ("/v1/completions", {"prompt": "hi", "logprobs": 21}, "logprobs", "less than or equal to 20"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21},
            "top_logprobs",
            "less than or equal to 20",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": -1},
            "top_logprobs",
            "greater than or equal to 0",
        ),
    ],
)
async def test_validation_errors_are_400_in_openai_shape_naming_the_field(gateway_url, route, body, param, words):
    async with httpx.AsyncClient(base_url=gateway_url, timeout=60) as http:
        r = await http.post(route, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert param in error["message"] and words in error["message"]


async def test_upstream_and_body_errors(gateway_url):
    async with httpx.AsyncClient(base_url=gateway_url, timeout=60) as http:
        r = await http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        r = await http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 5000})
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "invalid_argument" and "exceeds the context" in r.json()["error"]["message"]
        # Streams wait for the first upstream message before their 200: a refusal keeps its status.
        r = await http.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000, "stream": True},
        )
        assert r.status_code == 400 and "exceeds the context" in r.json()["error"]["message"]
        r = await http.post(
            "/generate", json={"input_ids": [5], "stream": True, "sampling_params": {"max_new_tokens": 5000}}
        )
        assert r.status_code == 400 and r.json()["code"] == "INVALID_ARGUMENT"


async def test_generate_stream_carries_logprobs_so_far_and_batch_rids_are_prefixed(fake, gateway_url):
    """The SGLang route the "sglang" server type uses, streamed with return_logprob:
    every event holds the text, ids and logprobs so far (SGLang's default cumulative
    stream); one rid string for a batch becomes per-prompt ids."""
    body = {
        "input_ids": [ids_of("hi"), ids_of("yo")],
        "stream": True,
        "return_logprob": True,
        "rid": "job",
        "sampling_params": {"max_new_tokens": 3},
    }
    async with httpx.AsyncClient(base_url=gateway_url, timeout=60) as http:
        async with http.stream("POST", "/generate", json=body) as r:
            events = await sse_events(r)
    for index, rid in ((0, "job_0"), (1, "job_1")):
        mine = [e for e in events if e["index"] == index]
        assert {e["meta_info"]["id"] for e in mine} == {rid}
        assert [e["text"] for e in mine] == ["o", "ok", "ok ", "ok "]
        assert [len(e["meta_info"]["output_token_logprobs"]) for e in mine] == [1, 2, 3, 3]
        assert mine[2]["meta_info"]["output_token_logprobs"][2] == [pytest.approx(-0.3), char_id(" "), None]
        assert mine[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 3}
    assert sorted(list(q.input_ids) for q in fake.requests) == sorted([ids_of("hi"), ids_of("yo")])


# ---- top logprobs, through a real gateway to a real inference process ------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def real_url(tiny_model_dir, tmp_path_factory, service_process):
    args = ["--model-path", str(tiny_model_dir), "--grpc-port", "0", "--grace-seconds", "1"]
    async with service_process("services.inference", args, tmp_path_factory.mktemp("inference")) as (_, inference):
        workdir = tmp_path_factory.mktemp("real-gateway")
        args = gateway_args(workdir, f"127.0.0.1:{inference['grpc_port']}", tiny_model_dir)
        async with service_process("services.gateway", args, workdir) as (_, ready):
            yield f"http://127.0.0.1:{ready['http_port']}"


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    # The tiny tokenizer's token strings are unique: each names its id.
    ids = {tokenizer.decode([t], skip_special_tokens=False): t for t in range(len(tokenizer))}
    assert len(ids) == len(tokenizer)
    return model, tokenizer, ids


def model_top(model, tokens: list[int], k: int) -> list[dict[int, float]]:
    """The model's k most likely next tokens after each prefix tokens[:p+1]: torch.topk
    of log_softmax of its logits, {token id: logprob}."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].float()
    values, ids = torch.log_softmax(logits, dim=-1).topk(k, dim=-1)
    return [dict(zip(i.tolist(), v.tolist())) for i, v in zip(ids, values)]


def model_logprobs(model, prompt: list[int], output: list[int]) -> list[float]:
    """The model's log-probability of each output token after the prompt."""
    import torch

    tokens = prompt + output
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].float()
    logp = torch.log_softmax(logits[:-1], dim=-1).gather(-1, torch.tensor(tokens[1:]).unsqueeze(-1)).squeeze(-1)
    return logp[len(prompt) - 1 :].tolist()


def chat_prompt(tokenizer, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def check_chat_content(content: list[dict], prompt: list[int], k: int, hf) -> None:
    """Each token's top_logprobs: the model's k most likely, most likely first, with
    OpenAI's fields; the sampled token's logprob: the model's (and its entry's)."""
    model, _, ids_of_str = hf
    ids = [ids_of_str[e["token"]] for e in content]
    tops = model_top(model, prompt + ids, k)[len(prompt) - 1 : -1]
    for entry, lp, top in zip(content, model_logprobs(model, prompt, ids), tops):
        assert entry["logprob"] == pytest.approx(lp, abs=1e-4)
        alts = entry["top_logprobs"]
        assert len(alts) == k
        assert {ids_of_str[a["token"]]: a["logprob"] for a in alts} == {
            t: pytest.approx(v, abs=1e-4) for t, v in top.items()
        }
        assert all(a["bytes"] == list(a["token"].encode()) for a in alts)
        values = [a["logprob"] for a in alts]
        assert values == sorted(values, reverse=True)
        mine = [a["logprob"] for a in alts if a["token"] == entry["token"]]
        if mine:
            assert mine[0] == pytest.approx(entry["logprob"], abs=1e-6)


def check_legacy_tops(tokens: list[str], token_lps: list, top_lps: list, tokens_before: list[int], k: int, hf):
    """A legacy completion's top_logprobs (from the position after tokens_before): the
    model's k most likely plus the sampled token, its logprob the model's."""
    model, _, ids_of_str = hf
    ids = [ids_of_str[t] for t in tokens]
    tops = model_top(model, tokens_before + ids, k)[len(tokens_before) - 1 : -1]
    lps = model_logprobs(model, tokens_before, ids)
    for tok, tid, lp, served, top, ref in zip(tokens, ids, token_lps, top_lps, tops, lps):
        assert lp == pytest.approx(ref, abs=1e-4)
        expected = {**top, tid: ref}
        assert {ids_of_str[t]: v for t, v in served.items()} == {
            t: pytest.approx(v, abs=1e-4) for t, v in expected.items()
        }
        assert len(served) == (k if tid in top else k + 1)
        assert served[tok] == pytest.approx(lp, abs=1e-6)


async def test_chat_top_logprobs_are_the_models_for_every_choice(real_url, hf_model):
    _, tokenizer, _ = hf_model
    messages = [{"role": "user", "content": "spell cat"}]
    body = {
        "messages": messages,
        "n": 2,
        "max_tokens": 6,
        "temperature": 1.0,
        "seed": 11,
        "ignore_eos": True,
        "logprobs": True,
        "top_logprobs": 5,
    }
    async with httpx.AsyncClient(base_url=real_url, timeout=60) as http:
        r = await http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert len(choices) == 2
    prompt = chat_prompt(tokenizer, messages)
    for choice in choices:
        content = choice["logprobs"]["content"]
        assert len(content) == 6
        check_chat_content(content, prompt, 5, hf_model)

    # top_logprobs 20, the most; and top_logprobs 0 / unset: empty lists.
    async with httpx.AsyncClient(base_url=real_url, timeout=60) as http:
        r = await http.post("/v1/chat/completions", json={**body, "n": 1, "top_logprobs": 20})
        check_chat_content(r.json()["choices"][0]["logprobs"]["content"], prompt, 20, hf_model)
        for extra in ({"top_logprobs": 0}, {"top_logprobs": None}):
            r = await http.post("/v1/chat/completions", json={**body, **extra})
            assert all(e["top_logprobs"] == [] for c in r.json()["choices"] for e in c["logprobs"]["content"])


async def test_chat_top_logprobs_stream(real_url, hf_model):
    _, tokenizer, _ = hf_model
    messages = [{"role": "user", "content": "count to 4"}]
    body = {
        "messages": messages,
        "n": 2,
        "max_tokens": 5,
        "temperature": 1.0,
        "seed": 2,
        "ignore_eos": True,
        "logprobs": True,
        "top_logprobs": 3,
        "stream": True,
    }
    async with httpx.AsyncClient(base_url=real_url, timeout=60) as http:
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            events = await sse_events(r)
    prompt = chat_prompt(tokenizer, messages)
    for k in range(2):
        mine = [e["choices"][0] for e in events if e["choices"] and e["choices"][0]["index"] == k]
        content = [entry for c in mine if c["logprobs"] for entry in c["logprobs"]["content"]]
        assert len(content) == 5
        check_chat_content(content, prompt, 3, hf_model)


async def test_completions_top_logprobs_with_echo_n_and_batches(real_url, hf_model):
    _, tokenizer, _ = hf_model
    body = {
        "prompt": ["say hi", "add 1"],
        "n": 2,
        "max_tokens": 5,
        "temperature": 1.0,
        "seed": 5,
        "ignore_eos": True,
        "logprobs": 4,
        "echo": True,
    }
    async with httpx.AsyncClient(base_url=real_url, timeout=60) as http:
        r = await http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    for choice, text in zip(choices, ["say hi", "say hi", "add 1", "add 1"]):
        lp = choice["logprobs"]
        prompt = tokenizer.encode(text)
        n_prompt = len(prompt)
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n_prompt + 5
        # The echoed prompt: None for the first token, then the model's alternatives.
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        check_legacy_tops(
            lp["tokens"][1:n_prompt],
            lp["token_logprobs"][1:n_prompt],
            lp["top_logprobs"][1:n_prompt],
            prompt[:1],
            4,
            hf_model,
        )
        check_legacy_tops(
            lp["tokens"][n_prompt:], lp["token_logprobs"][n_prompt:], lp["top_logprobs"][n_prompt:], prompt, 4, hf_model
        )


async def test_completions_top_logprobs_stream(real_url, hf_model):
    _, tokenizer, _ = hf_model
    body = {
        "prompt": ["hi", "yo"],
        "max_tokens": 4,
        "temperature": 1.0,
        "seed": 8,
        "ignore_eos": True,
        "logprobs": 2,
        "stream": True,
    }
    async with httpx.AsyncClient(base_url=real_url, timeout=60) as http:
        async with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            events = await sse_events(r)
    choices = [e["choices"][0] for e in events if e["choices"]]
    for index, text in enumerate(["hi", "yo"]):
        mine = [c["logprobs"] for c in choices if c["index"] == index and c["logprobs"]]
        tokens = [t for lp in mine for t in lp["tokens"]]
        assert len(tokens) == 4
        check_legacy_tops(
            tokens,
            [v for lp in mine for v in lp["token_logprobs"]],
            [d for lp in mine for d in lp["top_logprobs"]],
            tokenizer.encode(text),
            2,
            hf_model,
        )


async def test_openai_client_reads_top_logprobs(real_url, hf_model):
    _, tokenizer, _ = hf_model
    client = openai.AsyncOpenAI(base_url=f"{real_url}/v1", api_key="unused", max_retries=0)
    try:
        chat = await client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=1,
            temperature=0.0,
            logprobs=True,
            top_logprobs=20,
        )
        chat_logprobs = chat.choices[0].logprobs
        assert chat_logprobs is not None and chat_logprobs.content is not None
        (first,) = chat_logprobs.content
        assert len(first.top_logprobs) == 20
        # Greedy: the sampled token is the most likely one.
        assert first.top_logprobs[0].token == first.token
        assert first.top_logprobs[0].logprob == pytest.approx(first.logprob, abs=1e-6)
        completion = await client.completions.create(
            model="tiny", prompt="hi", max_tokens=2, logprobs=5, temperature=0.0
        )
        completion_logprobs = completion.choices[0].logprobs
        assert completion_logprobs is not None and completion_logprobs.top_logprobs is not None
        assert [len(d) for d in completion_logprobs.top_logprobs] == [5, 5]
    finally:
        await client.close()


async def test_penalties_change_greedy_output_as_the_reference(real_url, hf_model):
    model, tokenizer, token_ids = hf_model
    prompt = tokenizer.encode("say hi")
    greedy = {"prompt": prompt, "max_tokens": 16, "temperature": 0.0, "ignore_eos": True, "logprobs": 0}
    cases = [
        ({}, {}),
        ({"presence_penalty": 2.0, "frequency_penalty": 0.5}, {"presence": 2.0, "frequency": 0.5}),
        ({"frequency_penalty": 2.0}, {"frequency": 2.0}),
        ({"repetition_penalty": 3.0}, {"repetition": 3.0}),  # the SGLang/vLLM extension
    ]
    plain = penalised_greedy_ids(model, prompt, 16)
    async with httpx.AsyncClient(base_url=real_url, timeout=60) as http:
        for body, reference in cases:
            expected = penalised_greedy_ids(model, prompt, 16, **reference)
            assert (expected != plain) == bool(body)
            r = await http.post("/v1/completions", json={**greedy, **body})
            assert r.status_code == 200, r.text
            lp = r.json()["choices"][0]["logprobs"]
            assert [token_ids[t] for t in lp["tokens"]] == expected
            # Logprobs stay the model's own, not the penalised distribution's.
            assert lp["token_logprobs"] == pytest.approx(model_logprobs(model, prompt, expected), abs=1e-4)

        # Chat takes them too.
        messages = [{"role": "user", "content": "say hi"}]
        chat_ids = chat_prompt(tokenizer, messages)
        expected = penalised_greedy_ids(model, chat_ids, 12, presence=2.0)
        r = await http.post(
            "/v1/chat/completions",
            json={
                "messages": messages,
                "max_tokens": 12,
                "temperature": 0.0,
                "ignore_eos": True,
                "presence_penalty": 2.0,
                "logprobs": True,
            },
        )
        assert r.status_code == 200, r.text
        content = r.json()["choices"][0]["logprobs"]["content"]
        assert [token_ids[c["token"]] for c in content] == expected
