"""Gateway settings: flags (`--host H --port P`, `--http-port 0`) and CLOTHO_GATEWAY_*
env vars."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings, Targets


class GatewaySettings(ServiceSettings):
    """The gateway: Atropos trajectory API and SGLang-style /generate over HTTP, the
    same trajectory API as clotho.v1.GatewayService over gRPC, in one process."""

    model_config = SettingsConfigDict(
        env_prefix="CLOTHO_GATEWAY_",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_prog_name="python -m services.gateway",
        extra="ignore",
    )

    host: str = Field(
        "127.0.0.1",
        description="Address the HTTP server (the Atropos trajectory API) binds, like run-api's "
        "--host; the gRPC server binds it too unless --grpc-host is set.",
    )
    port: int | None = Field(
        None, ge=0, le=65535, description="HTTP port, like run-api's --port (same as --http-port)."
    )
    grpc_host: str | None = Field(None, description="Address the gRPC server binds; default: --host.")
    http_host: str | None = Field(None, description="Address the HTTP server binds, if not --host.")
    http_port: int = Field(
        8000,
        ge=0,
        le=65535,
        description="HTTP port (Atropos' run-api default is 8000); 0 picks a free one "
        "(printed as http_port when ready). --port, if given, wins.",
    )
    store: Literal["sqlite", "memory"] = Field(
        "sqlite",
        description="Trajectory store: 'sqlite' (durable: acknowledged data, registrations and the "
        "step survive a crash and a restart) or 'memory' (like run-api: gone with the process).",
    )
    data_dir: str = Field(".clotho/gateway", description="Directory of the sqlite store (one gateway per directory).")
    store_fsync: bool = Field(
        False,
        description="fsync every group commit (SQLite synchronous=FULL): survive power loss too, "
        "not only a crash of the process.",
    )
    max_stored_groups: int = Field(
        100_000,
        ge=0,
        description="Capacity in groups (queued, buffered or in a formed batch); past it "
        "/scored_data answers 503 with Retry-After (gRPC RESOURCE_EXHAUSTED). 0: unbounded.",
    )
    max_kept_batches: int = Field(
        64,
        ge=0,
        description="Batches handed out to a checkpointing trainer (StreamBatches with resume_step) "
        "that the store keeps until a checkpoint holds them; past it the oldest is released "
        "(counted as kept_released). Keep the trainer's checkpoint interval below it. 0: unbounded.",
    )
    max_stored_bytes: int = Field(
        8 * 1024**3, ge=0, description="Capacity in bytes of group JSON held in memory and on disk. 0: unbounded."
    )
    retry_after_seconds: int = Field(1, ge=0, description="Retry-After sent with a 503 when the store is full.")
    max_staleness: int = Field(
        0,
        ge=0,
        description="Largest number of policy versions a group may be behind the current version "
        "when its batch is formed; 0 turns the bound off.",
    )
    staleness_policy: Literal["drop", "keep"] = Field(
        "drop",
        description="What batch assembly does with groups past max_staleness: 'drop' them "
        "(batches stay exactly batch_size) or 'keep' them; counted either way (GetStatus, /metrics).",
    )
    refuse_oversized_groups: bool = Field(
        True,
        description="Refuse (422 / INVALID_ARGUMENT) a group, or an environment's group_size, "
        "larger than the trainer's batch size: no batch could ever hold it, and Atropos' batch "
        "formation stops for good behind it. Off: exactly run-api's behaviour.",
    )
    receipt_capacity: int = Field(
        100_000,
        ge=0,
        description="Completions remembered for policy-version attribution of scored data.",
    )
    inference: Targets = Field(
        default_factory=list,
        description="InferenceService targets as host:port (repeat the flag, or separate "
        "with commas). Empty: the trajectory API works alone and /generate answers 503.",
    )
    tokenizer_path: str | None = Field(
        None,
        description="Tokenizer (a directory or a Hugging Face id) for text in /generate and /v1/*; "
        "default: the model name InferenceService.GetModelInfo reports, which only loads when "
        "the model is served under its Hugging Face id.",
    )
    max_body_bytes: int = Field(
        256 * 1024 * 1024,
        gt=0,
        description="Largest HTTP request body accepted, after gzip decompression (413 above).",
    )
    response_gzip: Literal["auto", "always", "never"] = Field(
        "auto",
        description="Gzip replies for clients that accept it: auto = only for clients on other hosts "
        "(over loopback compression costs more than it saves), always = as Atropos, never.",
    )
    generate_timeout_seconds: float = Field(
        600.0, gt=0, description="Deadline of one /generate call to the inference service."
    )
    generate_first_token_seconds: float = Field(
        120.0,
        ge=0,
        description="Deadline of a streaming inference call's first token; past it the call is retried "
        "on another target (or answers 504) and the target sits out. 0: no deadline.",
    )
    generate_idle_seconds: float = Field(
        60.0,
        ge=0,
        description="Longest gap between two messages of a streaming inference call; past it the call "
        "answers 504 and the target sits out. 0: no deadline.",
    )
    inference_probe_timeout_seconds: float = Field(
        5.0,
        gt=0,
        description="Deadline of the liveness probe (a grpc.health Check every second) of each inference "
        "target: a target that misses it (a frozen process) is taken out and the calls in flight to it "
        "are retried elsewhere or fail with 503.",
    )
    inference_eject_seconds: float = Field(
        5.0,
        gt=0,
        description="Seconds an inference target sits out after a call to it failed UNAVAILABLE "
        "(its grpc.health stream brings it back sooner when it reports SERVING).",
    )
    trajectory_token: SecretStr | None = Field(
        None,
        description="Bearer token the trajectory routes (/register-env, /scored_data, /batch, ...) "
        "require; unset leaves them open, as stock Atropos environments send none.",
    )
    inference_token: SecretStr | None = Field(
        None,
        description="Bearer token /generate, /get_model_info and /v1/* require (an Atropos "
        "APIServerConfig sends its api_key as one); unset leaves them open.",
    )
    trajectory_token_file: str | None = Field(None, description="A file holding trajectory_token.")
    inference_token_file: str | None = Field(None, description="A file holding inference_token.")

    @property
    def http_bind(self) -> tuple[str, int]:
        """Where the HTTP server listens: --host/--port, as run-api would."""
        return self.http_host or self.host, self.http_port if self.port is None else self.port

    @property
    def grpc_bind_host(self) -> str:
        return self.grpc_host or self.host
