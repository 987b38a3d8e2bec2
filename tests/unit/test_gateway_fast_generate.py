"""A non-streamed SGLang /generate takes the body middleware's short way into the app;
it answers exactly what the full stack answers (status, headers, body; errors from
the gateway and from the inference service alike), keeps the bearer-token check, and
leaves streams, vLLM's dialect and cross-origin calls to the full stack."""

from __future__ import annotations

import json
import struct
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import pytest
from grpc import aio

from clotho.v1 import inference_service_pb2 as ipb
from clotho.v1 import policy_pb2
from services.gateway import auth
from services.gateway.generation.pool import InferencePool
from services.gateway.http import app as app_module
from services.gateway.http.app import create_app
from services.gateway.trajectory import TrajectoryState

TOKEN = "inf-1"


class CharTokenizer:
    """Token id k is chr(ord('a') + k % 26)."""

    def encode(self, text: str) -> list[int]:
        return [(ord(c) - ord("a")) % 26 for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids)


class FakePool(InferencePool):
    """Sample i of a prompt: its first token, then i, i+1, ... (max_new_tokens of them)."""

    def __init__(self, fail: grpc.StatusCode | None = None) -> None:
        super().__init__(["fake:1"])
        self.fail = fail
        self.calls = 0

    async def tokenizer(self) -> Any:
        return CharTokenizer()

    async def generate(self, request: ipb.GenerateRequest) -> AsyncIterator[ipb.GenerateResponse]:
        self.calls += 1
        if self.fail is not None:
            raise aio.AioRpcError(self.fail, aio.Metadata(), aio.Metadata(), details="engine said no")
        sp = request.sampling_params
        for i in range(sp.n if sp.HasField("n") else 1):
            ids = [request.input_ids[0] + i + k for k in range(sp.max_new_tokens or 3)]
            if request.stream:
                yield ipb.GenerateResponse(index=i, chunk=ipb.TokenChunk(token_ids=ids[:1], logprobs=[-0.5], version=2))
            yield ipb.GenerateResponse(
                index=i,
                completion=ipb.Completion(
                    output_ids=ids,
                    output_logprobs=[-0.25 - k * 1e-6 for k in range(len(ids))],
                    finish_reason=ipb.FINISH_REASON_LENGTH,
                    version_spans=[policy_pb2.VersionSpan(start_token=0, version=2)],
                    prompt_tokens=len(request.input_ids),
                ),
            )


def client(pool: InferencePool, monkeypatch: pytest.MonkeyPatch | None = None) -> httpx.AsyncClient:
    """A client of the app; with `monkeypatch`, /generate's fast route declines every
    request (the full stack answers)."""
    if monkeypatch is not None:

        def declining(*_args: Any) -> Any:
            async def decline(_body: bytes, _scope: Any) -> None:
                return None

            return decline

        monkeypatch.setattr(app_module, "generate_fast_route", declining)
    app = create_app(TrajectoryState(), pool, max_body_bytes=64 * 1024)
    if monkeypatch is not None:
        monkeypatch.undo()
    auth.install(app, None, TOKEN)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")


HEADERS = {"Authorization": f"Bearer {TOKEN}"}
SAMPLING = {"n": 8, "max_new_tokens": 4, "temperature": 1.0}
BODIES: list[Any] = [
    {"input_ids": [3, 4, 5], "sampling_params": SAMPLING, "return_logprob": True},  # the demo env's call
    {"input_ids": [3, 4, 5], "sampling_params": {"max_new_tokens": 2}},  # one result, a small body
    {"input_ids": [[3, 4], [9]], "sampling_params": [{"n": 2}, {"n": 1}], "return_logprob": True},
    {"text": "hello", "sampling_params": {"n": 2}, "return_logprob": True, "return_text_in_logprobs": True},
    {"text": ["ab", "cd"], "sampling_params": {"max_new_tokens": 1}, "rid": "r"},
    {"input_ids": [3], "sampling_params": {"n": "x"}},  # refused by the parser
    {"input_ids": [3], "rid": "\ud800"},  # a lone surrogate: json_guard names it
    {"prompt": "hi", "max_tokens": 2},  # vLLM's dialect
    {"input_ids": [3, 4], "sampling_params": {"n": 2, "max_new_tokens": 2}, "stream": True},
]
RAW_BODIES = [b"{not json", b"[1, 2]", b""]


