"""/generate through a real gateway process to a fake InferenceService in the test
process: SGLang response shapes, n>1 and batches, logprob triples, errors mapped to
HTTP, and the W3C traceparent carried into the gRPC metadata."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import httpx
import pytest
import pytest_asyncio
from grpc import aio

from clotho.v1 import inference_service_pb2 as ipb
from clotho.v1 import inference_service_pb2_grpc as ipb_grpc
from clotho.v1 import policy_pb2
from penalty_reference import penalised_greedy_ids
from services.demo.tiny_model import ALPHABET, SPECIAL_TOKENS

REPO = Path(__file__).resolve().parents[2]
EOS = SPECIAL_TOKENS.index("<eos>")
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"

# One fake and one gateway for the module: the gateway loads the tokenizer once.
pytestmark = pytest.mark.asyncio(loop_scope="module")


def char_id(ch: str) -> int:
    return len(SPECIAL_TOKENS) + ALPHABET.index(ch)


class FakeInference(ipb_grpc.InferenceServiceServicer):
    """Sample i of a prompt is: the prompt's first token, the letter 'a'+i, then eos
    (or the first max_new_tokens of that). Logprobs are -0.5, -1.5, -2.5."""

    def __init__(self, model_path: str) -> None:
        self.model_path = model_path
        self.requests: list[ipb.GenerateRequest] = []
        self.metadata: list[dict[str, str]] = []
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
        self.metadata.append({k: v for k, v in context.invocation_metadata()})
        sp = request.sampling_params
        if sp.max_new_tokens > 1000:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens exceeds the context")
        n = sp.n if sp.HasField("n") else 1
        for i in range(n):
            ids = [request.input_ids[0], char_id("abcdefgh"[i]), EOS]
            limit = sp.max_new_tokens if sp.HasField("max_new_tokens") else len(ids)
            ids = ids[:limit]
            logprobs = [-0.5 - k for k in range(len(ids))]
            if request.stream:
                yield ipb.GenerateResponse(
                    index=i, chunk=ipb.TokenChunk(token_ids=ids[:1], logprobs=logprobs[:1], version=5)
                )
            finished = ipb.FINISH_REASON_STOP if ids[-1] == EOS else ipb.FINISH_REASON_LENGTH
            yield ipb.GenerateResponse(
                index=i,
                completion=ipb.Completion(
                    output_ids=ids,
                    output_logprobs=logprobs,
                    finish_reason=finished,
                    matched_stop=str(EOS) if finished == ipb.FINISH_REASON_STOP else "",
                    version_spans=[policy_pb2.VersionSpan(start_token=0, version=5)],
                    prompt_tokens=len(request.input_ids),
                ),
            )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fake(tokenizer_dir):
    servicer = FakeInference(tokenizer_dir)
    server = aio.server()
    ipb_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    servicer.port = port
    yield servicer
    await server.stop(0)


@pytest.fixture(autouse=True)
def fresh_records(fake):
    fake.requests.clear()
    fake.metadata.clear()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway_url(fake, tmp_path_factory, service_process):
    args = ["--http-port", "0", "--grpc-port", "0", "--inference", f"127.0.0.1:{fake.port}", "--grace-seconds", "1"]
    async with service_process("services.gateway", args, tmp_path_factory.mktemp("gateway")) as (_, ready):
        yield f"http://127.0.0.1:{ready['http_port']}"


async def test_generate_text_single_prompt(fake, gateway_url):
    async with httpx.AsyncClient(base_url=gateway_url, timeout=60) as http:
        r = await http.post(
            "/generate",
            json={"text": "hi", "sampling_params": {"max_new_tokens": 8, "temperature": 0.0}, "return_logprob": True},
            headers={"traceparent": TRACEPARENT},
        )
    assert r.status_code == 200, r.text
    out = r.json()
    h = char_id("h")
    assert out["output_ids"] == [h, char_id("a"), EOS]
    assert out["text"] == "ha"  # eos is a special token: not in the text
    meta = out["meta_info"]
    assert meta["finish_reason"] == {"type": "stop", "matched": EOS}
    assert (meta["prompt_tokens"], meta["completion_tokens"], meta["weight_version"]) == (2, 3, "5")
    assert meta["output_token_logprobs"] == [[-0.5, h, None], [-1.5, char_id("a"), None], [-2.5, EOS, None]]
    assert isinstance(meta["id"], str) and meta["id"]

    (request,) = fake.requests
    assert list(request.input_ids) == [h, char_id("i")]
    assert request.sampling_params.max_new_tokens == 8
    assert request.sampling_params.HasField("temperature") and request.sampling_params.temperature == 0.0
    # The HTTP request's trace continues into the gRPC call.
    traceparent = fake.metadata[0].get("traceparent", "")
    assert traceparent.split("-")[1] == TRACE_ID, fake.metadata[0]


async def test_generate_n_and_batches_are_prompt_major_lists(fake, gateway_url):
    async with httpx.AsyncClient(base_url=gateway_url, timeout=60) as http:
        r = await http.post(
            "/generate", json={"input_ids": [30, 31], "sampling_params": {"n": 2}, "return_logprob": True}
        )
        samples = r.json()
        assert isinstance(samples, list) and len(samples) == 2
        assert [s["output_ids"] for s in samples] == [[30, char_id("a"), EOS], [30, char_id("b"), EOS]]
        assert len({s["meta_info"]["id"] for s in samples}) == 2
        assert all(len(s["meta_info"]["output_token_logprobs"]) == 3 for s in samples)

        r = await http.post(
            "/generate",
            json={"input_ids": [[20, 21], [25]], "sampling_params": {"n": 2, "max_new_tokens": 2}, "rid": ["x", "y"]},
        )
        results = r.json()
        assert [res["output_ids"] for res in results] == [
            [20, char_id("a")],
            [20, char_id("b")],
            [25, char_id("a")],
            [25, char_id("b")],
        ]
        assert [res["meta_info"]["finish_reason"] for res in results] == [{"type": "length", "length": 2}] * 4
        assert [res["meta_info"]["id"] for res in results] == ["x-0", "x-1", "y-0", "y-1"]
        assert "output_token_logprobs" not in results[0]["meta_info"]
        # Batched input in one list: one request per prompt.
        assert [list(req.input_ids) for req in fake.requests[1:]] == [[20, 21], [25]]


async def test_generate_streams_sglang_events(fake, gateway_url):
    async with httpx.AsyncClient(base_url=gateway_url, timeout=60) as http:
        async with http.stream("POST", "/generate", json={"input_ids": [30], "stream": True}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            lines = [line async for line in r.aiter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert events[0]["output_ids"] == [30] and events[0]["meta_info"]["finish_reason"] is None
    assert events[-1]["output_ids"] == [30, char_id("a"), EOS]
    assert events[-1]["meta_info"]["finish_reason"] == {"type": "stop", "matched": EOS}
    assert fake.requests[0].stream


async def test_generate_errors_are_mapped_to_http(fake, gateway_url):
    async with httpx.AsyncClient(base_url=gateway_url, timeout=60) as http:
        r = await http.post("/generate", json={"input_ids": [1], "sampling_params": {"max_new_tokens": 5000}})
        assert r.status_code == 400
        assert r.json()["code"] == "INVALID_ARGUMENT" and "exceeds the context" in r.json()["error"]
        r = await http.post("/generate", json={"input_ids": [1], "sampling_params": {"temperature": "hot"}})
        assert r.status_code == 400 and "sampling_params.temperature" in r.json()["error"]
        assert (await http.get("/health")).status_code == 200
        info = (await http.get("/get_model_info")).json()
        assert info["model_path"] == fake.model_path and info["is_generation"] is True


# ---- vLLM's /generate dialect, through a real gateway to a real inference process -----
#
# atroposlib's VLLMServer (server_type "vllm") posts vLLM's body to the same path:
# `prompt` (text or {"prompt_token_ids": [...]}) and SamplingParams fields at the top
# level. These run on the tiny model, so logprobs are checked against the model's own.

VLLM_TOKEN = "vllm-inference-secret"
AUTH = {"Authorization": f"Bearer {VLLM_TOKEN}"}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def real_inference(tiny_model_dir, tmp_path_factory, service_process):
    args = ["--model-path", str(tiny_model_dir), "--grpc-port", "0", "--grace-seconds", "1"]
    async with service_process("services.inference", args, tmp_path_factory.mktemp("inference")) as (_, ready):
        yield f"127.0.0.1:{ready['grpc_port']}"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def vllm_url(real_inference, tiny_model_dir, tmp_path_factory, service_process):
    home = tmp_path_factory.mktemp("vllm-gateway")
    args = [
        "--tokenizer-path",
        str(tiny_model_dir),
        "--http-port",
        "0",
        "--grpc-port",
        "0",
        "--inference",
        real_inference,
        "--grace-seconds",
        "1",
        "--inference-token",
        VLLM_TOKEN,
        "--data-dir",
        str(home / "store"),
    ]
    async with service_process("services.gateway", args, home) as (_, ready):
        yield f"http://127.0.0.1:{ready['http_port']}"


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(tiny_model_dir))


def model_logprobs(model, prompt: list[int], output: list[int]) -> list[float]:
    """The model's own log-probability of each output token after the prompt."""
    import torch

    tokens = prompt + output
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].float()
    logp = torch.log_softmax(logits[:-1], dim=-1).gather(-1, torch.tensor(tokens[1:]).unsqueeze(-1)).squeeze(-1)
    return logp[len(prompt) - 1 :].tolist()


