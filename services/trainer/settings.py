"""The trainer's settings: flags (kebab-case) and CLOTHO_TRAINER_* env vars."""

from __future__ import annotations


from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings, Targets
from services.common.weight_transfer import DEFAULT_BUCKET_BYTES


class TrainerSettings(ServiceSettings):
    """Everything the trainer needs; every default works for the local tiny-model demo."""

    model_config = SettingsConfigDict(
        env_prefix="CLOTHO_TRAINER_",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_prog_name="clotho trainer",
        extra="ignore",
    )

    model_path: str = Field(
        ".clotho/tiny-model",
        description="Hugging Face model directory to train (config, weights, tokenizer); "
        "the same weights the inference shards start from (policy version 0).",
    )
    gateway: str = Field("127.0.0.1:50051", description="host:port of the GatewayService.")
    # NoDecode: the env var is read as "a:1,b:2" (or JSON), not only as JSON.
    inference: Targets = Field(
        default_factory=list,
        description="host:port of every InferenceService whose shards receive each update "
        "(repeat the flag or separate with commas). Empty: train without pushing weights.",
    )
    batch_size: int = Field(32, ge=1, description="Sequences per batch (sent to the gateway).")
    max_token_len: int = Field(
        2048, ge=2, description="Longest sequence accepted, in tokens; longer ones are truncated."
    )
    num_steps: int = Field(0, ge=0, description="Optimizer steps to take; 0 runs until stopped.")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate (tuned for the tiny demo model).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    grad_clip: float = Field(1.0, ge=0, description="Max global gradient norm; 0 disables clipping.")
    clip_eps: float = Field(0.2, ge=0, description="PPO ratio clip: ratios outside [1-eps, 1+eps] are clipped.")
    normalize_std: bool = Field(
        True, description="Divide group-centred scores by the group's standard deviation."
    )
    micro_batch_size: int = Field(
        8, ge=1, description="Sequences per forward/backward pass; gradients accumulate over the batch."
    )
    credits: int = Field(
        1, ge=1, description="Batches requested ahead from the gateway (never more are held unconsumed)."
    )
    bucket_bytes: int = Field(
        DEFAULT_BUCKET_BYTES, ge=1, description="Weight-sync bucket size in bytes (one collective per bucket)."
    )
    sync_timeout_seconds: float = Field(
        60.0, gt=0, description="Deadline of one whole weight update (prepare, transfer, commit)."
    )
    sync_address: str = Field(
        "127.0.0.1",
        description="Host the trainer's rendezvous store binds and advertises to the shards.",
    )
    device: str = Field("cpu", description="Torch device for the model, e.g. cpu or cuda:0.")
    seed: int = Field(0, description="Torch random seed.")
    checkpoint_interval: int = Field(
        0, ge=0, description="Save a checkpoint every this many steps; 0 saves only when training ends."
    )
    checkpoint_dir: str = Field(
        ".clotho/checkpoints",
        description="Where checkpoints go (also announced to the gateway and environments); empty disables them."
    )
    wandb_group: str = Field("clotho", description="Weights & Biases group (sent in RegisterTrainer only).")
    wandb_project: str = Field("clotho", description="Weights & Biases project (sent in RegisterTrainer only).")

