"""Wiring of the inference service: shards (torch engines or SGLang servers) + servicer on
the common gRPC server skeleton, with gRPC health per shard."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, fields

from grpc_health.v1 import health_pb2

from clotho.v1 import inference_service_pb2 as pb
from clotho.v1 import inference_service_pb2_grpc as pb_grpc
from services.common.access import Access
from services.common.metrics import MetricsEndpoint, serve_metrics
from services.common.server import GrpcServer, build_server, run_service
from services.common.telemetry import setup_tracing
from services.inference.metrics import InferenceMetrics
from services.inference.servicer import InferenceServicer
from services.inference.settings import InferenceSettings
from services.inference.shard import Shard
from services.inference.shard_set import ShardSet
from services.inference.torch_engine.engine import engine_from_settings
from services.inference.torch_engine.loader import WeightReceiver
from services.inference.torch_engine.shard import TorchShard

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name


def shard_health_name(index: int) -> str:
    """The gRPC health service name of shard `index`."""
    return f"{SERVICE_NAME}/shard-{index}"


@dataclass
class InferenceGrpcServer(GrpcServer):
    """The bound server plus the servicer whose shards must be started and stopped with it."""

    servicer: InferenceServicer | None = None
    accepting: bool = False

    async def set_serving(self, serving: bool) -> None:
        """SERVING follows the shards: each shard's own health name, and the service (and
        "") while at least one shard serves. NOT_SERVING (shutdown) covers them all."""
        self.accepting = serving
        await self.refresh_health()

    async def refresh_health(self) -> None:
        if self.servicer is None:
            await super().set_serving(self.accepting)
            return
        shards = self.servicer.shards.shards
        for i, shard in enumerate(shards):
            await self.health.set(shard_health_name(i), _status(self.accepting and shard.serving))
        overall = _status(self.accepting and any(s.serving for s in shards))
        for name in ["", *self.service_names]:
            await self.health.set(name, overall)

    async def shutdown(self, grace_seconds: float) -> None:
        """Let in-flight RPCs finish, then stop every shard (SIGTERM order)."""
        await self.server.stop(grace_seconds)
        if self.servicer is not None:
            await self.servicer.close()


def _status(serving: bool) -> int:
    return health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING


def build_shards(settings: InferenceSettings) -> list[Shard]:
    """The shards the settings describe (SGLang servers are launched or attached in
    `start`, not here)."""
    if settings.engine == "sglang":
        # Imported here: the SGLang adapter needs nothing from sglang itself, but keeps the
        # torch-only path free of its HTTP machinery.
        from services.inference.sglang_server.shard import sglang_shards_from_settings

        return [*sglang_shards_from_settings(settings)]
    shards: list[Shard] = []
    for i, device in enumerate(settings.torch_devices()):
        engine = engine_from_settings(settings, device=device)
        name = f"torch-{i}@{device}"
        receiver = WeightReceiver(engine, settings.weight_update_timeout_seconds, name=name)
        shards.append(TorchShard(engine, receiver, name=name, stall_seconds=settings.engine_stall_seconds))
    return shards


def create_server(settings: InferenceSettings) -> tuple[InferenceGrpcServer, int]:
    """Load the model(s), start the engine threads and bind (not start) the gRPC server.
    Raises ExposureRefused before loading anything when the bind would be unsafe."""
    access = Access.from_settings(settings)
    access.check_exposure("inference", [settings.host])
    model_name = settings.served_model_name()
    model_path = settings.resolved_model_path()
    shard_set = ShardSet(build_shards(settings))
    first = shard_set.shards[0]
    eos = first.engine.eos_token_id if isinstance(first, TorchShard) else _eos_token_id(str(model_path))
    servicer = InferenceServicer(shard_set, model_name=model_name, eos_token_id=eos)
    servicer.metrics = InferenceMetrics(shard_set)
    base = build_server(
        settings.host,
        settings.grpc_port,
        [(pb_grpc.add_InferenceServiceServicer_to_server, servicer, SERVICE_NAME)],
        interceptors=access.server_interceptors(),
        credentials=access.server_credentials(),
    )
    server = InferenceGrpcServer(**{f.name: getattr(base, f.name) for f in fields(GrpcServer)}, servicer=servicer)
    pending: set[asyncio.Task] = set()

    def on_health(_index: int, _serving: bool) -> None:
        # Shards report from the event loop; the health servicer's setter is a coroutine.
        task = asyncio.get_running_loop().create_task(server.refresh_health())
        pending.add(task)
        task.add_done_callback(pending.discard)

    shard_set.set_health_listener(on_health)
    return server, server.port


def _eos_token_id(model_path: str) -> int:
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    if tok.eos_token_id is not None:
        return int(tok.eos_token_id)
    eos = getattr(AutoConfig.from_pretrained(model_path), "eos_token_id", None)
    return int(eos[0] if isinstance(eos, (list, tuple)) else eos) if eos is not None else -1


async def serve(settings: InferenceSettings) -> None:
    """Run until SIGTERM/SIGINT."""
    setup_tracing("clotho-inference")
    server, _port = create_server(settings)
    assert server.servicer is not None
    metrics: MetricsEndpoint | None = None
    try:
        if settings.metrics_port and server.servicer.metrics is not None:
            metrics = serve_metrics(settings.host, settings.metrics_port, server.servicer.metrics.registry)
        await server.servicer.start()
    except BaseException:
        await server.servicer.close()
        if metrics is not None:
            metrics.close()
        raise
    try:
        await run_service(
            server,
            settings.grace_seconds,
            settings.ready_file,
            extra_ready={
                "model_name": settings.served_model_name(),
                "engine": settings.engine,
                "shards": len(server.servicer.shards),
                **({"metrics_port": metrics.port} if metrics is not None else {}),
            },
            on_stop=lambda: server.shutdown(settings.grace_seconds),
            spans_from_loop=True,
        )
    finally:
        if metrics is not None:
            metrics.close()


__all__ = ["InferenceGrpcServer", "build_shards", "create_server", "serve", "shard_health_name"]