def model_top(model, tokens: list[int], k: int) -> list[dict[str, float]]:
    """The model's k most likely next tokens after each prefix tokens[:p+1], as
    {"<token id>": logprob}."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].float()
    values, ids = torch.log_softmax(logits, dim=-1).topk(k, dim=-1)
    return [
        {str(t): v for t, v in zip(row_ids.tolist(), row_values.tolist())} for row_ids, row_values in zip(ids, values)
    ]


def assert_vllm_position(entry: dict, token: int, logprob: float, top: dict[str, float]) -> None:
    """vLLM's dict for one position: the actual token first, then the top k."""
    assert next(iter(entry)) == str(token)
    assert entry[str(token)] == pytest.approx(logprob, abs=1e-4)
    assert set(entry) == {str(token)} | set(top)
    for tid, lp in top.items():
        assert entry[tid] == pytest.approx(lp, abs=1e-4)


async def vllm_generate(url: str, body: dict, status: int = 200) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=60, headers=AUTH) as http:
        r = await http.post("/generate", json=body)
    assert r.status_code == status, r.text
    return r.json()


async def test_vllm_token_prompt_n2_logprobs_are_the_models(vllm_url, hf_model):
    model, tokenizer = hf_model
    prompt = tokenizer.encode("add 2 and 3")
    out = await vllm_generate(
        vllm_url,
        {
            "prompt": {"prompt_token_ids": prompt},
            "logprobs": 0,
            "n": 2,
            "max_tokens": 8,
            "temperature": 1.0,
            "top_p": 1.0,
            "seed": 3,
        },
    )
    assert set(out) == {"text", "prompt", "finish_reasons", "logprobs", "prompt_token_ids", "token_ids"}
    assert out["prompt_token_ids"] == prompt and out["prompt"] == tokenizer.decode(prompt)
    assert len(out["text"]) == len(out["finish_reasons"]) == len(out["logprobs"]) == len(out["token_ids"]) == 2
    for text, reason, logprobs, ids in zip(out["text"], out["finish_reasons"], out["logprobs"], out["token_ids"]):
        assert 1 <= len(ids) <= 8 and reason in ("stop", "length")
        assert (reason == "length") == (len(ids) == 8 and ids[-1] != EOS)
        # vLLM's shape: per token a list holding one dict {"<token id>": logprob}.
        assert all(isinstance(pos, list) and len(pos) == 1 and len(pos[0]) == 1 for pos in logprobs)
        assert [int(next(iter(pos[0]))) for pos in logprobs] == ids
        served = [next(iter(pos[0].values())) for pos in logprobs]
        assert served == pytest.approx(model_logprobs(model, prompt, ids), abs=1e-4)
        # The eos that ended a sample is not in the text, as vLLM does it.
        assert text == tokenizer.decode(ids[:-1] if reason == "stop" else ids, skip_special_tokens=True)


