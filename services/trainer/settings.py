"""The trainer's settings: flags (kebab-case) and CLOTHO_TRAINER_* env vars."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from services.common.metrics import METRICS_PORT_DESCRIPTION
from services.common.settings import ServiceSettings, Targets
from services.common.weight_wire import DEFAULT_BUCKET_BYTES


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
    gateway_token: SecretStr | None = Field(
        None,
        description="The gateway's trajectory_token, sent on every GatewayService call as "
        "'authorization: Bearer <token>'; unset sends none (a gateway without a token). Set it "
        "through CLOTHO_TRAINER_GATEWAY_TOKEN or gateway_token_file.",
    )
    gateway_token_file: str | None = Field(None, description="A file holding gateway_token.")
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
    objective: Literal["grpo", "sft"] = Field(
        "grpo",
        description="grpo: PPO-clipped policy gradient on group-normalised advantages; sft: "
        "advantage-weighted cross-entropy, sum(ce * advantage * mask) / sum(mask).",
    )
    clip_eps: float = Field(0.2, ge=0, description="PPO ratio clip: ratios below 1-eps are clipped.")
    clip_eps_high: float | None = Field(
        None, ge=0, description="Upper PPO clip (ratios above 1+eps_high are clipped); unset: clip_eps."
    )
    is_cap: float = Field(
        2.0,
        ge=0,
        description="Truncated importance sampling: the ratio against the sampling policy's "
        "inference_logprobs is capped at this value (its gradient weight too); 0 disables.",
    )
    policy_loss: Literal["ppo", "decoupled"] = Field(
        "decoupled",
        description="grpo's policy loss. decoupled (Hilton et al. 2021; AReaL): the clip is "
        "anchored at the current policy and the sampling policy is corrected by a detached "
        "importance weight truncated at is_cap, so data a few versions old still gives its "
        "reweighted gradient; on-policy data gives exactly ppo's. ppo: the ratio against the "
        "sampling policy (inference_logprobs) is clipped to [1-clip_eps, 1+clip_eps_high], so "
        "stale tokens whose ratio left the band give no gradient.",
    )
    kl_coef: float = Field(
        0.0, ge=0, description="Weight of the k3 KL to the reference policy (needs ref_logprobs in the data)."
    )
    normalize_std: bool = Field(
        True, description="Divide group-centred scores by the group's standard deviation (off: Dr.GRPO)."
    )
    adv_norm: Literal["none", "batch", "global"] = Field(
        "none",
        description="Standardise advantages over the batch's completion tokens (batch) or with "
        "running statistics over every batch so far (global).",
    )
    adv_clip: float = Field(0.0, ge=0, description="Clip advantages to [-adv_clip, adv_clip]; 0 disables.")
    aggregation: Literal["token", "sequence", "constant"] = Field(
        "token",
        description="How per-token losses become one: mean over tokens, mean over sequences of "
        "their token mean, or sum / (sequences * max_token_len) (Dr.GRPO).",
    )
    micro_batch_tokens: int = Field(
        8192,
        ge=2,
        description="Tokens per forward/backward pass (padding included): gradients accumulate "
        "over a batch's micro-batches.",
    )
    batch_layout: Literal["shared_prefix", "rows", "packed"] = Field(
        "shared_prefix",
        description="shared_prefix: as rows, but the sequences with the same prompt (the tokens "
        "before their first completion token, as a group's samples have) are one row: the "
        "prompt computed once, each completion attending to it and to itself (a 4D mask; "
        "sdpa or eager attention, else rows); rows: one row per sequence (shorter ones sharing "
        "a row), padded to the longest, attention linear in the batch; packed: every sequence "
        "end to end in one row of micro_batch_tokens (no padding, attention quadratic in the row).",
    )
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="After warmup: constant, or cosine decay to min_lr_ratio at num_steps."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warmup, in optimizer steps.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Cosine schedule's final lr as a fraction of lr.")
    autocast: Literal["auto", "bf16", "off"] = Field(
        "auto",
        description="bfloat16 autocast of forward passes: auto uses it on devices with native "
        "bf16 (CUDA), not on CPU; master weights and optimizer state stay float32.",
    )
    single_thread_work: float = Field(
        4e9,
        ge=0,
        description="A step whose work (the model's parameters x the batch's tokens) is below "
        "this runs its forward, backward and optimizer step on one intra-op thread: on a model "
        "and batch this small a thread pool's hand-offs cost more CPU than they save, and the "
        "cores shared with generation are better left to it (the tiny demo: 0.5M parameters x "
        "448 tokens = 2.4e8; a 25M-parameter model x 2,368 tokens = 5.9e10). 0: always the "
        "process's threads.",
    )
    max_staleness: int = Field(
        -1,
        ge=-1,
        description="Train only on sequences generated at most this many policy versions ago "
        "(by their policy_version); older ones are dropped and counted. -1 keeps all.",
    )
    one_step_off: bool = Field(
        True,
        description="Ask the gateway for the next batch as soon as a batch arrives, so its "
        "generation overlaps this step (data at most one version stale); off waits until "
        "the step's weights are committed (on-policy).",
    )
    next_batch: Literal["on_arrival", "after_step"] = Field(
        "on_arrival",
        description="With one_step_off, when the next batch is asked for: on_arrival, as soon "
        "as a batch arrives (its assembly and transfer overlap the whole step); after_step, once "
        "the step's optimizer step is done, while its weights are pushed (with "
        "overlap_weight_update). An environment that keeps a batch ahead at the gateway "
        "refills it when a batch is taken, so after_step hands the trainer data one policy "
        "version fresher, at the cost of the batch's hop on the critical path.",
    )
    overlap_weight_update: bool = Field(
        False,
        description="With one_step_off: push a step's weights (a copy) while the next step "
        "trains, instead of before it (`clotho up` turns it on); versions are still "
        "published only once every shard committed, in order, the gateway hears of each "
        "when it is, and staleness is counted as without overlap.",
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
    sync_dtype: Literal["", "float32", "bfloat16", "float16"] = Field(
        "",
        description="dtype of the weights on the wire (the shards' dtype, e.g. bfloat16 halves the "
        "bytes of float32 master weights); empty sends the trainer's own dtype.",
    )
    weight_transport: Literal["auto", "collective", "shm"] = Field(
        "auto",
        description="How weights reach the inference services: auto sends through shared memory "
        "to those on this host that accept it (same host id in GetModelInfo, weights on the CPU) "
        "and through the collective to the others; collective or shm forces one.",
    )
    colocated: bool = Field(
        False,
        description="Trainer and inference share a device: every inference service frees its KV "
        "cache for each step and takes it back after the new weights are committed; each "
        "step line reports the memory of both phases.",
    )
    run_id: str = Field(
        "",
        description="Names this run's shared-memory weight segments, so a restarted trainer removes "
        "what a crash left; empty: derived from checkpoint_dir.",
    )
    sync_address: str = Field(
        "127.0.0.1",
        description="Address the trainer's weight-transfer rendezvous store and its gloo "
        "transport listen on, and advertise to the shards (beyond loopback it needs a "
        "service_token or --insecure, like --host).",
    )
    device: str = Field("cpu", description="Torch device for the model, e.g. cpu or cuda:0.")
    seed: int = Field(0, description="Torch random seed.")
    checkpoint_interval: int = Field(
        0,
        ge=0,
        description="Save a checkpoint every this many steps; 0 saves only when training "
        "ends or the trainer is stopped (SIGTERM).",
    )
    checkpoint_keep: int = Field(3, ge=0, description="Complete checkpoints kept (older ones deleted); 0 keeps all.")
    resume: bool = Field(
        True,
        description="Start from the newest checkpoint in checkpoint_dir when there is one (same "
        "step and policy version; the shards are resynced to its weights first).",
    )
    checkpoint_dir: str = Field(
        ".clotho/checkpoints",
        description="Where checkpoints go (also announced to the gateway and environments); empty disables them.",
    )
    batch_log: str = Field(
        "",
        description="Append one JSON line per batch trained (its gateway step and a CRC32 of each "
        "group's token ids) to this file; empty writes none.",
    )
    wandb_group: str = Field(
        "clotho",
        description="Weights & Biases group: sent in RegisterTrainer (the gateway's /wandb_info hands "
        "it to environments) and, with --wandb, the group of the trainer's own run.",
    )
    wandb_project: str = Field(
        "clotho",
        description="Weights & Biases project: sent in RegisterTrainer (/wandb_info) and, with "
        "--wandb, the project the trainer logs its step metrics to under Atropos' names.",
    )
    wandb: bool = Field(
        False,
        description="Log every step's metrics to Weights & Biases (needs the `wandb` extra; "
        "WANDB_MODE=offline writes the run locally). Passing --wandb-project turns it on in `clotho up`.",
    )
    metrics_port: int = Field(0, ge=0, le=65535, description=METRICS_PORT_DESCRIPTION)
