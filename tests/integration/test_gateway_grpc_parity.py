"""GatewayService's REST-parity RPCs on a real gateway (create_server, in process, on
loopback) in front of a fake InferenceService served over gRPC by the test process:
Generate is routed and leaves a version receipt, GetLatestExample / ResetData / GetInfo
answer what `/latest_example`, `/reset_data` and `/info` answer, and each RPC takes the
token its REST twin takes (inference token for Generate, trajectory token for the rest)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import pytest
from grpc import aio

from clotho.client import bearer_metadata
from clotho.v1 import gateway_service_pb2 as gpb
from clotho.v1 import gateway_service_pb2_grpc as gpb_grpc
from clotho.v1 import inference_service_pb2 as ipb
from clotho.v1 import inference_service_pb2_grpc as ipb_grpc
from clotho.v1 import policy_pb2
from clotho.v1 import scored_data_pb2 as spb
from services.gateway.settings import GatewaySettings

TIMEOUT = 30
TRAJECTORY = "traj-secret"
INFERENCE = "inf-secret"
VERSION = 7


class FakeInference(ipb_grpc.InferenceServiceServicer):
    """Sample i answers [prompt[0], 100 + i] with logprobs [-0.5, -1.5] at VERSION; a
    prompt starting with 0 is refused INVALID_ARGUMENT."""

    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []

    async def GetModelInfo(self, request, context):
        return ipb.GetModelInfoResponse(model_name="fake", model_path="", max_context_len=64, engine="fake")

    async def Generate(self, request, context):
        self.metadata.append({k: v for k, v in context.invocation_metadata()})
        if request.input_ids and request.input_ids[0] == 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt starts with 0")
        n = request.sampling_params.n if request.sampling_params.HasField("n") else 1
        for i in range(n):
            ids = [request.input_ids[0], 100 + i]
            if request.stream:
                yield ipb.GenerateResponse(
                    index=i, chunk=ipb.TokenChunk(token_ids=ids, logprobs=[-0.5, -1.5], version=VERSION)
                )
            yield ipb.GenerateResponse(
                index=i,
                completion=ipb.Completion(
                    output_ids=ids,
                    output_logprobs=[-0.5, -1.5],
                    finish_reason=ipb.FINISH_REASON_LENGTH,
                    version_spans=[policy_pb2.VersionSpan(start_token=0, version=VERSION)],
                    prompt_tokens=len(request.input_ids),
                ),
            )


@contextlib.asynccontextmanager
async def mesh(**settings: Any) -> AsyncIterator[tuple[str, str, FakeInference]]:
    """(gRPC target, HTTP base URL, fake) of a gateway in front of the fake."""
    from services.gateway.server import create_server

    fake = FakeInference()
    inference = aio.server()
    ipb_grpc.add_InferenceServiceServicer_to_server(fake, inference)
    port = inference.add_insecure_port("127.0.0.1:0")
    await inference.start()
    server, _ = create_server(
        GatewaySettings(http_port=0, grpc_port=0, store="memory", inference=[f"127.0.0.1:{port}"], **settings)
    )
    await server.start()
    try:
        yield f"127.0.0.1:{server.port}", f"http://127.0.0.1:{server.http_port}", fake
    finally:
        await server.stop(0.5)
        await inference.stop(0)


@contextlib.asynccontextmanager
async def stub(target: str) -> AsyncIterator[gpb_grpc.GatewayServiceStub]:
    async with aio.insecure_channel(target) as channel:
        yield gpb_grpc.GatewayServiceStub(channel)


def group(tag: int) -> spb.ScoredGroup:
    return spb.ScoredGroup(
        sequences=[
            spb.ScoredSequence(
                tokens=[tag, 100 + i], masks=[-100, 100 + i], score=float(i), inference_logprobs=[0.0, -0.5]
            )
            for i in range(2)
        ]
    )


async def submit(gw: gpb_grpc.GatewayServiceStub, groups: list[spb.ScoredGroup], metadata=None) -> None:
    async def requests():
        for g in groups:
            yield gpb.SubmitScoredDataRequest(group=g)

    await asyncio.wait_for(gw.SubmitScoredData(requests(), metadata=metadata), TIMEOUT)


def generate_request(prompt: list[int], n: int = 1, stream: bool = False) -> gpb.GatewayServiceGenerateRequest:
    return gpb.GatewayServiceGenerateRequest(
        request=ipb.GenerateRequest(input_ids=prompt, sampling_params=ipb.SamplingParams(n=n), stream=stream)
    )


async def test_generate_streams_what_the_target_sends_and_leaves_receipts() -> None:
    async with mesh() as (target, _http, fake), stub(target) as gw:
        messages = [m async for m in gw.Generate(generate_request([5, 6], n=2, stream=True), timeout=TIMEOUT)]
        kinds = [m.response.WhichOneof("payload") for m in messages]
        assert kinds == ["chunk", "completion", "chunk", "completion"]
        completions = {m.response.index: m.response.completion for m in messages if m.response.HasField("completion")}
        assert [list(completions[i].output_ids) for i in (0, 1)] == [[5, 100], [5, 101]]
        assert list(completions[0].output_logprobs) == pytest.approx([-0.5, -1.5])
        assert completions[1].version_spans[0].version == VERSION
        # The receipt: a group submitted without versions is attributed VERSION.
        await asyncio.wait_for(gw.RegisterTrainer(gpb.RegisterTrainerRequest(batch_size=2, max_token_len=16)), TIMEOUT)
        await asyncio.wait_for(gw.RegisterEnv(gpb.RegisterEnvRequest(group_size=2, weight=1.0)), TIMEOUT)
        await submit(gw, [group(5)])
        call = gw.StreamBatches(iter([gpb.StreamBatchesRequest(credits=1)]))
        batch = await asyncio.wait_for(call.read(), TIMEOUT)
        call.cancel()
        assert [s.policy_version for s in batch.groups[0].sequences] == [VERSION, VERSION]


async def test_generate_carries_the_targets_error_and_the_trace_context() -> None:
    async with mesh() as (target, _http, fake), stub(target) as gw:
        with pytest.raises(aio.AioRpcError) as info:
            async for _ in gw.Generate(generate_request([0]), timeout=TIMEOUT):
                pass
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "prompt starts with 0" in (info.value.details() or "")
        traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        async for _ in gw.Generate(generate_request([3]), metadata=(("traceparent", traceparent),), timeout=TIMEOUT):
            pass
        sent = fake.metadata[-1].get("traceparent", "")
        assert sent.split("-")[1] == "4bf92f3577b34da6a3ce929d0e0e4736"


async def test_generate_without_inference_is_unavailable() -> None:
    from services.gateway.server import create_server

    server, _ = create_server(GatewaySettings(http_port=0, grpc_port=0, store="memory"))
    await server.start()
    try:
        async with stub(f"127.0.0.1:{server.port}") as gw:
            with pytest.raises(aio.AioRpcError) as info:
                async for _ in gw.Generate(generate_request([3]), timeout=TIMEOUT):
                    pass
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(0.5)


async def test_latest_example_reset_and_info_answer_as_rest_does() -> None:
    async with mesh() as (target, http, _fake), stub(target) as gw, httpx.AsyncClient(base_url=http) as rest:
        empty = await gw.GetLatestExample(gpb.GetLatestExampleRequest(), timeout=TIMEOUT)
        assert not empty.HasField("group")
        info = await gw.GetInfo(gpb.GetInfoRequest(), timeout=TIMEOUT)
        assert (info.batch_size, info.max_token_len) == (-1, -1)
        assert (await rest.get("/info")).json() == {"batch_size": -1, "max_token_len": -1}

        await gw.RegisterTrainer(gpb.RegisterTrainerRequest(batch_size=4, max_token_len=32), timeout=TIMEOUT)
        await gw.RegisterEnv(gpb.RegisterEnvRequest(group_size=2, weight=1.0), timeout=TIMEOUT)
        await submit(gw, [group(1), group(2)])
        info = await gw.GetInfo(gpb.GetInfoRequest(), timeout=TIMEOUT)
        assert (await rest.get("/info")).json() == {"batch_size": info.batch_size, "max_token_len": info.max_token_len}
        assert (info.batch_size, info.max_token_len) == (4, 32)

        latest = (await gw.GetLatestExample(gpb.GetLatestExampleRequest(), timeout=TIMEOUT)).group
        as_rest = (await rest.get("/latest_example")).json()
        assert [list(s.tokens) for s in latest.sequences] == as_rest["tokens"] == [[2, 100], [2, 101]]
        assert [list(s.masks) for s in latest.sequences] == as_rest["masks"]
        assert [s.score for s in latest.sequences] == as_rest["scores"]
        assert [list(s.inference_logprobs) for s in latest.sequences] == as_rest["inference_logprobs"]

        status = await gw.GetStatus(gpb.GetStatusRequest(), timeout=TIMEOUT)
        assert status.queue_size == 2
        await gw.ResetData(gpb.ResetDataRequest(), timeout=TIMEOUT)
        status = await gw.GetStatus(gpb.GetStatusRequest(), timeout=TIMEOUT)
        assert (status.queue_size, status.current_step) == (0, 0)
        # As Atropos: the trainer is gone, its max_token_len and the latest example stay.
        info = await gw.GetInfo(gpb.GetInfoRequest(), timeout=TIMEOUT)
        assert (info.batch_size, info.max_token_len) == (-1, 32)
        assert (await rest.get("/info")).json() == {"batch_size": -1, "max_token_len": 32}
        kept = await gw.GetLatestExample(gpb.GetLatestExampleRequest(), timeout=TIMEOUT)
        assert kept.group == latest


async def _code(awaitable) -> grpc.StatusCode:
    try:
        await asyncio.wait_for(awaitable, TIMEOUT)
    except aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def _drain(call) -> None:
    async for _ in call:
        pass


async def test_each_rpc_takes_the_token_of_its_rest_twin() -> None:
    async with (
        mesh(trajectory_token=TRAJECTORY, inference_token=INFERENCE) as (target, _http, _fake),
        stub(target) as gw,
    ):
        traj, inf = bearer_metadata(TRAJECTORY), bearer_metadata(INFERENCE)
        unary = {
            "GetLatestExample": gpb.GetLatestExampleRequest(),
            "ResetData": gpb.ResetDataRequest(),
            "GetInfo": gpb.GetInfoRequest(),
        }
        for name, request in unary.items():
            method = getattr(gw, name)
            assert await _code(method(request)) == grpc.StatusCode.UNAUTHENTICATED, name
            assert await _code(method(request, metadata=inf)) == grpc.StatusCode.UNAUTHENTICATED, name
            assert await _code(method(request, metadata=traj)) == grpc.StatusCode.OK, name
        generate = generate_request([4])
        assert await _code(_drain(gw.Generate(generate))) == grpc.StatusCode.UNAUTHENTICATED
        assert await _code(_drain(gw.Generate(generate, metadata=traj))) == grpc.StatusCode.UNAUTHENTICATED
        assert await _code(_drain(gw.Generate(generate, metadata=inf))) == grpc.StatusCode.OK


async def test_an_unset_inference_token_leaves_generate_open() -> None:
    async with mesh(trajectory_token=TRAJECTORY) as (target, _http, _fake), stub(target) as gw:
        assert await _code(_drain(gw.Generate(generate_request([4])))) == grpc.StatusCode.OK
        assert await _code(gw.GetInfo(gpb.GetInfoRequest())) == grpc.StatusCode.UNAUTHENTICATED