async def test_vllm_text_prompt_and_vllm_defaults(vllm_url, hf_model):
    model, tokenizer = hf_model
    out = await vllm_generate(vllm_url, {"prompt": "say hi", "temperature": 0.0})
    # Without logprobs: text, prompt and finish_reasons only.
    assert set(out) == {"text", "prompt", "finish_reasons"}
    assert out["prompt"] == "say hi" and len(out["text"]) == 1
    # vLLM's default max_tokens (16); the text prompt is tokenized as vLLM does.
    out = await vllm_generate(vllm_url, {"prompt": "say hi", "ignore_eos": True, "logprobs": 3, "seed": 1})
    assert out["prompt_token_ids"] == tokenizer.encode("say hi")
    assert len(out["token_ids"][0]) == 16 and out["finish_reasons"] == ["length"]
    # logprobs=3: the sampled token, then the model's 3 most likely (3 or 4 entries).
    prompt, ids = out["prompt_token_ids"], out["token_ids"][0]
    tops = model_top(model, prompt + ids, 3)[len(prompt) - 1 : -1]
    for entry, tok, lp, top in zip(out["logprobs"][0], ids, model_logprobs(model, prompt, ids), tops):
        assert len(entry) == 1
        assert_vllm_position(entry[0], tok, lp, top)
    # A {"prompt": "..."} dict is a text prompt too.
    out = await vllm_generate(vllm_url, {"prompt": {"prompt": "say hi"}, "max_tokens": 2, "logprobs": 0})
    assert out["prompt_token_ids"] == tokenizer.encode("say hi") and out["prompt"] == "say hi"


