"""Malformed inputs against real servers: bytes that do not decode as a method's
message answer INVALID_ARGUMENT naming the message (never UNKNOWN), on the gateway's,
an inference process's and a trainer's gRPC servers, for unary and streaming requests;
pathologically nested JSON and text that cannot be encoded (lone surrogates) answer a
4xx JSON error naming the field on every inference route and the trajectory routes
(never a 5xx). Every server keeps serving afterwards."""

from __future__ import annotations

import json
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio
from grpc import aio
from service_args import gateway_args

from clotho.v1 import gateway_service_pb2 as gpb
from clotho.v1 import gateway_service_pb2_grpc as gpb_grpc
from clotho.v1 import inference_service_pb2 as ipb
from clotho.v1 import inference_service_pb2_grpc as ipb_grpc
from clotho.v1 import scored_data_pb2 as spb
from clotho.v1 import trainer_service_pb2 as tpb
from clotho.v1 import trainer_service_pb2_grpc as tpb_grpc
from services.trainer.server import create_server as create_trainer_server
from services.trainer.settings import TrainerSettings

pytestmark = pytest.mark.asyncio(loop_scope="module")

# Not a protobuf message: field 1 as a length-delimited value running past the end.
GARBAGE = b"\x0a\xff\xff\xff\xff\x0f\x00"
DEEP = 100_000  # nesting no JSON parser here recurses through


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(tiny_model_dir, tmp_path_factory, service_process):
    """A real inference process, a real gateway in front of it (HTTP and gRPC), and a
    trainer's gRPC server in this process: their gRPC targets and the gateway's URL."""
    args = ["--model-path", str(tiny_model_dir), "--grpc-port", "0", "--grace-seconds", "1"]
    async with service_process("services.inference", args, tmp_path_factory.mktemp("inference")) as (_, inference):
        workdir = tmp_path_factory.mktemp("gateway")
        args = gateway_args(workdir, f"127.0.0.1:{inference['grpc_port']}", tiny_model_dir)
        async with service_process("services.gateway", args, workdir) as (_, gateway):
            trainer, trainer_port = create_trainer_server(TrainerSettings(grpc_port=0, inference=[]))
            await trainer.server.start()
            await trainer.set_serving(True)
            try:
                yield {
                    "url": f"http://127.0.0.1:{gateway['http_port']}",
                    "gateway": f"127.0.0.1:{gateway['grpc_port']}",
                    "inference": f"127.0.0.1:{inference['grpc_port']}",
                    "trainer": f"127.0.0.1:{trainer_port}",
                }
            finally:
                await trainer.server.stop(0)


# ---- gRPC: undecodable messages --------------------------------------------------------


async def _raw_code(target: str, method: str, kind: str, messages: list[bytes]) -> aio.AioRpcError | None:
    """Calls `method` with raw request bytes (no serializer) and reads the answer to
    the end; the error it ends with, None when it succeeds."""
    async with aio.insecure_channel(target) as ch:
        # No serializers: the request bytes go out as they are (grpc's stubs cannot say so).
        chan: Any = ch
        try:
            if kind == "unary_unary":
                await chan.unary_unary(method)(messages[0], timeout=30)
            elif kind == "unary_stream":
                async for _ in chan.unary_stream(method)(messages[0], timeout=30):
                    pass
            elif kind == "stream_unary":
                await chan.stream_unary(method)(iter(messages), timeout=30)
            else:
                async for _ in chan.stream_stream(method)(iter(messages), timeout=30):
                    pass
        except aio.AioRpcError as exc:
            return exc
    return None


UNDECODABLE = [
    # (server, method, kind, message name)
    ("gateway", "/clotho.v1.GatewayService/SubmitScoredData", "stream_unary", "clotho.v1.SubmitScoredDataRequest"),
    ("gateway", "/clotho.v1.GatewayService/StreamBatches", "stream_stream", "clotho.v1.StreamBatchesRequest"),
    ("gateway", "/clotho.v1.GatewayService/GetStatus", "unary_unary", "clotho.v1.GetStatusRequest"),
    ("inference", "/clotho.v1.InferenceService/Generate", "unary_stream", "clotho.v1.GenerateRequest"),
    ("inference", "/clotho.v1.InferenceService/GetModelInfo", "unary_unary", "clotho.v1.GetModelInfoRequest"),
    ("trainer", "/clotho.v1.TrainerService/GetPolicy", "unary_unary", "clotho.v1.GetPolicyRequest"),
    ("trainer", "/clotho.v1.TrainerService/WatchPolicy", "unary_stream", "clotho.v1.WatchPolicyRequest"),
]


