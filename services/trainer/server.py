"""The trainer process: TrainerService over gRPC with the learner loop beside it.

Under torchrun only rank 0 serves and talks to the gateway and the shards; every other
rank loads the same model and follows rank 0's commands (see distributed.py).
"""

from __future__ import annotations

import asyncio
import logging
import signal

from clotho.v1 import trainer_service_pb2_grpc as pb_grpc
from services.common.access import Access
from services.common.metrics import MetricsEndpoint, serve_metrics
from services.common.server import GrpcServer, build_server, run_service
from services.common.telemetry import setup_tracing
from services.trainer import checkpoint
from services.trainer.core import TrainerCore
from services.trainer.distributed import Ranks
from services.trainer.learner import Learner
from services.trainer.metrics import TrainerMetrics
from services.trainer.policy_state import PolicyState
from services.trainer.servicer import TrainerServicer
from services.trainer.settings import TrainerSettings

SERVICE_NAME = "clotho.v1.TrainerService"
log = logging.getLogger(__name__)


def create_server(settings: TrainerSettings, state: PolicyState | None = None) -> tuple[GrpcServer, int]:
    """A bound, not yet started server serving `state` (a fresh one if not given).
    Raises ExposureRefused when the bind would be unsafe."""
    access = check_exposure(settings)
    servicer = TrainerServicer(state if state is not None else PolicyState())
    grpc_server = build_server(
        settings.host,
        settings.grpc_port,
        [(pb_grpc.add_TrainerServiceServicer_to_server, servicer, SERVICE_NAME)],
        interceptors=access.server_interceptors(),
        credentials=access.server_credentials(),
    )
    return grpc_server, grpc_server.port


def check_exposure(settings: TrainerSettings) -> Access:
    """The trainer's credentials, once its listening addresses (gRPC, and the weight
    transfer's rendezvous store and gloo transport) are judged safe."""
    access = Access.from_settings(settings)
    access.check_exposure("trainer", [settings.host, *([settings.sync_address] if settings.inference else [])])
    return access


async def serve(settings: TrainerSettings) -> None:
    """Rank 0: load (or resume), then serve until SIGTERM or until the learner has
    taken `num_steps` steps. Other ranks: follow rank 0."""
    setup_tracing("clotho-trainer")
    ranks = Ranks.from_env(settings.device)
    try:
        if not ranks.is_leader:
            await follow(settings, ranks)
            return
        state = PolicyState()
        learner = Learner(settings, state, ranks=ranks)
        # Loaded before serving, so the first version anyone sees is the restored one.
        await learner.load()
        grpc_server, _port = create_server(settings, state)
        metrics = TrainerMetrics()
        learner.step_listeners.append(metrics.observe)
        endpoint: MetricsEndpoint | None = None
        wandb_run = None
        try:
            if settings.metrics_port:
                endpoint = serve_metrics(settings.host, settings.metrics_port, metrics.registry)
            if settings.wandb:
                from services.trainer.wandb_log import WandbLogger

                config = settings.model_dump(mode="json", exclude={"gateway_token"})
                wandb_run = await asyncio.to_thread(WandbLogger, settings.wandb_project, settings.wandb_group, config)
                learner.step_listeners.append(wandb_run.log)
            await run_service(
                grpc_server,
                settings.grace_seconds,
                settings.ready_file,
                extra_ready={
                    "step": learner.step,
                    "policy_version": state.version,
                    "rank_count": ranks.world_size,
                    **({"metrics_port": endpoint.port} if endpoint is not None else {}),
                },
                on_stop=learner.close,
                background=learner.run,
            )
        finally:
            if wandb_run is not None:
                await asyncio.to_thread(wandb_run.close)
            if endpoint is not None:
                endpoint.close()
    finally:
        ranks.close()


async def follow(settings: TrainerSettings, ranks: Ranks) -> None:
    """A rank > 0: same model, same checkpoint, then rank 0's commands until it stops."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # torchrun forwards signals to every rank; rank 0 saves the final checkpoint
        # with the others' help and then tells them to stop.
        loop.add_signal_handler(sig, lambda: log.info("rank %d: waiting for rank 0 to stop us", ranks.rank))
    core = TrainerCore(settings, ranks)
    resume = checkpoint.latest(settings.checkpoint_dir) if (settings.resume and settings.checkpoint_dir) else None
    await asyncio.to_thread(core.load, resume)
    await asyncio.to_thread(core.follow)
