"""Settings of the inference service, from flags and CLOTHO_INFERENCE_* env vars."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.metrics import METRICS_PORT_DESCRIPTION
from services.common.settings import ServiceSettings, Targets

DTYPE_NAMES = ("float32", "bfloat16", "float16")


class InferenceSettings(ServiceSettings):
    """How the inference service loads its model and generates."""

    model_config = SettingsConfigDict(
        env_prefix="CLOTHO_INFERENCE_",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_prog_name="clotho inference",
        extra="ignore",
    )

    engine: Literal["torch", "sglang"] = Field(
        "torch",
        description="Engine behind the service: `torch` (embedded, CPU or GPU) or `sglang` (SGLang "
        "servers driven over HTTP; needs the `sglang` extra and a GPU to launch them).",
    )
    shards: int = Field(
        1,
        ge=1,
        description="Engines behind the service, each one a rank of the weight-update group. torch: "
        "engine replicas in this process (see --shard-devices); sglang: servers to launch when "
        "--sglang-urls is empty.",
    )
    model_path: str = Field(
        "",
        description="Hugging Face model directory (config, weights, tokenizer) to serve. Required; "
        "`clotho build-model DIR` writes a tiny local one.",
    )
    model_name: str = Field(
        "",
        description="Name clients address the model by (the OpenAI `model` field); empty means "
        "the name of the model directory.",
    )
    device: str = Field("cpu", description="torch device the model runs on: cpu, cuda or cuda:N.")
    shard_devices: Targets = Field(
        default_factory=list,
        description="torch engine: one device per shard (JSON list or comma-separated, e.g. "
        "cuda:0,cuda:1); empty puts every shard on --device.",
    )
    dtype: str = Field("float32", description="Parameter dtype: float32, bfloat16 or float16.")
    max_batch_size: int = Field(
        64,
        ge=1,
        description="Most sequences decoded together in one batch (n samples count n); "
        "requests beyond it wait in FIFO order.",
    )
    max_batch_tokens: int = Field(
        65536,
        ge=1,
        description="Most KV-cache tokens the running batch may reserve (each sample reserves its "
        "prompt plus max_new_tokens); requests beyond it wait in FIFO order.",
    )
    max_prefill_tokens: int = Field(
        1024,
        ge=1,
        description="Most prompt tokens prefilled between two decode steps (at least one request), "
        "so arrivals do not stall running sequences for long.",
    )
    max_context_len: int | None = Field(
        None,
        ge=1,
        description="Longest prompt plus completion accepted; unset takes the model config's max_position_embeddings.",
    )
    default_max_new_tokens: int = Field(
        128, ge=0, description="max_new_tokens of requests that leave it unset (clamped to the context)."
    )
    seed: int = Field(0, description="Seed of the engine's sampler for requests that carry no seed.")
    single_thread_work: float = Field(
        1e8,
        ge=0,
        description="A torch-engine forward pass on CPU whose work (the model's parameters x the "
        "tokens it feeds) is below this runs on one intra-op thread: on passes this small a thread "
        "pool's hand-offs cost more CPU than they save (a tiny-demo decode step: 0.5M parameters x "
        "32 rows = 1.6e7, its prefill ~2e7); larger passes keep the process's threads, where they "
        "shorten the pass (a 25M-parameter model's decode step: 8e8). 0: always the process's threads.",
    )
    weight_update_timeout_seconds: float = Field(
        60.0,
        gt=0,
        description="Timeout of each weight-transfer collective (joining the group, each bucket "
        "broadcast); a stuck transfer fails after this instead of hanging.",
    )

    sglang_urls: Targets = Field(
        default_factory=list,
        description="sglang engine: base URLs of running SGLang servers to attach to, one shard "
        "each (JSON list or comma-separated). Empty launches --shards servers instead.",
    )
    sglang_launch_args: str = Field(
        "",
        description="Extra arguments for `python -m sglang.launch_server` when launching (for "
        "example `--mem-fraction-static 0.6`). Shard i gets --base-gpu-id i and a loopback port.",
    )
    sglang_startup_timeout_seconds: float = Field(
        900.0, gt=0, description="How long a launched or attached SGLang server may take to answer /health."
    )
    sglang_update_timeout_seconds: float = Field(
        600.0,
        gt=0,
        description="HTTP timeout of SGLang's weight-update calls (each waits for its bucket's broadcast).",
    )
    engine_stall_seconds: float = Field(
        60.0,
        ge=0,
        description="A torch shard whose engine makes no progress this long while work waits (a hung "
        "step or device) reports NOT_SERVING until it moves again, so the gateway routes around it. "
        "0: no watchdog.",
    )
    health_check_interval_seconds: float = Field(
        5.0, gt=0, description="How often each SGLang shard's /health is polled for the shard's gRPC health."
    )
    metrics_port: int = Field(0, ge=0, le=65535, description=METRICS_PORT_DESCRIPTION)

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        if value not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, not {value!r}")
        return value

    @model_validator(mode="after")
    def _shard_layout(self) -> InferenceSettings:
        if self.engine == "torch" and self.shard_devices and len(self.shard_devices) != self.shards:
            raise ValueError(f"shard_devices names {len(self.shard_devices)} devices for {self.shards} shards")
        return self

    def torch_devices(self) -> list[str]:
        """The device of each torch shard."""
        return list(self.shard_devices) or [self.device] * self.shards

    def resolved_model_path(self) -> Path:
        """The model directory as an absolute path; raises ValueError when it is not set."""
        if not self.model_path:
            raise ValueError(
                "no model to serve: pass --model-path DIR or set CLOTHO_INFERENCE_MODEL_PATH "
                "(`clotho build-model DIR` writes a tiny local model)"
            )
        path = Path(self.model_path).expanduser().resolve()
        if not path.is_dir():
            raise ValueError(f"model_path {str(path)!r} is not a directory")
        return path

    def served_model_name(self) -> str:
        return self.model_name or self.resolved_model_path().name
