"""The common server skeleton: health (Check and Watch), reflection, and domain errors
mapped to status codes, on a real grpc.aio server on loopback."""

from __future__ import annotations

import asyncio

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clotho.v1 import trainer_service_pb2 as pb
from clotho.v1 import trainer_service_pb2_grpc as pb_grpc
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.server import build_server


class Servicer(pb_grpc.TrainerServiceServicer):
    async def GetPolicy(self, request, context):
        raise InvalidArgument("version must be positive")

    async def WatchPolicy(self, request, context):
        yield pb.WatchPolicyResponse()
        raise FailedPrecondition("no trainer step yet")


async def test_health_errors_and_streams() -> None:
    srv = build_server(
        "127.0.0.1", 0, [(pb_grpc.add_TrainerServiceServicer_to_server, Servicer(), "clotho.v1.TrainerService")]
    )
    await srv.server.start()
    try:
        await srv.set_serving(True)
        async with aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            check = await health.Check(health_pb2.HealthCheckRequest(service="clotho.v1.TrainerService"))
            assert check.status == health_pb2.HealthCheckResponse.SERVING

            # Watch is a coroutine-style streaming handler: it must pass the error interceptor.
            watch = health.Watch(health_pb2.HealthCheckRequest(service="clotho.v1.TrainerService"))
            first = await asyncio.wait_for(watch.read(), 10)
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            await srv.set_serving(False)
            second = await asyncio.wait_for(watch.read(), 10)
            assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()

            stub = pb_grpc.TrainerServiceStub(ch)
            try:
                await stub.GetPolicy(pb.GetPolicyRequest())
                raise AssertionError("expected INVALID_ARGUMENT")
            except aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "version must be positive" in (exc.details() or "")
            call = stub.WatchPolicy(pb.WatchPolicyRequest())
            assert await call.read() == pb.WatchPolicyResponse()
            try:
                await call.read()
                raise AssertionError("expected FAILED_PRECONDITION")
            except aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        await srv.server.stop(0)
