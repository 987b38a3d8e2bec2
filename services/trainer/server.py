"""The trainer process: TrainerService over gRPC with the learner loop beside it."""

from __future__ import annotations

from clotho.v1 import trainer_service_pb2_grpc as pb_grpc
from services.common.server import GrpcServer, build_server, run_service
from services.common.telemetry import setup_tracing
from services.trainer.learner import Learner
from services.trainer.policy_state import PolicyState
from services.trainer.servicer import TrainerServicer
from services.trainer.settings import TrainerSettings

SERVICE_NAME = "clotho.v1.TrainerService"


def create_server(settings: TrainerSettings, state: PolicyState | None = None) -> tuple[GrpcServer, int]:
    """A bound, not yet started server serving `state` (a fresh one if not given)."""
    servicer = TrainerServicer(state if state is not None else PolicyState())
    grpc_server = build_server(
        settings.host,
        settings.grpc_port,
        [(pb_grpc.add_TrainerServiceServicer_to_server, servicer, SERVICE_NAME)],
    )
    return grpc_server, grpc_server.port


async def serve(settings: TrainerSettings) -> None:
    """Serve until SIGTERM, or until the learner has taken `num_steps` steps."""
    setup_tracing("clotho-trainer")
    state = PolicyState()
    grpc_server, _port = create_server(settings, state)
    learner = Learner(settings, state)
    await run_service(
        grpc_server,
        settings.grace_seconds,
        settings.ready_file,
        on_stop=learner.close,
        background=learner.run,
    )
