"""The gateway process: GatewayService over gRPC and the Atropos/SGLang HTTP API over
uvicorn, in one event loop, sharing one TrajectoryState and its durable store.

Lifecycle: the store is opened and read back in create_server (a restart resumes the
queue, registrations and step), its writer thread starts with the servers, and it is
closed (pending commits flushed) only after both servers have stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import uvicorn

from clotho.v1 import gateway_service_pb2_grpc as pb_grpc
from services.common.access import Access
from services.common.server import GrpcServer, build_server, run_service
from services.common.telemetry import setup_tracing
from services.gateway import auth
from services.gateway.atropos_api.routes import close_long_polls
from services.gateway.generation.call_guard import Deadlines
from services.gateway.generation.pool import InferencePool
from services.gateway.generation.routing import Router, call_metadata, open_channel
from services.gateway.http.app import create_app
from services.gateway.rpc.servicer import SERVICE_NAME, GatewayServicer
from services.gateway.settings import GatewaySettings
from services.gateway.trajectory import receipts
from services.gateway.trajectory.state import TrajectoryState
from services.gateway.trajectory.store import open_store
from services.gateway.vocabulary import learn_vocabulary

log = logging.getLogger(__name__)


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without its own signal handlers: the process's SIGTERM handling
    (run_service) decides when HTTP stops."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def bind_http(host: str, port: int) -> socket.socket:
    """A listening socket; binding it here (port 0 included) tells us the real port
    before uvicorn starts, and early clients wait in the backlog."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(1024)
    sock.setblocking(False)
    return sock


@dataclass
class GatewayServer(GrpcServer):
    """The bound gRPC server plus the HTTP side: start() and stop() run both."""

    state: TrajectoryState = field(default_factory=TrajectoryState)
    inference: InferencePool | None = None
    app: Any = None
    http: uvicorn.Server | None = None
    http_socket: socket.socket | None = None
    http_task: asyncio.Task | None = None
    vocabulary_task: asyncio.Task | None = None

    @property
    def http_port(self) -> int:
        assert self.http_socket is not None
        return self.http_socket.getsockname()[1]

    async def start_http(self) -> None:
        assert self.http is not None and self.http_socket is not None
        self.http_task = asyncio.create_task(self.http.serve(sockets=[self.http_socket]))
        if self.inference is not None:
            self.vocabulary_task = asyncio.create_task(learn_vocabulary(self.inference, self.state))

    async def stop_http(self) -> None:
        if self.vocabulary_task is not None:
            self.vocabulary_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.vocabulary_task
        if self.app is not None:
            close_long_polls(self.app)  # waiting /status-env long polls answer now
        if self.http is not None and self.http_task is not None:
            self.http.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await self.http_task
        if self.http_socket is not None:
            self.http_socket.close()
        if self.inference is not None:
            await self.inference.close()

    async def start(self) -> None:
        """Start both servers (tests; the process uses serve())."""
        self.state.store.start()
        await self.server.start()
        await self.set_serving(True)
        await self.start_http()

    async def stop(self, grace: float = 1.0) -> None:
        await self.set_serving(False)
        await self.stop_http()
        await self.server.stop(grace)
        await self.state.store.close()


def create_server(settings: GatewaySettings) -> tuple[GatewayServer, int]:
    """Open the store and bind both servers (nothing runs yet); returns the server and
    its gRPC port."""
    # The receipts the inference routes record into are process-wide.
    receipts.default.capacity = settings.receipt_capacity
    state = TrajectoryState(
        open_store(settings.store, settings.data_dir, settings.store_fsync, settings.receipt_capacity),
        receipts.default,
        max_groups=settings.max_stored_groups,
        max_bytes=settings.max_stored_bytes,
        retry_after_seconds=settings.retry_after_seconds,
        max_staleness=settings.max_staleness,
        staleness_policy=settings.staleness_policy,
        max_kept_batches=settings.max_kept_batches,
        refuse_oversized_groups=settings.refuse_oversized_groups,
    )
    # service_token and TLS towards the inference services; TLS on the gRPC port.
    access = Access.from_settings(settings)
    inference = InferencePool(
        settings.inference,
        settings.tokenizer_path,
        settings.generate_timeout_seconds,
        deadlines=Deadlines(settings.generate_first_token_seconds, settings.generate_idle_seconds),
        router=Router(
            settings.inference,
            eject_seconds=settings.inference_eject_seconds,
            probe_timeout_seconds=settings.inference_probe_timeout_seconds,
            channel_factory=lambda address: open_channel(address, access),
            metadata_factory=lambda: call_metadata(access),
        ),
    )
    servicer = GatewayServicer(state, inference)
    grpc_server = build_server(
        settings.grpc_bind_host,
        settings.grpc_port,
        [(pb_grpc.add_GatewayServiceServicer_to_server, servicer, SERVICE_NAME)],
        interceptors=auth.grpc_interceptors(settings.trajectory_token, settings.inference_token),
        credentials=access.server_credentials(),
    )
    app = create_app(state, inference, settings.max_body_bytes, settings.response_gzip)
    # Outside the body middleware: its 413s on /v1/* leave in OpenAI's error shape.
    auth.install(app, settings.trajectory_token, settings.inference_token)
    sock = bind_http(*settings.http_bind)
    config = uvicorn.Config(
        app,
        log_config=None,
        log_level=settings.log_level.lower(),
        access_log=False,
        lifespan="off",
        # uvicorn annotates int; the value goes to asyncio.timeout, which takes a float.
        timeout_graceful_shutdown=settings.grace_seconds,  # type: ignore[arg-type]
    )
    gateway = GatewayServer(
        server=grpc_server.server,
        port=grpc_server.port,
        health=grpc_server.health,
        service_names=grpc_server.service_names,
        state=state,
        inference=inference,
        app=app,
        http=_EmbeddedUvicorn(config),
        http_socket=sock,
    )
    return gateway, gateway.port


async def serve(settings: GatewaySettings) -> None:
    setup_tracing("clotho-gateway")
    gateway, _ = create_server(settings)
    gateway.state.store.start()
    await gateway.start_http()
    # The tokenizer loads while the rest of the mesh starts, not under the first request.
    inference = gateway.inference
    preload = asyncio.ensure_future(inference.preload_tokenizer()) if inference is not None else None

    async def watch_http(_stop: asyncio.Event) -> None:
        # Ends the process if the HTTP server dies; shielded so that a normal stop
        # lets stop_http shut it down gracefully.
        assert gateway.http_task is not None
        await asyncio.shield(gateway.http_task)
        raise RuntimeError("the HTTP server stopped unexpectedly")

    log.info(
        "gateway: gRPC %s:%d, HTTP %s:%d, store %s%s, inference %s",
        settings.grpc_bind_host,
        gateway.port,
        settings.http_bind[0],
        gateway.http_port,
        settings.store,
        f" in {settings.data_dir}" if settings.store == "sqlite" else "",
        settings.inference or "none",
    )
    try:
        await run_service(
            gateway,
            settings.grace_seconds,
            settings.ready_file,
            extra_ready={"http_port": gateway.http_port},
            on_stop=gateway.stop_http,
            background=watch_http,
            spans_from_loop=True,
        )
    finally:
        if preload is not None:
            preload.cancel()
        await gateway.state.store.close()
