"""The pool's per-call deadlines against in-process gRPC targets: a streaming call whose
target sends no first token in time is retried on another target; one that stalls
mid-stream ends with DeadlineExceeded (504) naming the target; non-streaming calls are
bounded only by the call timeout and the target's liveness."""

from __future__ import annotations

import asyncio
import gc

import pytest
from grpc import aio

from clotho.v1 import inference_service_pb2 as pb
from clotho.v1 import inference_service_pb2_grpc as pb_grpc
from services.common.errors import DeadlineExceeded
from services.gateway.generation.call_guard import CallGuard, Deadlines
from services.gateway.generation.pool import InferencePool


class Target(pb_grpc.InferenceServiceServicer):
    """Generate: `hang_before` waits forever before anything; `hang_after` sends one
    chunk, then waits forever; otherwise a chunk and a completion."""

    def __init__(self, number: int, hang_before: bool = False, hang_after: bool = False) -> None:
        self.number = number
        self.hang_before = hang_before
        self.hang_after = hang_after
        self.calls = 0

    async def Generate(self, request, context):
        self.calls += 1
        if self.hang_before:
            await asyncio.Event().wait()
        yield pb.GenerateResponse(chunk=pb.TokenChunk(token_ids=[self.number], logprobs=[-0.1]))
        if self.hang_after:
            await asyncio.Event().wait()
        yield pb.GenerateResponse(
            completion=pb.Completion(
                output_ids=[self.number], output_logprobs=[-0.1], finish_reason=pb.FINISH_REASON_STOP
            )
        )


@pytest.fixture
async def start_targets():
    servers: list[aio.Server] = []

    async def start(*targets: Target) -> list[str]:
        addresses = []
        for target in targets:
            server = aio.server()
            pb_grpc.add_InferenceServiceServicer_to_server(target, server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            servers.append(server)
            addresses.append(f"127.0.0.1:{port}")
        return addresses

    yield start
    for server in servers:
        await server.stop(0)


async def messages(pool: InferencePool, stream: bool) -> list[pb.GenerateResponse]:
    request = pb.GenerateRequest(input_ids=[1, 2], stream=stream)
    return [m async for m in pool.generate(request)]


async def test_no_first_token_in_time_is_retried_on_another_target(start_targets):
    slow, good = Target(1, hang_before=True), Target(2)
    addresses = await start_targets(slow, good)
    pool = InferencePool(addresses, deadlines=Deadlines(first_token_seconds=0.5, idle_seconds=5))
    try:
        for _ in range(3):
            out = await asyncio.wait_for(messages(pool, stream=True), 10)
            assert out[-1].completion.output_ids == [2]
        assert good.calls == 3 and slow.calls == 1  # ejected after its miss
        status = {t["target"]: t for t in pool.router.status()}
        assert "no first token within 0.5s" in status[addresses[0]]["reason"]
    finally:
        await pool.close()


async def test_a_stall_mid_stream_is_a_deadline_naming_the_target(start_targets):
    stalls = Target(1, hang_after=True)
    (address,) = await start_targets(stalls)
    pool = InferencePool([address], deadlines=Deadlines(first_token_seconds=5, idle_seconds=0.5))
    try:
        with pytest.raises(DeadlineExceeded, match=f"{address} sent nothing for 0.5s mid-stream"):
            await asyncio.wait_for(messages(pool, stream=True), 10)
    finally:
        await pool.close()


async def test_non_streaming_calls_have_no_token_deadlines(start_targets):
    slowish = Target(3)
    (address,) = await start_targets(slowish)
    pool = InferencePool([address], deadlines=Deadlines(first_token_seconds=0.01, idle_seconds=0.01))
    try:
        (completion,) = await asyncio.wait_for(pool.collect(pb.GenerateRequest(input_ids=[1], stream=False)), 10)
        assert completion.output_ids == [3]
    finally:
        await pool.close()


def _alive(kind: type) -> int:
    return sum(1 for o in gc.get_objects() if type(o) is kind)


async def test_finished_calls_are_freed_without_the_cycle_collector(start_targets):
    """A guard lets go of its task when closed, so a finished call (its guard, the gRPC
    call, the request, the cancelled task's traceback) is freed at once, not left for a
    full garbage collection: in a long run those piled up in the oldest generation."""
    (address,) = await start_targets(Target(1))
    pool = InferencePool([address], deadlines=Deadlines(first_token_seconds=5, idle_seconds=5))
    try:
        await messages(pool, stream=True)  # channel and health watcher set up
        gc.collect()
        gc.disable()
        try:
            for stream in (True, False) * 25:
                out = await messages(pool, stream=stream)
                assert out[-1].completion.output_ids == [1]
            await asyncio.sleep(0)  # the last guard's cancelled task finishes
            assert _alive(CallGuard) == 0
            assert _alive(aio.UnaryStreamCall) <= 1
        finally:
            gc.enable()
    finally:
        await pool.close()
