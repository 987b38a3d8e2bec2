"""Gateway settings: flags (`--http-port 0`) and CLOTHO_GATEWAY_* env vars."""

from __future__ import annotations


from pydantic import Field
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

    http_host: str = Field("127.0.0.1", description="Address the HTTP (Atropos/SGLang) server binds.")
    http_port: int = Field(
        8000,
        ge=0,
        le=65535,
        description="HTTP port (Atropos' run-api default is 8000); 0 picks a free one "
        "(printed as http_port when ready).",
    )
    inference: Targets = Field(
        default_factory=list,
        description="InferenceService targets as host:port (repeat the flag, or separate "
        "with commas). Empty: the trajectory API works alone and /generate answers 503.",
    )
    tokenizer_path: str | None = Field(
        None,
        description="Tokenizer directory for text in /generate; default: the model_path "
        "that InferenceService.GetModelInfo reports.",
    )
    max_body_bytes: int = Field(
        256 * 1024 * 1024,
        gt=0,
        description="Largest HTTP request body accepted, after gzip decompression (413 above).",
    )
    generate_timeout_seconds: float = Field(
        600.0, gt=0, description="Deadline of one /generate call to the inference service."
    )