@pytest.mark.parametrize(("server", "method", "kind", "message"), UNDECODABLE, ids=[u[1] for u in UNDECODABLE])
async def test_undecodable_request_is_invalid_argument(mesh, server, method, kind, message) -> None:
    error = await _raw_code(mesh[server], method, kind, [GARBAGE])
    assert error is not None, f"{method} accepted garbage"
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    assert (error.details() or "").startswith(f"request is not a valid {message}: "), error.details()


async def test_undecodable_message_later_in_a_stream_refuses_the_whole_stream(mesh) -> None:
    """SubmitScoredData is all or nothing: a good group then garbage enqueues nothing."""
    sequence = spb.ScoredSequence(tokens=[1, 2, 3], masks=[-100, 2, 3], score=1.0)
    good = gpb.SubmitScoredDataRequest(group=spb.ScoredGroup(sequences=[sequence])).SerializeToString()
    error = await _raw_code(
        mesh["gateway"], "/clotho.v1.GatewayService/SubmitScoredData", "stream_unary", [good, GARBAGE, good]
    )
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert "clotho.v1.SubmitScoredDataRequest" in (error.details() or "")


async def test_grpc_servers_keep_serving_after_undecodable_requests(mesh) -> None:
    for _ in range(3):
        for server, method, kind, _message in UNDECODABLE:
            error = await _raw_code(mesh[server], method, kind, [GARBAGE])
            assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT
    async with aio.insecure_channel(mesh["gateway"]) as ch:
        status = await gpb_grpc.GatewayServiceStub(ch).GetStatus(gpb.GetStatusRequest(), timeout=30)
        assert status is not None
    async with aio.insecure_channel(mesh["inference"]) as ch:
        stub = ipb_grpc.InferenceServiceStub(ch)
        request = ipb.GenerateRequest(input_ids=[1, 20, 21], sampling_params=ipb.SamplingParams(max_new_tokens=2))
        answers = [m async for m in stub.Generate(request, timeout=60)]
        assert answers and answers[-1].HasField("completion")
    async with aio.insecure_channel(mesh["trainer"]) as ch:
        try:
            await tpb_grpc.TrainerServiceStub(ch).GetTrainerStatus(tpb.GetTrainerStatusRequest(), timeout=30)
        except aio.AioRpcError as exc:  # a trainer with no policy yet may say so, but not UNKNOWN
            assert exc.code() not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), exc


# ---- HTTP: pathological nesting and text that cannot be encoded ----------------------


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def raw(obj: object) -> bytes:
    """JSON with every non-ASCII character escaped: a lone surrogate travels as \\udXXX."""
    return json.dumps(obj, ensure_ascii=True).encode()


LONE = "hi \ud800 there"
GROUP = {"tokens": [[1, 2, 3]], "masks": [[-100, 2, 3]], "scores": [1.0]}
SAMPLING: dict[str, Any] = {"max_new_tokens": 2}

# (route, raw body, the field the error must name)
SURROGATES = [
    ("/generate", raw({"text": LONE, "sampling_params": SAMPLING}), "text"),
    ("/generate", raw({"text": ["ok", LONE], "sampling_params": SAMPLING}), "text[1]"),
    (
        "/generate",
        raw({"input_ids": [1, 2], "sampling_params": SAMPLING | {"stop": [LONE]}}),
        "sampling_params.stop[0]",
    ),
    ("/generate", raw({"prompt": LONE, "max_tokens": 2}), "prompt"),
    ("/generate", raw({"prompt": {"prompt": LONE}, "max_tokens": 2}), "prompt.prompt"),
    ("/v1/completions", raw({"model": "tiny", "prompt": LONE, "max_tokens": 2}), "prompt"),
    ("/v1/completions", raw({"model": LONE, "prompt": "hi", "max_tokens": 2}), "model"),
    ("/v1/completions", raw({"prompt": "hi", "max_tokens": 2, "stream": True, "user": LONE}), "user"),
    (
        "/v1/chat/completions",
        raw({"messages": [{"role": "user", "content": LONE}], "max_tokens": 2}),
        "messages[0].content",
    ),
    (
        "/v1/chat/completions",
        raw({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True, "model": LONE}),
        "model",
    ),
    ("/scored_data", raw({**GROUP, "messages": [[{"role": "user", "content": LONE}]]}), "messages[0][0].content"),
    ("/scored_data_list", raw([GROUP, {**GROUP, "env_id": None, "overrides": [{"k": LONE}]}]), "[1].overrides[0].k"),
    (
        "/register",
        raw(
            {
                "wandb_group": LONE,
                "wandb_project": "p",
                "batch_size": 4,
                "max_token_len": 64,
                "checkpoint_dir": "c",
                "save_checkpoint_interval": 1,
                "starting_step": 0,
                "num_steps": 10,
            }
        ),
        "wandb_group",
    ),
]

