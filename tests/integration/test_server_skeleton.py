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

            # Watch is a coroutine-style streaming handler: its wrapper must be a coroutine too.
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


async def test_servicers_registered_only_as_generic_handlers_are_wrapped_once() -> None:
    """Stubs generated before grpc's registered methods (1.62) only add a generic handler:
    its method handlers reach the server wrapped too (errors mapped), and a method's
    handler is wrapped once, not per call."""
    from services.common.method_handlers import Registrar

    handlers = {
        "GetPolicy": grpc.unary_unary_rpc_method_handler(
            Servicer().GetPolicy, pb.GetPolicyRequest.FromString, pb.GetPolicyResponse.SerializeToString
        )
    }
    generic = grpc.method_handlers_generic_handler("clotho.v1.TrainerService", handlers)
    server = aio.server()
    added: list = []

    class Recording:
        def add_generic_rpc_handlers(self, generic_handlers):
            added.extend(generic_handlers)
            server.add_generic_rpc_handlers(generic_handlers)

    Registrar(Recording()).add_generic_rpc_handlers((generic,))  # type: ignore[arg-type]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.TrainerServiceStub(ch)
            for _ in range(2):
                try:
                    await stub.GetPolicy(pb.GetPolicyRequest())
                    raise AssertionError("expected INVALID_ARGUMENT")
                except aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT  # unwrapped: UNKNOWN
                    assert "version must be positive" in (exc.details() or "")
        (wrapping,) = added
        details = type("Details", (), {"method": "/clotho.v1.TrainerService/GetPolicy", "invocation_metadata": ()})()
        first = wrapping.service(details)
        assert first is not handlers["GetPolicy"] and wrapping.service(details) is first
    finally:
        await server.stop(0)
