"""The gateway's trajectory_token on gRPC: a real gateway (create_server, in process) on
loopback. Every GatewayService call, unary and streaming, needs `authorization: Bearer
<token>`; health and reflection stay open; without a token nothing changes; and the
clients that talk to the gateway (GatewayClient, the trainer's channel, a whole
Learner) send the token they are given. Also: the HTTP side answers 413 on /v1/* in
OpenAI's error shape."""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pydantic import SecretStr

from clotho.client import GatewayClient, bearer_interceptors, bearer_metadata
from clotho.v1 import gateway_service_pb2 as gpb
from clotho.v1 import gateway_service_pb2_grpc as gpb_grpc
from clotho.v1 import scored_data_pb2 as spb
from services.common.server import channel as service_channel
from services.common.settings import load_settings
from services.gateway.settings import GatewaySettings
from services.trainer.settings import TrainerSettings

if TYPE_CHECKING:
    from services.gateway.server import GatewayServer

TOKEN = "grpc-secret"
TIMEOUT = 30


@contextlib.asynccontextmanager
async def running_gateway(token: str | None, **settings: Any) -> AsyncIterator[str]:
    async with running_server(token, **settings) as server:
        yield f"127.0.0.1:{server.port}"


@contextlib.asynccontextmanager
async def running_server(token: str | None, **settings: Any) -> AsyncIterator[GatewayServer]:
    from services.gateway.server import create_server

    server, _port = create_server(
        GatewaySettings(http_port=0, grpc_port=0, store="memory", trajectory_token=token, **settings)
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop(0.5)


@pytest.fixture
async def guarded():
    async with running_gateway(TOKEN) as target:
        yield target


@pytest.fixture
async def open_gateway():
    async with running_gateway(None) as target:
        yield target


def group(tag: int, size: int = 2) -> spb.ScoredGroup:
    return spb.ScoredGroup(
        sequences=[
            spb.ScoredSequence(tokens=[tag, 10 + i, 20 + i], masks=[-100, 10 + i, 20 + i], score=float(i))
            for i in range(size)
        ]
    )


async def refused(awaitable) -> aio.AioRpcError:
    with pytest.raises(aio.AioRpcError) as info:
        await asyncio.wait_for(awaitable, TIMEOUT)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, info.value
    assert TOKEN not in (info.value.details() or "")
    return info.value


async def stream_batches_refused(stub: gpb_grpc.GatewayServiceStub, metadata=None) -> aio.AioRpcError:
    call = stub.StreamBatches(metadata=metadata)
    with contextlib.suppress(asyncio.InvalidStateError, aio.AioRpcError):
        await call.write(gpb.StreamBatchesRequest(credits=1))
    return await refused(call.read())


async def test_calls_without_the_token_are_unauthenticated(guarded):
    async with aio.insecure_channel(guarded) as ch:
        stub = gpb_grpc.GatewayServiceStub(ch)
        missing = await refused(stub.GetStatus(gpb.GetStatusRequest()))
        assert "missing bearer token" in (missing.details() or "")
        assert "/clotho.v1.GatewayService/GetStatus" in (missing.details() or "")
        assert "authorization: Bearer <trajectory_token>" in (missing.details() or "")
        wrong = await refused(stub.GetStatus(gpb.GetStatusRequest(), metadata=bearer_metadata("nope")))
        assert "wrong bearer token" in (wrong.details() or "")
        # Not a bearer credential at all counts as missing.
        basic = await refused(stub.GetStatus(gpb.GetStatusRequest(), metadata=(("authorization", f"Basic {TOKEN}"),)))
        assert "missing bearer token" in (basic.details() or "")
        await refused(stub.RegisterTrainer(gpb.RegisterTrainerRequest(batch_size=4)))

        # Client streaming, and the bidirectional batch stream.
        async def one() -> AsyncIterator[gpb.SubmitScoredDataRequest]:
            yield gpb.SubmitScoredDataRequest(group=group(1))

        await refused(stub.SubmitScoredData(one()))
        assert "missing bearer token" in ((await stream_batches_refused(stub)).details() or "")
        assert "wrong bearer token" in ((await stream_batches_refused(stub, bearer_metadata("nope"))).details() or "")

        # Nothing refused reached the state.
        status = await stub.GetStatus(gpb.GetStatusRequest(), metadata=bearer_metadata(TOKEN))
        assert status.queue_size == 0


async def test_probes_stay_open(guarded):
    async with aio.insecure_channel(guarded) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "clotho.v1.GatewayService"):
            check = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
            assert check.status == health_pb2.HealthCheckResponse.SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await asyncio.wait_for(watch.read(), TIMEOUT)).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()

        async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        reflection = reflection_pb2_grpc.ServerReflectionStub(ch)
        async for reply in reflection.ServerReflectionInfo(ask()):
            names = {s.name for s in reply.list_services_response.service}
            assert "clotho.v1.GatewayService" in names and "grpc.health.v1.Health" in names
            break


async def test_gateway_client_with_the_token_submits_and_streams(guarded):
    async with GatewayClient(guarded, token=TOKEN) as client:
        # client.stub rides on the client's channel: the token goes with every call.
        reply = await client.stub.RegisterTrainer(gpb.RegisterTrainerRequest(batch_size=4, num_steps=10))
        assert reply.uuid
        assert (await client.submit([group(1), group(2)])).received == 2
        batches = client.batches(ahead=1)
        batch = await asyncio.wait_for(batches.__anext__(), TIMEOUT)
        assert sorted(g.sequences[0].tokens[0] for g in batch.groups) == [1, 2]
        assert isinstance(batches, AsyncGenerator)
        await batches.aclose()
        assert (await client.stub.GetStatus(gpb.GetStatusRequest())).current_step == 1


