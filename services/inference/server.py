"""Wiring of the inference service: engine + weight receiver + servicer on the common
gRPC server skeleton."""

from __future__ import annotations

from dataclasses import dataclass, fields

from clotho.v1 import inference_service_pb2 as pb
from clotho.v1 import inference_service_pb2_grpc as pb_grpc
from services.common.server import GrpcServer, build_server, run_service
from services.common.telemetry import setup_tracing
from services.inference.engine import engine_from_settings
from services.inference.servicer import InferenceServicer
from services.inference.settings import InferenceSettings
from services.inference.weight_receiver import WeightReceiver

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name


@dataclass
class InferenceGrpcServer(GrpcServer):
    """The bound server plus the servicer whose engine thread must be stopped with it."""

    servicer: InferenceServicer | None = None

    async def shutdown(self, grace_seconds: float) -> None:
        """Let in-flight RPCs finish, then stop the engine (SIGTERM order)."""
        await self.server.stop(grace_seconds)
        if self.servicer is not None:
            await self.servicer.close()


def create_server(settings: InferenceSettings) -> tuple[InferenceGrpcServer, int]:
    """Load the model, start the engine thread and bind (not start) the gRPC server."""
    model_name = settings.served_model_name()
    engine = engine_from_settings(settings)
    receiver = WeightReceiver(engine, settings.weight_update_timeout_seconds)
    servicer = InferenceServicer(engine, receiver, model_name)
    base = build_server(
        settings.host,
        settings.grpc_port,
        [(pb_grpc.add_InferenceServiceServicer_to_server, servicer, SERVICE_NAME)],
    )
    server = InferenceGrpcServer(**{f.name: getattr(base, f.name) for f in fields(GrpcServer)}, servicer=servicer)
    return server, server.port


async def serve(settings: InferenceSettings) -> None:
    """Run until SIGTERM/SIGINT."""
    setup_tracing("clotho-inference")
    server, _port = create_server(settings)
    await run_service(
        server,
        settings.grace_seconds,
        settings.ready_file,
        extra_ready={"model_name": settings.served_model_name()},
        on_stop=lambda: server.shutdown(settings.grace_seconds),
    )
