"""Who may call a service: the service token, TLS, and where a service may listen.

- **Service token.** InferenceService and TrainerService refuse, UNAUTHENTICATED, every
  call without metadata `authorization: Bearer <service_token>` (`BearerInterceptor`, the
  first interceptor of the server skeleton, so a refused call runs nothing else).
  `grpc.health.v1.Health` and server reflection stay open for probes. The trainer and the
  gateway present the same token to the inference services (`Access.channel`).
- **TLS.** With `tls_cert_file` and `tls_key_file` a server listens with TLS; with
  `tls_ca_file` as well it requires client certificates signed by that CA (mTLS). A
  process that calls others opens TLS channels when it has `tls_ca_file` (verifying the
  servers against it) and presents its own certificate when it has one. TLS is one
  setting for a whole mesh: every service gets the same three files.
- **Exposure.** A service that would listen beyond loopback without a token refuses to
  start (`check_exposure`) unless `insecure` is set in so many words.

Tokens come from `CLOTHO_*` variables or `*_token_file` settings (services/common/
settings.py reads the files), so none is ever needed on a command line.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeAlias

import grpc
from grpc import aio

from clotho.client import plain_token

log = logging.getLogger(__name__)

# Probes and tooling: the only services a guarded gRPC server leaves open.
OPEN_GRPC_SERVICES = frozenset(
    {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"}
)


class ExposureRefused(ValueError):
    """A service would listen beyond loopback with nobody asked for a token."""


def parse_bearer(value: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` value, None for anything else."""
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def grpc_bearer(metadata: Iterable[Any] | None) -> str | None:
    """The bearer token in a call's invocation metadata, if any."""
    for key, value in metadata or ():
        if key == "authorization":
            return parse_bearer(value.decode("latin-1") if isinstance(value, bytes) else value)
    return None


def token_matches(given: str | None, expected: str) -> bool:
    """Constant-time comparison; a missing token never matches."""
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


# A method handler (generic only to the type checker).
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


def refusal(handler: Handler, message: str) -> Handler:
    """A handler of the same kind as `handler` that ends the call UNAUTHENTICATED. The
    streaming ones are async generators, as the tracing interceptor expects."""

    async def unary(_request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def streaming(_request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - never reached; makes this an async generator

    serde = (handler.request_deserializer, handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, *serde)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, *serde)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming, *serde)
    return grpc.stream_stream_rpc_method_handler(streaming, *serde)


# For a method ("/package.Service/Method"): the token it needs (None: open) and the
# setting that holds it, named in refusals ("service_token").
TokenRule = Callable[[str], tuple[str | None, str]]


class BearerInterceptor(aio.ServerInterceptor):
    """Refuses, UNAUTHENTICATED, every call that does not carry the token `rule` asks of
    its method, except calls to the open services (health, reflection). Fails closed: a
    service added to the server later is guarded like the others."""

    def __init__(self, rule: TokenRule, whose: str = "the") -> None:
        self._rule = rule
        self._whose = whose

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or method.lstrip("/").partition("/")[0] in OPEN_GRPC_SERVICES:
            return handler
        expected, setting = self._rule(method)
        if expected is None:
            return handler
        given = grpc_bearer(handler_call_details.invocation_metadata)
        if token_matches(given, expected):
            return handler
        message = (
            f"missing bearer token: {method} needs metadata 'authorization: Bearer <{setting}>'"
            if given is None
            else f"wrong bearer token for {method} ({self._whose} {setting})"
        )
        return refusal(handler, message)


class AccessSettings(Protocol):
    """The settings fields `Access.from_settings` reads (every ServiceSettings has them)."""

    service_token: Any
    tls_cert_file: str | None
    tls_key_file: str | None
    tls_ca_file: str | None
    insecure: bool


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name) only ever reaches this machine."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos)


def _read(path: str | None) -> bytes | None:
    return Path(path).expanduser().read_bytes() if path else None


@dataclass(frozen=True)
class Access:
    """One process's credentials: the token it checks and presents, its TLS material."""

    token: str | None = None
    cert: bytes | None = None
    key: bytes | None = None
    ca: bytes | None = None
    insecure: bool = False

    @classmethod
    def from_settings(cls, settings: AccessSettings) -> Access:
        if bool(settings.tls_cert_file) != bool(settings.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together: set both or neither")
        return cls(
            token=plain_token(settings.service_token),
            cert=_read(settings.tls_cert_file),
            key=_read(settings.tls_key_file),
            ca=_read(settings.tls_ca_file),
            insecure=settings.insecure,
        )

    def server_interceptors(self) -> list[aio.ServerInterceptor]:
        """The service-token check (none without a token), for build_server."""
        token = self.token
        if token is None:
            return []
        return [BearerInterceptor(lambda _method: (token, "service_token"))]

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """TLS for the listening port when a certificate is set (client certificates
        required when a CA is set too); None listens in plaintext."""
        if self.cert is None or self.key is None:
            return None
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca, require_client_auth=self.ca is not None
        )

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """TLS for outgoing channels when a CA is set (this process's certificate rides
        along for mTLS); None dials in plaintext."""
        if self.ca is None:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )

    def channel(self, target: str, options: Sequence[tuple[str, Any]] | None = None) -> aio.Channel:
        """A channel to another service of the mesh presenting this process's token."""
        from services.common.server import channel

        return channel(target, token=self.token, credentials=self.channel_credentials(), options=options)

    def check_exposure(self, service: str, hosts: Iterable[str]) -> None:
        """Refuse to listen beyond loopback without a token unless told `insecure`."""
        exposed = sorted({h for h in hosts if not is_loopback(h)})
        if not exposed or self.token is not None:
            return
        if self.insecure:
            log.warning("%s listens on %s with no service token (--insecure)", service, ", ".join(exposed))
            return
        raise ExposureRefused(
            f"{service} would listen on {', '.join(exposed)}, beyond loopback, with no service token: "
            f"set CLOTHO_{service.upper()}_SERVICE_TOKEN (or --service-token-file FILE), bind 127.0.0.1, "
            "or pass --insecure to accept that anyone who reaches the port may call it"
        )


__all__ = [
    "OPEN_GRPC_SERVICES",
    "Access",
    "BearerInterceptor",
    "ExposureRefused",
    "grpc_bearer",
    "is_loopback",
    "parse_bearer",
    "refusal",
    "token_matches",
]
