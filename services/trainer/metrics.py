"""Prometheus metrics of the trainer, served by services.common.metrics.

`TrainerMetrics.observe` is a step listener of the Learner: each step record (the JSON
line the trainer prints) sets the gauges and feeds the histograms and counters. Mean
score per environment is labelled with the environment's registered name, as the
gateway hands it out with each batch.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
SYNC_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# Step-record field -> (gauge name, help).
_GAUGES = {
    "loss": ("clotho_trainer_loss", "The step's loss."),
    "kl": ("clotho_trainer_kl", "Mean k3 KL to the reference policy over completion tokens."),
    "clip_fraction": ("clotho_trainer_clip_fraction", "Fraction of completion tokens whose PPO ratio was clipped."),
    "is_truncated_fraction": (
        "clotho_trainer_is_truncated_fraction",
        "Fraction of tokens whose importance ratio to the sampling policy hit the cap.",
    ),
    "abs_log_ratio_mean": (
        "clotho_trainer_abs_log_ratio_mean",
        "Mean |log p_train - log p_inference| over completion tokens.",
    ),
    "entropy": ("clotho_trainer_entropy", "Mean policy entropy over completion tokens."),
    "grad_norm": ("clotho_trainer_grad_norm", "Global gradient norm before clipping."),
    "lr": ("clotho_trainer_learning_rate", "The learning rate of the step."),
    "mean_score": ("clotho_trainer_mean_score", "Mean score of the batch's sequences."),
    "policy_version": ("clotho_trainer_policy_version", "The policy version the trainer has published."),
}


class TrainerMetrics:
    """The trainer's registry; `observe(record)` after every step."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.step = Gauge("clotho_trainer_step", "Optimizer steps taken.", registry=r)
        self.gauges = {field: Gauge(name, doc, registry=r) for field, (name, doc) in _GAUGES.items()}
        self.env_mean_score = Gauge(
            "clotho_trainer_env_mean_score",
            "Mean score of the step's sequences from each environment, by its registered name.",
            ["env"],
            registry=r,
        )
        self.is_ratio = Gauge(
            "clotho_trainer_is_ratio",
            "Importance ratio to the sampling policy over the step's completion tokens (mean, min, max).",
            ["stat"],
            registry=r,
        )
        self.staleness = Gauge(
            "clotho_trainer_staleness",
            "Policy versions between a sequence's generation and the step (mean, max over the batch).",
            ["stat"],
            registry=r,
        )
        self.step_seconds = Histogram(
            "clotho_trainer_step_seconds",
            "Wall time of a step, weight sync included.",
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.sync_seconds = Histogram(
            "clotho_trainer_sync_seconds",
            "Wall time of a weight update to every shard.",
            buckets=SYNC_BUCKETS,
            registry=r,
        )
        self.sync_bytes_per_second = Gauge(
            "clotho_trainer_sync_bytes_per_second", "Throughput of the last weight update.", registry=r
        )
        self.sync_bytes = Counter("clotho_trainer_sync_bytes", "Bytes of weights pushed to the shards.", registry=r)
        self.sync_failures = Counter("clotho_trainer_sync_failures", "Weight updates that failed.", registry=r)
        self.tokens = Counter("clotho_trainer_tokens", "Tokens trained on.", registry=r)
        self.sequences = Counter("clotho_trainer_sequences", "Sequences trained on.", registry=r)
        self.stale_dropped = Counter(
            "clotho_trainer_stale_dropped", "Sequences dropped for staleness by the trainer.", registry=r
        )

    def observe(self, record: dict[str, Any]) -> None:
        """Take in one step record (Learner's step line)."""
        self.step.set(record.get("step", 0))
        for field, gauge in self.gauges.items():
            value = record.get(field)
            if isinstance(value, (int, float)):
                gauge.set(value)
        for env, score in (record.get("env_mean_scores") or {}).items():
            self.env_mean_score.labels(env).set(score)
        for stat in ("mean", "min", "max"):
            value = record.get(f"ratio_{stat}")
            if isinstance(value, (int, float)):
                self.is_ratio.labels(stat).set(value)
        for stat in ("mean", "max"):
            value = record.get(f"staleness_{stat}")
            if isinstance(value, (int, float)):
                self.staleness.labels(stat).set(value)
        self.step_seconds.observe(float(record.get("step_seconds", 0.0)))
        if record.get("sync_ok"):
            seconds, sent = float(record.get("sync_seconds", 0.0)), int(record.get("sync_bytes", 0))
            self.sync_seconds.observe(seconds)
            self.sync_bytes.inc(sent)
            if seconds > 0:
                self.sync_bytes_per_second.set(sent / seconds)
        elif "sync_error" in record:
            self.sync_failures.inc()
        self.tokens.inc(int(record.get("tokens", 0)))
        self.sequences.inc(int(record.get("sequences", 0)))
        self.stale_dropped.inc(int(record.get("stale_dropped", 0)))


__all__ = ["TrainerMetrics"]
