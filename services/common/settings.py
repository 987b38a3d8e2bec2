"""Typed settings shared by every service: loaded from flags and CLOTHO_* env vars."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import BeforeValidator, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, CliApp, NoDecode, SettingsConfigDict

T = TypeVar("T", bound="ServiceSettings")


def split_targets(value: Any) -> Any:
    """host:port lists arrive from flags and env vars as one string: a JSON list or
    comma-separated; a repeated flag may itself carry comma-separated targets."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return split_targets(json.loads(text))
        return [part.strip() for part in text.split(",") if part.strip()]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in (split_targets(item) if isinstance(item, str) else [item])]
    return value


# A list of gRPC targets; NoDecode keeps pydantic-settings from insisting on JSON.
Targets = Annotated[list[str], NoDecode, BeforeValidator(split_targets)]


class ServiceSettings(BaseSettings):
    """Fields every gRPC service has. Subclasses set their own env prefix."""

    model_config = SettingsConfigDict(
        env_prefix="CLOTHO_",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_prog_name="clotho",
        extra="ignore",
    )

    host: str = Field("127.0.0.1", description="Address the gRPC server binds.")
    grpc_port: int = Field(0, description="gRPC port; 0 picks a free one (printed when ready).")
    grace_seconds: float = Field(5.0, description="Seconds in-flight RPCs get to finish on SIGTERM.")
    log_level: str = Field("INFO", description="Python logging level.")
    ready_file: str | None = Field(
        None,
        description="If set, a JSON line with the bound ports is written here once serving "
        "(the clotho launcher reads it).",
    )
    threads: int = Field(
        0,
        ge=0,
        description="CPU threads this process's compute may use (torch intra-op and inter-op "
        "pools, OpenMP/MKL and the tokenizers' pool, also for its children); 0 keeps the "
        "libraries' defaults (every core). `clotho up` divides the machine's cores among "
        "its processes.",
    )
    nice: int = Field(
        0,
        ge=0,
        le=19,
        description="Lower this process's CPU priority by this much (Unix nice) when it starts, so "
        "that where processes share cores the others' work comes first; `clotho up` lowers the "
        "inference service's when the trainer and the inference service share the cores.",
    )
    service_token: SecretStr | None = Field(
        None,
        description="The mesh's service token: every call to InferenceService and TrainerService "
        "must carry 'authorization: Bearer <token>' (grpc.health and reflection stay open), and "
        "the trainer and the gateway present it to the inference services. Set it through the "
        "environment (CLOTHO_INFERENCE_SERVICE_TOKEN, CLOTHO_TRAINER_SERVICE_TOKEN, "
        "CLOTHO_GATEWAY_SERVICE_TOKEN) or service_token_file, not on a command line. Unset: no "
        "check, which is refused beyond loopback unless --insecure.",
    )
    service_token_file: str | None = Field(
        None, description="A file holding service_token (surrounding whitespace ignored)."
    )
    tls_cert_file: str | None = Field(
        None,
        description="PEM certificate chain this service listens with (TLS; needs tls_key_file); also "
        "presented as the client certificate when tls_ca_file is set (mTLS).",
    )
    tls_key_file: str | None = Field(None, description="PEM private key of tls_cert_file.")
    tls_ca_file: str | None = Field(
        None,
        description="PEM CA bundle: channels to other services speak TLS and verify them against it, "
        "and a server with a certificate requires client certificates signed by it (mTLS).",
    )
    insecure: bool = Field(
        False,
        description="Allow the inference service and the trainer to listen beyond loopback "
        "(--host 0.0.0.0, a LAN address; the trainer's --sync-address too) without a service "
        "token; without it they refuse to start. The gateway's own routes are guarded by its "
        "trajectory and inference tokens instead.",
    )

    @model_validator(mode="after")
    def _tokens_from_files(self) -> ServiceSettings:
        """Every `X_token_file` field fills its `X_token` field (giving both is an error)."""
        for name in type(self).model_fields:
            if not name.endswith("_token_file"):
                continue
            path, target = getattr(self, name), name.removesuffix("_file")
            if not path:
                continue
            if getattr(self, target, None) is not None:
                raise ValueError(f"{target} and {name} are both set; give one")
            token = Path(path).expanduser().read_text().strip()
            if not token:
                raise ValueError(f"{name} {path!r} is empty")
            setattr(self, target, SecretStr(token))
        return self


# Environment variables through which the libraries a service loads size their pools.
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS")


def apply_thread_budget(threads: int) -> None:
    """Limit this process's compute to `threads` CPU threads (0: leave the defaults).

    The environment variables reach libraries not loaded yet (torch reads
    OMP_NUM_THREADS when it is imported) and child processes; torch, when already
    imported, is told directly. Its inter-op pool can be sized only before its first
    parallel work: later calls keep the size it has."""
    if threads <= 0:
        return
    for name in THREAD_ENV_VARS:
        os.environ[name] = str(threads)
    torch = sys.modules.get("torch")
    if torch is None:
        return
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:
        pass


def apply_nice(increment: int) -> None:
    """Lower this process's CPU priority by `increment` (0: unchanged). On Linux the
    priority is per thread and inherited by threads started later: call it before the
    compute pools start (load_settings does)."""
    if increment > 0 and hasattr(os, "nice"):
        os.nice(increment)


def load_settings(cls: type[T], argv: Sequence[str] | None = None) -> T:
    """Build `cls` from CLOTHO_* env vars, overridden by command-line flags in `argv`,
    and apply its thread budget and priority (a service loads its settings once, before
    any work)."""
    settings = CliApp.run(cls, cli_args=list(argv or []))
    apply_thread_budget(settings.threads)
    apply_nice(settings.nice)
    return settings
