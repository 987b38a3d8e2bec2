"""The one gRPC server skeleton every service uses.

`build_server` makes a grpc.aio server (with a service's own interceptors, such as the
service-token check), registers the services, grpc.health.v1 and reflection with each
method handler wrapped once (errors into statuses, server spans:
services/common/method_handlers.py), binds it (with
TLS when given server credentials, see services/common/access.py) and returns it with
its port. `run_service` starts it, announces readiness, and on
SIGTERM/SIGINT flips health to NOT_SERVING and stops with a grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from services.common.method_handlers import Registrar
from services.common.telemetry import export_on_loop, shutdown_tracing, stop_loop_export

log = logging.getLogger(__name__)

# Large enough for a batch of long sequences; weights never travel over gRPC.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
# How long a stopping service waits for the span batch its loop is sending.
SPANS_IN_FLIGHT_WAIT = 5.0
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
]


@dataclass
class GrpcServer:
    """A bound, not yet started server and the pieces its lifecycle needs."""

    server: aio.Server
    port: int
    health: health.aio.HealthServicer
    service_names: list[str] = field(default_factory=list)

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            await self.health.set(name, status)


def build_server(
    host: str,
    port: int,
    register: Iterable[tuple[Callable[[Any, aio.Server], None], Any, str]],
    interceptors: Sequence[aio.ServerInterceptor] = (),
    credentials: grpc.ServerCredentials | None = None,
) -> GrpcServer:
    """Create and bind a server. `register` holds (add_XServicer_to_server, servicer,
    full service name) triples. `interceptors` run first, in order, before the wrapped
    method handler (an auth check there refuses a call before anything else runs).
    `credentials`: TLS for the port; None listens in plaintext."""
    server = aio.server(interceptors=list(interceptors) or None, options=GRPC_OPTIONS)
    registrar: Any = Registrar(server)
    names = []
    for add, servicer, name in register:
        add(servicer, registrar)
        names.append(name)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, registrar)
    # What reflection.enable_server_reflection does for an aio server, through the registrar.
    reflected = [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflection.aio.ReflectionServicer(reflected), registrar)
    address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"could not bind gRPC server to {host}:{port}")
    return GrpcServer(server=server, port=bound, health=health_servicer, service_names=names)


def announce_ready(ready_file: str | None, **ports: Any) -> None:
    """Tell whoever started us where we listen: a JSON line on stdout and, if asked, a
    file written atomically."""
    line = json.dumps({"event": "ready", **ports})
    print(line, flush=True)
    if ready_file:
        path = Path(ready_file)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(line + "\n")
        tmp.replace(path)


async def run_service(
    grpc_server: GrpcServer,
    grace_seconds: float,
    ready_file: str | None = None,
    extra_ready: dict[str, Any] | None = None,
    on_stop: Callable[[], Awaitable[None]] | None = None,
    background: Callable[[asyncio.Event], Coroutine[Any, Any, None]] | None = None,
    spans_from_loop: bool = False,
) -> None:
    """Start, announce, wait for SIGTERM/SIGINT (or `background` to finish), stop.

    `spans_from_loop`: a service whose requests all run on this loop exports its spans
    from it (telemetry.export_on_loop: no exporter thread beside the requests); the
    batch in flight is sent before tracing is shut down."""
    if spans_from_loop:
        export_on_loop()
    await grpc_server.server.start()
    await grpc_server.set_serving(True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    announce_ready(ready_file, grpc_port=grpc_server.port, **(extra_ready or {}))
    task: asyncio.Task[None] | None = None
    if background is not None:
        task = asyncio.create_task(background(stop))
        task.add_done_callback(lambda _t: stop.set())
    await stop.wait()
    log.info("stopping: health NOT_SERVING, grace %.1fs", grace_seconds)
    await grpc_server.set_serving(False)
    if task is not None and not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if on_stop is not None:
        await on_stop()
    await grpc_server.server.stop(grace_seconds)
    # Past the wait, shutdown_tracing sends the loop's batch itself (it may then
    # reach the collector twice, never not at all).
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop_loop_export(), SPANS_IN_FLIGHT_WAIT)
    shutdown_tracing()
    if task is not None and task.done() and not task.cancelled():
        failure = task.exception()
        if failure is not None:
            raise failure


def run_main(coro_factory: Callable[[], Coroutine[Any, Any, None]], log_level: str = "INFO") -> None:
    """Run a service's main coroutine on uvloop (asyncio where uvloop is missing)."""
    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        import uvloop

        uvloop.run(coro_factory())
    except ImportError:
        asyncio.run(coro_factory())


def channel(
    target: str,
    token: Any = None,
    credentials: grpc.ChannelCredentials | None = None,
    options: Sequence[tuple[str, Any]] | None = None,
) -> aio.Channel:
    """A grpc.aio channel with the tracing interceptors and message limits (or
    `options`); with a `token` (str or SecretStr) every call carries `authorization:
    Bearer <token>`; with `credentials` it speaks TLS, else plaintext."""
    from clotho.client import bearer_interceptors
    from services.common.telemetry import client_interceptors

    interceptors = [*client_interceptors(), *bearer_interceptors(token)]
    opts = list(GRPC_OPTIONS if options is None else options)
    if credentials is not None:
        return aio.secure_channel(target, credentials, options=opts, interceptors=interceptors)
    return aio.insecure_channel(target, options=opts, interceptors=interceptors)


__all__ = ["GrpcServer", "announce_ready", "build_server", "channel", "grpc", "run_main", "run_service"]
