"""Several inference services behind one real gateway process: calls go to the least
loaded target, a target that reports NOT_SERVING (through grpc.health Watch, or Check
where Watch fails) or dies is taken out (and a dead one costs no request: the call is
retried elsewhere), a restarted one comes back, and with none healthy every inference
route answers a clear 503."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable

import grpc
import httpx
import pytest
import pytest_asyncio
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from clotho.v1 import inference_service_pb2 as ipb
from clotho.v1 import inference_service_pb2_grpc as ipb_grpc
from services.demo.tiny_model import SPECIAL_TOKENS, build_tokenizer

EOS = SPECIAL_TOKENS.index("<eos>")
SERVICE = "clotho.v1.InferenceService"
pytestmark = pytest.mark.asyncio(loop_scope="module")


class FakeShard(ipb_grpc.InferenceServiceServicer):
    """Answers [its number, eos]; while `gate` is set, Generate waits for it to open."""

    def __init__(self, number: int, model_path: str) -> None:
        self.number = number
        self.model_path = model_path
        self.calls = 0
        self.gate: asyncio.Event | None = None

    async def GetModelInfo(self, request, context):
        return ipb.GetModelInfoResponse(
            model_name="tiny",
            model_path=self.model_path,
            max_context_len=64,
            eos_token_id=EOS,
            engine="fake",
            shard_count=1,
        )

    async def Generate(self, request, context):
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        yield ipb.GenerateResponse(
            completion=ipb.Completion(
                output_ids=[10 + self.number, EOS],
                output_logprobs=[-0.1, -0.2],
                finish_reason=ipb.FINISH_REASON_STOP,
                matched_stop=str(EOS),
            )
        )


class CheckOnlyHealth(health.aio.HealthServicer):
    """A health service whose Watch fails, as behind an interceptor that cannot carry
    it: the gateway must fall back to polling Check."""

    async def Watch(self, request, context):
        await context.abort(grpc.StatusCode.UNKNOWN, "Watch is broken here")


class Shard:
    """A FakeShard on its own gRPC server with grpc.health, restartable on its port."""

    def __init__(self, number: int, model_path: str, health_class=health.aio.HealthServicer) -> None:
        self.fake = FakeShard(number, model_path)
        self.health_class = health_class
        self.port = 0
        self.server: aio.Server | None = None
        self.health: health.aio.HealthServicer | None = None

    async def start(self) -> None:
        self.server = aio.server()
        ipb_grpc.add_InferenceServiceServicer_to_server(self.fake, self.server)
        self.health = self.health_class()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        await self.server.start()
        await self.set_serving(True)

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        assert self.health is not None
        await self.health.set(SERVICE, status)

    async def stop(self) -> None:
        assert self.server is not None
        await self.server.stop(0)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shards(tmp_path_factory):
    model_path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(model_path)
    # Shard 0 can only be polled (Check); the others are watched (Watch).
    shards = [Shard(0, str(model_path), CheckOnlyHealth), Shard(1, str(model_path)), Shard(2, str(model_path))]
    for shard in shards:
        await shard.start()
    yield shards
    for shard in shards:
        await shard.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(shards, tmp_path_factory, service_process):
    targets = ",".join(s.address for s in shards)
    workdir = tmp_path_factory.mktemp("gateway")
    args = [
        "--http-port",
        "0",
        "--grpc-port",
        "0",
        "--inference",
        targets,
        "--grace-seconds",
        "1",
        "--inference-eject-seconds",
        "60",
        "--data-dir",
        str(workdir / "store"),
    ]
    async with service_process("services.gateway", args, workdir) as (_, ready):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ready['http_port']}", timeout=30) as http:
            yield http


async def wait_for(condition: Callable[[], object], what: str, deadline: float = 20.0) -> None:
    """Poll a condition (sync or async) until it holds; fail after the deadline."""
    end = time.monotonic() + deadline
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def health_of(http: httpx.AsyncClient) -> dict[str, dict]:
    r = await http.get("/health")
    return {t["target"]: t for t in r.json()["targets"]} if r.status_code == 200 else {}


async def generate(http: httpx.AsyncClient) -> httpx.Response:
    return await http.post("/generate", json={"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 2}})


async def test_calls_go_to_the_least_loaded_target(shards, gateway):
    gates = [asyncio.Event() for _ in shards]
    for shard, gate in zip(shards, gates):
        shard.fake.gate, shard.fake.calls = gate, 0
    try:
        pending = []
        for k in range(3):
            pending.append(asyncio.create_task(generate(gateway)))

            def arrived(k: int = k) -> bool:
                return sum(s.fake.calls for s in shards) == k + 1

            await wait_for(arrived, f"call {k} to arrive")
        # Three calls in flight, one on each target.
        assert [s.fake.calls for s in shards] == [1, 1, 1]
        # Target 1 finishes; it is now the least loaded and takes the next call.
        gates[1].set()
        (finished,), _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        pending.remove(finished)
        assert finished.result().json()["output_ids"] == [11, EOS]
        pending.append(asyncio.create_task(generate(gateway)))
        await wait_for(lambda: sum(s.fake.calls for s in shards) == 4, "the fourth call")
        assert [s.fake.calls for s in shards] == [1, 2, 1]
    finally:
        for gate in gates:
            gate.set()
        for shard in shards:
            shard.fake.gate = None
    results = await asyncio.gather(*pending)
    assert sorted(r.json()["output_ids"][0] for r in results) == [10, 11, 12]


async def test_idle_targets_share_calls_round_robin(shards, gateway):
    for shard in shards:
        shard.fake.calls = 0
    for _ in range(6):
        assert (await generate(gateway)).status_code == 200
    assert [s.fake.calls for s in shards] == [2, 2, 2]


async def test_not_serving_target_is_taken_out_and_brought_back(shards, gateway):
    down = shards[0]
    await down.set_serving(False)

    async def reported_down() -> bool:
        return (await health_of(gateway)).get(down.address, {}).get("healthy") is False

    await wait_for(reported_down, "the gateway to see NOT_SERVING")
    assert "NOT_SERVING" in (await health_of(gateway))[down.address]["reason"]
    down.fake.calls = 0
    for _ in range(4):
        assert (await generate(gateway)).status_code == 200
    assert down.fake.calls == 0

    await down.set_serving(True)

    async def reported_up() -> bool:
        return (await health_of(gateway)).get(down.address, {}).get("healthy") is True

    await wait_for(reported_up, "the gateway to see SERVING again")
    for _ in range(3):
        await generate(gateway)
    assert down.fake.calls == 1


async def test_a_dead_target_costs_no_request_and_is_reprobed_after_restart(shards, gateway):
    dead = shards[2]
    await dead.stop()
    # Whether or not the gateway noticed yet, every call succeeds: one that meets the
    # dead target is retried on another.
    for _ in range(6):
        r = await generate(gateway)
        assert r.status_code == 200 and r.json()["output_ids"][0] in (10, 11)

    async def reported_down() -> bool:
        return (await health_of(gateway)).get(dead.address, {}).get("healthy") is False

    await wait_for(reported_down, "the dead target to be reported")

    await dead.start()  # same port

    async def reported_up() -> bool:
        return (await health_of(gateway)).get(dead.address, {}).get("healthy") is True

    # Back well before the 60 s failure ejection ends: its health stream said SERVING.
    await wait_for(reported_up, "the restarted target to be re-probed")
    dead.fake.calls = 0
    for _ in range(3):
        await generate(gateway)
    assert dead.fake.calls == 1


async def test_no_healthy_target_is_a_clear_503_on_every_inference_route(shards, gateway):
    for shard in shards:
        await shard.set_serving(False)
    try:

        async def all_down() -> bool:
            return (await gateway.get("/health")).status_code == 503

        await wait_for(all_down, "every target to be reported down")
        r = await generate(gateway)
        assert r.status_code == 503
        body = r.json()
        assert body["code"] == "UNAVAILABLE" and body["error"].startswith("no healthy inference service")
        assert all(s.address in body["error"] for s in shards) and "NOT_SERVING" in body["error"]

        r = await gateway.post("/generate", json={"input_ids": [5], "stream": True})
        assert r.status_code == 503 and r.json()["code"] == "UNAVAILABLE"

        for route, payload in [
            ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}),
            ("/v1/completions", {"model": "tiny", "prompt": "hi", "stream": True}),
        ]:
            r = await gateway.post(route, json=payload)
            assert r.status_code == 503, r.text
            error = r.json()["error"]
            assert error["type"] == "server_error" and "no healthy inference service" in error["message"]
    finally:
        for shard in shards:
            await shard.set_serving(True)