DEEP_BODIES = [
    ("/generate", '{"text": ' + nested(DEEP) + ', "sampling_params": {"max_new_tokens": 2}}', "text"),
    ("/generate", '{"prompt": ' + nested(DEEP) + "}", "prompt"),
    ("/generate", nested(DEEP), "[0][0][0]"),
    ("/v1/completions", '{"prompt": ' + nested(DEEP) + ', "max_tokens": 2}', "prompt"),
    ("/v1/chat/completions", '{"messages": ' + nested(DEEP) + "}", "messages"),
    ("/scored_data", '{"tokens": ' + nested(DEEP) + "}", "tokens"),
    ("/scored_data_list", nested(DEEP), "[0][0][0]"),
    ("/register", '{"wandb_group": ' + nested(DEEP) + "}", "wandb_group"),
]
# Nesting within the limit (the routes answer it) and beyond it, up to just past
# what Python's json module recurses through.
SHALLOWER = [
    (route, body.replace(nested(DEEP), nested(depth)))
    for route, body, _field in DEEP_BODIES
    for depth in (100, 127, 128, 129, 200, 900, 990)
]


def _assert_refused(route: str, response: httpx.Response, field: str | None) -> None:
    assert 400 <= response.status_code < 500, (route, response.status_code, response.text[:300])
    payload = response.json()
    error = payload["error"]
    message = error["message"] if isinstance(error, dict) else error
    if field is not None:
        assert field in message, (route, message)


@pytest.mark.parametrize(("route", "body", "field"), SURROGATES, ids=[f"{r}:{f}" for r, _b, f in SURROGATES])
async def test_text_that_cannot_be_encoded_is_refused_naming_the_field(mesh, route, body, field) -> None:
    async with httpx.AsyncClient(base_url=mesh["url"], timeout=60) as http:
        response = await http.post(route, content=body, headers={"content-type": "application/json"})
    _assert_refused(route, response, field)


@pytest.mark.parametrize(("route", "body", "field"), DEEP_BODIES, ids=[f"{r}:{f}" for r, _b, f in DEEP_BODIES])
async def test_pathological_nesting_is_refused_naming_the_field(mesh, route, body, field) -> None:
    async with httpx.AsyncClient(base_url=mesh["url"], timeout=60) as http:
        response = await http.post(route, content=body, headers={"content-type": "application/json"})
    _assert_refused(route, response, field)


async def test_nesting_the_parser_gets_through_is_never_a_5xx(mesh) -> None:
    async with httpx.AsyncClient(base_url=mesh["url"], timeout=60) as http:
        for route, body in SHALLOWER:
            response = await http.post(route, content=body, headers={"content-type": "application/json"})
            _assert_refused(route, response, None)


async def test_gateway_keeps_serving_after_malformed_bodies(mesh) -> None:
    async with httpx.AsyncClient(base_url=mesh["url"], timeout=60) as http:
        for route, body, _field in SURROGATES + DEEP_BODIES:
            assert (await http.post(route, content=body)).status_code < 500
        r = await http.post("/generate", json={"text": "hi", "sampling_params": SAMPLING})
        assert r.status_code == 200, r.text
        r = await http.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        )
        assert r.status_code in (200, 400), r.text  # 400 where the tiny tokenizer has no chat template
        r = await http.post("/v1/completions", json={"prompt": "hi \U0001f600", "max_tokens": 2})
        assert r.status_code == 200, r.text
        assert (await http.get("/status")).status_code == 200
