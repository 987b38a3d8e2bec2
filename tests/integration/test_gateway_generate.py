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

    async def GetModelInfo(self, request, context):
        return ipb.GetModelInfoResponse(
            model_name="tiny", model_path=self.model_path, max_context_len=512, eos_token_id=EOS, engine="fake", shard_count=1
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
                yield ipb.GenerateResponse(index=i, chunk=ipb.TokenChunk(token_ids=ids[:1], logprobs=logprobs[:1], version=5))
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
        r = await http.post("/generate", json={"input_ids": [30, 31], "sampling_params": {"n": 2}, "return_logprob": True})
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
            [20, char_id("a")], [20, char_id("b")], [25, char_id("a")], [25, char_id("b")],
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
