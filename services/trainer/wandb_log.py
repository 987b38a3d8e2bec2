"""The trainer's step metrics in Weights & Biases, under the names Atropos trainers use.

Atropos' example trainer (example_trainer/training.py) logs `train/loss`,
`train/grad_norm`, `train/learning_rate`, `grpo/kl_penalty`, `grpo/mean_ratio`,
`grpo/clipped_fraction`, `train/step_time`, `train/sync_time` and
`alignment/diff_abs_mean`; each environment's mean score goes under
`atropos/<registered env name>/mean_score`. What Atropos has no name for goes under
`clotho/`. The run is started in the project and group the trainer also registers with
the gateway (whose `/wandb_info` hands them to the environments), so the trainer's and
the environments' runs sit together. `wandb` is an optional extra; WANDB_MODE=offline
writes the run locally.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

INSTALL_HINT = "W&B logging needs the wandb extra: pip install 'clotho[wandb]'"

# Step-record field -> the name Atropos trainers log it under.
ATROPOS_NAMES = {
    "loss": "train/loss",
    "grad_norm": "train/grad_norm",
    "lr": "train/learning_rate",
    "kl": "grpo/kl_penalty",
    "ratio_mean": "grpo/mean_ratio",
    "clip_fraction": "grpo/clipped_fraction",
    "step_seconds": "train/step_time",
    "sync_seconds": "train/sync_time",
    "abs_log_ratio_mean": "alignment/diff_abs_mean",
}
# Step-record fields without an Atropos name: logged as clotho/<field>.
CLOTHO_FIELDS = (
    "mean_score",
    "policy_version",
    "entropy",
    "ratio_min",
    "ratio_max",
    "is_truncated_fraction",
    "advantage_mean",
    "tokens",
    "sequences",
    "real_token_fraction",
    "staleness_mean",
    "staleness_max",
    "stale_dropped",
    "sync_bytes",
)


def atropos_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The W&B dict of one step record."""
    out: dict[str, float] = {}
    for field, name in ATROPOS_NAMES.items():
        value = record.get(field)
        if isinstance(value, (int, float)):
            out[name] = float(value)
    for field in CLOTHO_FIELDS:
        value = record.get(field)
        if isinstance(value, (int, float)):
            out[f"clotho/{field}"] = float(value)
    seconds, sent = record.get("sync_seconds") or 0.0, record.get("sync_bytes") or 0
    if record.get("sync_ok") and seconds > 0:
        out["clotho/sync_bytes_per_second"] = sent / seconds
    for env, score in (record.get("env_mean_scores") or {}).items():
        out[f"atropos/{env}/mean_score"] = float(score)
    return out


class WandbLogger:
    """One W&B run for the trainer; `log(record)` is a Learner step listener."""

    def __init__(self, project: str, group: str, config: dict[str, Any] | None = None) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise RuntimeError(INSTALL_HINT) from exc
        self._wandb = wandb
        self.run = wandb.init(project=project, group=group, config=config or {}, job_type="trainer")
        log.info("W&B run %s in project %s, group %s", self.run.id, project, group)

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(atropos_metrics(record), step=int(record.get("step", 0)))

    def close(self) -> None:
        self.run.finish()


__all__ = ["ATROPOS_NAMES", "INSTALL_HINT", "WandbLogger", "atropos_metrics"]