def comparable(r: httpx.Response) -> tuple[int, dict[str, str], Any]:
    headers = {k: v for k, v in r.headers.items() if k != "content-length"}
    if r.headers.get("content-type") == "application/json":
        body: Any = r.json()
        for item in body if isinstance(body, list) else [body]:
            if isinstance(item, dict) and "meta_info" in item:
                item["meta_info"].pop("e2e_latency")
                if item["meta_info"]["id"] not in ("r_0", "r_1"):
                    item["meta_info"].pop("id")  # a fresh uuid per call
        return r.status_code, headers, body
    # A stream: its events without the ids and latency that differ per call.
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    for event in events:
        event.get("meta_info", {}).pop("e2e_latency", None)
        event.get("meta_info", {}).pop("id", None)
    return r.status_code, headers, events


async def both(pool_args: dict[str, Any], monkeypatch: pytest.MonkeyPatch, **request: Any) -> list[tuple]:
    out = []
    for patch in (None, monkeypatch):
        pool = FakePool(**pool_args)
        async with client(pool, patch) as c:
            out.append(comparable(await c.post("/generate", **request)))
    return out


@pytest.mark.parametrize("body", BODIES)
async def test_fast_generate_answers_what_the_full_stack_answers(body, monkeypatch):
    fast, full = await both({}, monkeypatch, content=json.dumps(body).encode(), headers=HEADERS)
    assert fast == full
    if body is BODIES[0]:
        assert fast[0] == 200 and len(fast[2]) == 8
        # CORS's Vary, and the gzip middleware's on a body of its minimum size.
        assert fast[1]["vary"] == "Origin, Accept-Encoding"
        lp = struct.unpack("f", struct.pack("f", -0.25 - 1e-6))[0]
        assert fast[2][3]["meta_info"]["output_token_logprobs"][1] == [lp, 7, None]


async def test_the_demo_envs_call_takes_the_short_way(monkeypatch):
    answered = []
    make = app_module.generate_fast_route

    def counting(*args: Any) -> Any:
        route = make(*args)

        async def counted(body: bytes, scope: Any) -> Any:
            out = await route(body, scope)
            answered.append(out is not None)
            return out

        return counted

    monkeypatch.setattr(app_module, "generate_fast_route", counting)
    async with client(FakePool()) as c:
        assert (await c.post("/generate", json=BODIES[0], headers=HEADERS)).status_code == 200
        assert (await c.post("/generate", json=BODIES[-1], headers=HEADERS)).status_code == 200  # a stream
    assert answered == [True, False]


@pytest.mark.parametrize("raw", RAW_BODIES)
async def test_fast_generate_refuses_what_the_full_stack_refuses(raw, monkeypatch):
    fast, full = await both({}, monkeypatch, content=raw, headers=HEADERS)
    assert fast == full and fast[0] in (400, 422)


@pytest.mark.parametrize("code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAVAILABLE])
async def test_fast_generate_maps_inference_statuses_as_the_full_stack(code, monkeypatch):
    fast, full = await both({"fail": code}, monkeypatch, json=BODIES[0], headers=HEADERS)
    assert fast == full
    assert fast[2] == {"error": "inference service: engine said no", "code": code.name}


async def test_fast_generate_keeps_the_inference_token_and_cors():
    pool = FakePool()
    async with client(pool) as c:
        r = await c.post("/generate", json=BODIES[0])
        assert r.status_code == 401 and pool.calls == 0
        r = await c.post("/generate", json=BODIES[0], headers={**HEADERS, "Origin": "http://x"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://x"


async def test_generate_without_inference_is_503_either_way(monkeypatch):
    answers = []
    for patch in (None, monkeypatch):
        async with client(InferencePool([]), patch) as c:
            answers.append(comparable(await c.post("/generate", json=BODIES[0], headers=HEADERS)))
    assert answers[0] == answers[1] and answers[0][0] == 503


async def test_fast_generate_counts_under_its_route_in_metrics():
    async with client(FakePool()) as c:
        assert (await c.post("/generate", json=BODIES[0], headers=HEADERS)).status_code == 200
        text = (await c.get("/metrics")).text
    assert 'clotho_gateway_http_request_duration_seconds_count{method="POST",route="/generate"} 1.0' in text