async def test_vllm_finish_reasons_length_and_stop(vllm_url, hf_model):
    _, tokenizer = hf_model
    prompt = {"prompt_token_ids": tokenizer.encode("count to 4")}
    greedy = {"prompt": prompt, "temperature": 0.0, "ignore_eos": True, "logprobs": 0}
    out = await vllm_generate(vllm_url, {**greedy, "max_tokens": 6})
    ids = out["token_ids"][0]
    assert len(ids) == 6 and out["finish_reasons"] == ["length"]
    assert out["text"] == [tokenizer.decode(ids, skip_special_tokens=True)]

    # A stop token id: the sample ends on it (kept in the ids), its text left out.
    stop_id = ids[2]
    k = ids.index(stop_id)
    out = await vllm_generate(vllm_url, {**greedy, "max_tokens": 6, "stop_token_ids": [stop_id]})
    assert out["finish_reasons"] == ["stop"] and out["token_ids"] == [ids[: k + 1]]
    assert out["text"] == [tokenizer.decode(ids[:k], skip_special_tokens=True)]

    # A stop string: cut off, or kept with include_stop_str_in_output.
    full = tokenizer.decode(ids, skip_special_tokens=True)
    assert full, ids
    stop = full[min(2, len(full) - 1)]
    cut = full.index(stop)
    out = await vllm_generate(vllm_url, {**greedy, "max_tokens": 6, "stop": [stop]})
    assert out["finish_reasons"] == ["stop"] and out["text"] == [full[:cut]]
    out = await vllm_generate(vllm_url, {**greedy, "max_tokens": 6, "stop": stop, "include_stop_str_in_output": True})
    assert out["finish_reasons"] == ["stop"] and out["text"] == [full[: cut + 1]]


async def test_vllm_seed_is_deterministic(vllm_url, hf_model):
    _, tokenizer = hf_model
    body = {
        "prompt": {"prompt_token_ids": tokenizer.encode("spell cat")},
        "n": 2,
        "max_tokens": 10,
        "temperature": 1.0,
        "ignore_eos": True,
        "logprobs": 0,
    }
    first = await vllm_generate(vllm_url, {**body, "seed": 42})
    again = await vllm_generate(vllm_url, {**body, "seed": 42})
    assert first["token_ids"] == again["token_ids"] and first["logprobs"] == again["logprobs"]
    others = [(await vllm_generate(vllm_url, {**body, "seed": s}))["token_ids"] for s in (1, 2, 3)]
    assert any(o != first["token_ids"] for o in others)


async def test_vllm_and_sglang_bodies_share_the_path(vllm_url, hf_model):
    """The same seeded request in both dialects: the same tokens; SGLang's answer keeps
    its own shape."""
    _, tokenizer = hf_model
    prompt = tokenizer.encode("repeat ab")
    out = await vllm_generate(
        vllm_url, {"prompt": {"prompt_token_ids": prompt}, "max_tokens": 6, "seed": 9, "logprobs": 0}
    )
    sglang = await vllm_generate(
        vllm_url, {"input_ids": prompt, "return_logprob": True, "sampling_params": {"max_new_tokens": 6, "seed": 9}}
    )
    assert set(sglang) == {"text", "output_ids", "meta_info"}
    assert sglang["output_ids"] == out["token_ids"][0]
    assert [lp for lp, _, _ in sglang["meta_info"]["output_token_logprobs"]] == [
        next(iter(pos[0].values())) for pos in out["logprobs"][0]
    ]