async def test_gateway_client_on_a_channel_of_its_callers_sends_the_token(guarded):
    async with aio.insecure_channel(guarded) as ch:
        client = GatewayClient(guarded, channel=ch, token=SecretStr(TOKEN))
        assert (await client.submit([group(3)])).received == 1
        # The caller's own stub calls carry nothing: refused.
        await refused(client.stub.GetStatus(gpb.GetStatusRequest()))
    # bearer_interceptors on a channel of one's own: every call, streams included.
    async with aio.insecure_channel(guarded, interceptors=bearer_interceptors(TOKEN)) as ch:
        stub = gpb_grpc.GatewayServiceStub(ch)
        assert (await stub.GetStatus(gpb.GetStatusRequest())).queue_size == 1
        # A token passed per call as well is not sent twice: the interceptor's wins.
        assert (await stub.GetStatus(gpb.GetStatusRequest(), metadata=bearer_metadata("nope"))).queue_size == 1


async def test_trainer_channel_sends_the_token_on_both_kinds_of_call(guarded):
    # services.common.server.channel is what the trainer opens (with tracing).
    ch = service_channel(guarded, token=SecretStr(TOKEN))
    try:
        stub = gpb_grpc.GatewayServiceStub(ch)
        await stub.RegisterTrainer(gpb.RegisterTrainerRequest(batch_size=2), wait_for_ready=True)
        async with GatewayClient(guarded, token=TOKEN) as client:
            await client.submit([group(5)])
        # As the learner does: a StreamBatches call written to, not fed an iterator.
        call = stub.StreamBatches(wait_for_ready=True)
        await call.write(gpb.StreamBatchesRequest(credits=1))
        batch = await asyncio.wait_for(call.read(), TIMEOUT)
        assert [g.sequences[0].tokens[0] for g in batch.groups] == [5]
        call.cancel()
    finally:
        await ch.close()
    ch = service_channel(guarded)  # no token: refused
    try:
        await refused(gpb_grpc.GatewayServiceStub(ch).GetStatus(gpb.GetStatusRequest()))
    finally:
        await ch.close()


async def test_without_a_token_everything_is_open(open_gateway):
    async with aio.insecure_channel(open_gateway) as ch:
        stub = gpb_grpc.GatewayServiceStub(ch)
        await stub.RegisterTrainer(gpb.RegisterTrainerRequest(batch_size=2))
        assert (await stub.GetStatus(gpb.GetStatusRequest())).queue_size == 0
        call = stub.StreamBatches()
        await call.write(gpb.StreamBatchesRequest(credits=1))
        # A client that sends a token to an open gateway is not refused either.
        async with GatewayClient(open_gateway, token=TOKEN) as client:
            assert (await client.submit([group(7)])).received == 1
        batch = await asyncio.wait_for(call.read(), TIMEOUT)
        assert [g.sequences[0].tokens[0] for g in batch.groups] == [7]
        call.cancel()


def test_trainer_gateway_token_from_flag_and_env(monkeypatch):
    s = load_settings(TrainerSettings, ["--gateway-token", TOKEN])
    assert s.gateway_token is not None
    assert s.gateway_token.get_secret_value() == TOKEN and TOKEN not in repr(s)
    monkeypatch.setenv("CLOTHO_TRAINER_GATEWAY_TOKEN", "from-env")
    token = load_settings(TrainerSettings, []).gateway_token
    assert token is not None
    assert token.get_secret_value() == "from-env"
    monkeypatch.delenv("CLOTHO_TRAINER_GATEWAY_TOKEN")
    assert load_settings(TrainerSettings, []).gateway_token is None


@pytest.mark.parametrize("token", [TOKEN, None])
async def test_learner_with_the_gateway_token_trains_against_a_guarded_gateway(tiny_model_dir, guarded, token):
    from services.trainer.learner import Learner
    from trainer_fakes import toy_batch

    settings = TrainerSettings(
        model_path=str(tiny_model_dir),
        gateway=guarded,
        gateway_token=token,
        inference=[],
        batch_size=4,
        num_steps=1,
        checkpoint_dir="",
    )
    learner = Learner(settings, out=io.StringIO())
    if token is None:
        # No token: the trainer's first call is refused and it stops with that error.
        await refused(learner.run())
        return
    async with GatewayClient(guarded, token=TOKEN) as client:
        assert (await client.submit(toy_batch(n_groups=2, group_size=2))).received == 2
    await asyncio.wait_for(learner.run(), 120)
    assert learner.step == 1


async def test_the_gateway_process_answers_413_on_v1_in_openai_shape():
    """create_server puts the /v1 error shaping outside the body limit (HTTP side)."""
    import httpx

    async with running_server(TOKEN, max_body_bytes=1024) as server:
        http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.http_port}", timeout=TIMEOUT)
        async with http:
            r = await http.post("/v1/completions", json={"prompt": "x" * 2000})
            assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
            assert "max_body_bytes (1024)" in r.json()["error"]["message"]
            # The trajectory routes keep the gateway's shape, and the token check first.
            assert (await http.post("/scored_data", content=b"x" * 2000)).status_code == 401
            r = await http.post("/scored_data", content=b"x" * 2000, headers={"Authorization": f"Bearer {TOKEN}"})
            assert r.status_code == 413 and r.json()["code"] == "RESOURCE_EXHAUSTED"
