"""Settings of the inference service, from flags and CLOTHO_INFERENCE_* env vars."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings

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
    dtype: str = Field("float32", description="Parameter dtype: float32, bfloat16 or float16.")
    max_batch_size: int = Field(
        64, ge=1, description="Most sequences decoded together in one batch (n samples count n)."
    )
    max_context_len: int | None = Field(
        None,
        ge=1,
        description="Longest prompt plus completion accepted; unset takes the model config's "
        "max_position_embeddings.",
    )
    default_max_new_tokens: int = Field(
        128, ge=0, description="max_new_tokens of requests that leave it unset (clamped to the context)."
    )
    seed: int = Field(0, description="Seed of the engine's sampler for requests that carry no seed.")
    weight_update_timeout_seconds: float = Field(
        60.0,
        gt=0,
        description="Timeout of each weight-transfer collective (joining the group, each bucket "
        "broadcast); a stuck transfer fails after this instead of hanging.",
    )

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        if value not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, not {value!r}")
        return value

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