async def test_vllm_stream_is_one_line_of_prompt_plus_text(vllm_url, hf_model):
    _, tokenizer = hf_model
    body = {"prompt": "say hi", "max_tokens": 5, "seed": 4, "n": 2}
    out = await vllm_generate(vllm_url, body)
    async with httpx.AsyncClient(base_url=vllm_url, timeout=60, headers=AUTH) as http:
        async with http.stream("POST", "/generate", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            lines = [line async for line in r.aiter_lines() if line]
    assert [json.loads(line) for line in lines] == [{"text": ["say hi" + t for t in out["text"]]}]


@pytest.mark.parametrize(
    "body, names",
    [
        ({"prompt": "hi", "temperature": "hot"}, ["temperature"]),
        ({"prompt": "hi", "min_tokens": 3, "min_p": 0.1}, ["min_tokens=3", "min_p=0.1"]),
        ({"prompt": "hi", "presence_penalty": 2.5}, ["presence_penalty"]),
        ({"prompt": "hi", "repetition_penalty": 0}, ["repetition_penalty"]),
        ({"prompt": "hi", "frobnicate": 1}, ["frobnicate"]),
        ({"prompt": "hi", "max_new_tokens": 4}, ["max_new_tokens", "max_tokens"]),
        ({"prompt": [1, 2]}, ["prompt", "prompt_token_ids"]),
        ({"prompt": {"prompt_token_ids": [1, -2]}}, ["prompt.prompt_token_ids[1]"]),
        ({"prompt": "hi", "n": 0}, ["n"]),
        ({"prompt": "hi", "best_of": 3}, ["best_of=3"]),
    ],
)
async def test_vllm_bad_fields_are_400_naming_them(vllm_url, body, names):
    out = await vllm_generate(vllm_url, body, status=400)
    assert out["code"] == "INVALID_ARGUMENT"
    assert all(name in out["error"] for name in names), out


async def test_vllm_harmless_fields_are_accepted(vllm_url):
    out = await vllm_generate(
        vllm_url,
        {
            "prompt": "hi",
            "max_tokens": 2,
            "detokenize": False,
            "skip_special_tokens": False,
            "spaces_between_special_tokens": False,
            "presence_penalty": 0,
            "min_p": 0.0,
            "best_of": 1,
            "logit_bias": None,
            "output_kind": 2,
        },
    )
    assert out["text"] == [""]  # detokenize false: no text, as vLLM


async def test_vllm_dialect_needs_the_inference_token(vllm_url):
    async with httpx.AsyncClient(base_url=vllm_url, timeout=60) as http:
        r = await http.post("/generate", json={"prompt": "hi", "max_tokens": 1})
        assert r.status_code == 401
        assert (await http.get("/health")).status_code == 200  # VLLMServer's health check


async def test_vllm_completions_leave_version_receipts(vllm_url):
    """Scored data whose completion the vLLM dialect served is attributed through its
    receipt (clotho_gateway_versions_attributed{source="receipt"})."""
    prompt = [5, 6, 7]
    out = await vllm_generate(
        vllm_url, {"prompt": {"prompt_token_ids": prompt}, "n": 2, "max_tokens": 5, "seed": 5, "logprobs": 0}
    )
    async with httpx.AsyncClient(base_url=vllm_url, timeout=60, headers=AUTH) as http:
        r = await http.post(
            "/register",
            json={
                "wandb_group": "g",
                "wandb_project": "p",
                "batch_size": 2,
                "max_token_len": 64,
                "checkpoint_dir": "/c",
                "save_checkpoint_interval": 1,
                "starting_step": 0,
                "num_steps": 10,
            },
        )
        assert r.status_code == 200, r.text
        r = await http.post(
            "/scored_data",
            json={
                "tokens": [prompt + ids for ids in out["token_ids"]],
                "masks": [[-100] * len(prompt) + ids for ids in out["token_ids"]],
                "scores": [1.0, 0.0],
            },
        )
        assert r.status_code == 200, r.text
        metrics = (await http.get("/metrics")).text
    line = next(
        line
        for line in metrics.splitlines()
        if line.startswith("clotho_gateway_versions_attributed") and "receipt" in line
    )
    assert float(line.split()[-1]) == 2.0, line


async def test_atroposlib_vllm_server_against_the_gateway(vllm_url, hf_model, tiny_model_dir):
    """atroposlib's own VLLMServer (server_type "vllm"): its health check, its
    tokens_and_logprobs_completion (what ManagedServer calls) and its get_logprobs."""
    from atroposlib.envs.server_handling.server_baseline import APIServerConfig
    from atroposlib.envs.server_handling.vllm_server import VLLMServer

    model, tokenizer = hf_model
    server = VLLMServer(
        APIServerConfig(
            server_type="vllm",
            base_url=f"{vllm_url}/v1",
            api_key=VLLM_TOKEN,
            model_name="tiny",
            tokenizer_name=str(tiny_model_dir),
            timeout=60,
        )
    )
    try:
        prompt_tokens, outputs, logprobs, reasons = await server.tokens_and_logprobs_completion(
            prompt="name a color",
            n=2,
            max_tokens=6,
            temperature=1.0,
            stop=["?"],
        )
        assert server.server_healthy  # its GET /health answered
        assert prompt_tokens == tokenizer.encode("name a color")
        assert len(outputs) == len(logprobs) == len(reasons) == 2
        for ids, lps, reason in zip(outputs, logprobs, reasons):
            assert 1 <= len(ids) <= 6 and len(lps) == len(ids) and reason in ("stop", "length")
            assert lps == pytest.approx(model_logprobs(model, prompt_tokens, ids), abs=1e-4)

        ids = tokenizer.encode("spell cat")
        payload = await server.get_logprobs(input_ids=ids, top_k=2)
        assert payload["prompt_tokens"] == ids
        # Per prompt position: the prompt token, then the model's 2 most likely.
        assert payload["prompt_topk_token_ids"][0] == [] and payload["prompt_topk_logprobs"][0] == []
        expected = model_logprobs(model, ids[:1], ids[1:])
        tops = model_top(model, ids, 2)[:-1]
        for p in range(1, len(ids)):
            entry = dict(zip(map(str, payload["prompt_topk_token_ids"][p]), payload["prompt_topk_logprobs"][p]))
            assert_vllm_position(entry, ids[p], expected[p - 1], tops[p - 1])
    finally:
        if getattr(server, "check_task", None) is not None:
            server.check_task.cancel()


# ---- SGLang's top logprobs (top_logprobs_num), through the same real gateway ----------
#
# meta_info.output_top_logprobs / input_top_logprobs as SGLang's TokenizerManager builds
# them: per position the k most likely [logprob, token_id, text], most likely first.


def assert_sglang_top(entry: list, top: dict[str, float], token_text=None) -> None:
    """One position of SGLang's top logprobs against the model's k most likely."""
    assert isinstance(entry, list) and len(entry) == len(top)
    assert {str(tid) for _, tid, _ in entry} == set(top)
    for lp, tid, text in entry:
        assert lp == pytest.approx(top[str(tid)], abs=1e-4)
        assert text == (token_text(tid) if token_text else None)
    values = [lp for lp, _, _ in entry]
    assert values == sorted(values, reverse=True)  # most likely first


def assert_sampled_in_top(token_logprobs: list, top_logprobs: list) -> None:
    """The sampled token's logprob equals its entry among the alternatives, if there."""
    for (lp, tok, _), entry in zip(token_logprobs, top_logprobs):
        match = [alt_lp for alt_lp, tid, _ in entry or () if tid == tok]
        if match:
            assert lp == pytest.approx(match[0], abs=1e-6)


async def test_sglang_top_logprobs_are_the_models(vllm_url, hf_model):
    model, tokenizer = hf_model
    prompt = tokenizer.encode("add 2 and 3")
    body = {
        "input_ids": prompt,
        "return_logprob": True,
        "top_logprobs_num": 5,
        "logprob_start_len": 0,
        "return_text_in_logprobs": True,
        "sampling_params": {"max_new_tokens": 8, "temperature": 1.0, "seed": 7, "ignore_eos": True},
    }
    out = await vllm_generate(vllm_url, body)
    meta, ids = out["meta_info"], out["output_ids"]
    assert len(ids) == 8
    text_of = lambda t: tokenizer.decode([t])  # noqa: E731 - SGLang's text: the token decoded alone
    # Generated positions: the model's 5 most likely after prompt + ids[:j].
    tops = model_top(model, prompt + ids, 5)
    assert len(meta["output_top_logprobs"]) == len(ids)
    for j, entry in enumerate(meta["output_top_logprobs"]):
        assert_sglang_top(entry, tops[len(prompt) - 1 + j], text_of)
    assert [lp for lp, _, _ in meta["output_token_logprobs"]] == pytest.approx(
        model_logprobs(model, prompt, ids), abs=1e-4
    )
    assert_sampled_in_top(meta["output_token_logprobs"], meta["output_top_logprobs"])
    # Prompt positions from logprob_start_len 0: the first has no context (None).
    assert len(meta["input_top_logprobs"]) == len(meta["input_token_logprobs"]) == len(prompt)
    assert meta["input_top_logprobs"][0] is None
    for p in range(1, len(prompt)):
        assert_sglang_top(meta["input_top_logprobs"][p], tops[p - 1], text_of)
    assert_sampled_in_top(meta["input_token_logprobs"][1:], meta["input_top_logprobs"][1:])

    # From logprob_start_len 3, without text: positions 3.. only.
    out = await vllm_generate(vllm_url, {**body, "logprob_start_len": 3, "return_text_in_logprobs": False})
    meta = out["meta_info"]
    assert out["output_ids"] == ids  # same seed, same tokens
    assert len(meta["input_top_logprobs"]) == len(prompt) - 3
    for p, entry in enumerate(meta["input_top_logprobs"], start=3):
        assert_sglang_top(entry, tops[p - 1])
    # Without prompt logprobs (logprob_start_len -1): output_top_logprobs only.
    out = await vllm_generate(vllm_url, {**body, "logprob_start_len": -1, "top_logprobs_num": 1})
    assert "input_top_logprobs" not in out["meta_info"] and "input_token_logprobs" not in out["meta_info"]
    assert [len(e) for e in out["meta_info"]["output_top_logprobs"]] == [1] * len(ids)


async def test_sglang_top_logprobs_batched_per_prompt_and_n(vllm_url, hf_model):
    model, tokenizer = hf_model
    prompts = [tokenizer.encode("spell cat"), tokenizer.encode("hi")]
    results = await vllm_generate(
        vllm_url,
        {
            "input_ids": prompts,
            "return_logprob": True,
            "top_logprobs_num": [3, 0],
            "sampling_params": {"n": 2, "max_new_tokens": 4, "seed": 1, "ignore_eos": True},
        },
    )
    assert isinstance(results, list) and len(results) == 4  # prompt-major, then sample
    for prompt, res in zip([prompts[0]] * 2, results[:2]):
        meta, ids = res["meta_info"], res["output_ids"]
        assert len(meta["output_top_logprobs"]) == len(ids) == 4
        tops = model_top(model, prompt + ids, 3)[len(prompt) - 1 : -1]
        for entry, top in zip(meta["output_top_logprobs"], tops):
            assert_sglang_top(entry, top)
        assert_sampled_in_top(meta["output_token_logprobs"], meta["output_top_logprobs"])
    # top_logprobs_num 0 for the second prompt: its logprobs without alternatives.
    for res in results[2:]:
        assert len(res["meta_info"]["output_token_logprobs"]) == 4
        assert "output_top_logprobs" not in res["meta_info"]


async def test_sglang_top_logprobs_stream(vllm_url, hf_model):
    model, tokenizer = hf_model
    prompt = tokenizer.encode("count to 4")
    body = {
        "input_ids": prompt,
        "stream": True,
        "return_logprob": True,
        "top_logprobs_num": 3,
        "logprob_start_len": 0,
        "return_text_in_logprobs": True,
        "sampling_params": {"max_new_tokens": 6, "seed": 3, "ignore_eos": True},
    }
    async with httpx.AsyncClient(base_url=vllm_url, timeout=60, headers=AUTH) as http:
        async with http.stream("POST", "/generate", json=body) as r:
            assert r.status_code == 200
            lines = [line async for line in r.aiter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    *chunks, final = events
    assert chunks and final["meta_info"]["finish_reason"] == {"type": "length", "length": 6}
    ids, meta = final["output_ids"], final["meta_info"]
    text_of = lambda t: tokenizer.decode([t])  # noqa: E731
    tops = model_top(model, prompt + ids, 3)
    for entry, top in zip(meta["output_top_logprobs"], tops[len(prompt) - 1 :]):
        assert_sglang_top(entry, top, text_of)
    assert len(meta["output_top_logprobs"]) == 6
    assert meta["input_top_logprobs"][0] is None and len(meta["input_top_logprobs"]) == len(prompt)
    for p in range(1, len(prompt)):
        assert_sglang_top(meta["input_top_logprobs"][p], tops[p - 1], text_of)
    # Every chunk: the logprobs so far (cumulative, as SGLang's default stream), each a
    # prefix of the final ones, texts included.
    for event in chunks:
        m = event["meta_info"]
        n = len(event["output_ids"])
        assert event["output_ids"] == ids[:n] and m["finish_reason"] is None
        assert len(m["output_top_logprobs"]) == len(m["output_token_logprobs"]) == n
        assert m["output_top_logprobs"] == meta["output_top_logprobs"][:n]
        assert m["output_token_logprobs"] == meta["output_token_logprobs"][:n]
    # The same request unstreamed gives the same tokens and alternatives.
    whole = await vllm_generate(vllm_url, {**body, "stream": False})
    assert whole["output_ids"] == ids
    assert whole["meta_info"]["output_top_logprobs"] == meta["output_top_logprobs"]


@pytest.mark.parametrize(
    "body, name",
    [
        ({"input_ids": [5, 6], "return_logprob": True, "top_logprobs_num": 21}, "top_logprobs_num"),
        ({"input_ids": [[5], [6]], "return_logprob": True, "top_logprobs_num": [2, 40]}, "top_logprobs_num[1]"),
        ({"input_ids": [5, 6], "return_logprob": True, "top_logprobs_num": 2.5}, "top_logprobs_num"),
    ],
)
async def test_sglang_top_logprobs_num_bounds_are_400(vllm_url, body, name):
    out = await vllm_generate(vllm_url, body, status=400)
    assert out["code"] == "INVALID_ARGUMENT" and out["error"].startswith(name + " must be"), out


async def test_vllm_penalties_change_greedy_output_as_the_reference(vllm_url, hf_model):
    model, tokenizer = hf_model
    prompt = tokenizer.encode("count to 4")
    greedy = {
        "prompt": {"prompt_token_ids": prompt},
        "temperature": 0.0,
        "ignore_eos": True,
        "max_tokens": 16,
        "logprobs": 0,
    }
    plain = (await vllm_generate(vllm_url, greedy))["token_ids"][0]
    assert plain == penalised_greedy_ids(model, prompt, 16)
    for penalties in ({"presence_penalty": 2.0, "frequency_penalty": 0.5}, {"repetition_penalty": 3.0}):
        out = await vllm_generate(vllm_url, {**greedy, **penalties})
        expected = penalised_greedy_ids(
            model,
            prompt,
            16,
            penalties.get("frequency_penalty", 0.0),
            penalties.get("presence_penalty", 0.0),
            penalties.get("repetition_penalty", 1.0),
        )
        assert expected != plain
        assert out["token_ids"][0] == expected
        # Logprobs stay the model's own, not the penalised distribution's.
        served = [next(iter(pos[0].values())) for pos in out["logprobs"][0]]
        assert served == pytest.approx(model_logprobs(model, prompt, expected), abs=1e-4)


async def test_sglang_penalties_change_greedy_output_as_the_reference(vllm_url, hf_model):
    model, tokenizer = hf_model
    prompt = tokenizer.encode("spell cat")
    sampling = {"temperature": 0.0, "ignore_eos": True, "max_new_tokens": 16}
    body = {
        "input_ids": [prompt, prompt, prompt],
        "return_logprob": True,
        "sampling_params": [
            sampling,
            {**sampling, "frequency_penalty": 2.0, "presence_penalty": 0.5},
            {**sampling, "repetition_penalty": 2.5},
        ],
    }
    results = await vllm_generate(vllm_url, body)
    expected = [
        penalised_greedy_ids(model, prompt, 16),
        penalised_greedy_ids(model, prompt, 16, frequency=2.0, presence=0.5),
        penalised_greedy_ids(model, prompt, 16, repetition=2.5),
    ]
    assert expected[1] != expected[0] and expected[2] != expected[0]
    assert [r["output_ids"] for r in results] == expected
    for r, ids in zip(results, expected):
        served = [lp for lp, _, _ in r["meta_info"]["output_token_logprobs"]]
        assert served == pytest.approx(model_logprobs(model, prompt, ids), abs=1e-4)
