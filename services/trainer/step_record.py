"""One step's trace root and its step line (the JSON record printed per step)."""

from __future__ import annotations

import contextlib
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace

from services.trainer.core import StepResult
from services.trainer.weight_push import SyncReport

tracer = trace.get_tracer("clotho.trainer")


@contextlib.contextmanager
def step_span(step: int) -> Any:
    """The root span of training step `step` (a new trace, whatever is current)."""
    with tracer.start_as_current_span(
        "trainer.step", context=otel_context.Context(), attributes={"clotho.step": step}
    ) as span:
        yield span


def step_record(
    result: StepResult,
    report: SyncReport | None,
    seconds: float,
    step: int,
    *,
    policy_version: int,
    skipped_batches: int,
    env_names: dict[int, str],
    sync_error: str | None,
) -> dict[str, Any]:
    """The step line's fields: the step's metrics, its batch's accounting and its push."""
    m, batch = result.metrics, result.batch
    staleness = batch.staleness
    record: dict[str, Any] = {
        "event": "step",
        "step": step,
        "policy_version": policy_version,
        "mean_score": m.mean_score,
        "loss": m.loss,
        "kl": m.kl,
        "clip_fraction": m.clip_fraction,
        "sync_seconds": report.seconds if report else 0.0,
        "sync_bytes": report.bytes if report else 0,
        "step_seconds": seconds,
        "sync_ok": report is not None,
        "entropy": m.entropy,
        "ratio_mean": m.ratio_mean,
        "ratio_max": m.ratio_max,
        "ratio_min": m.ratio_min,
        "is_truncated_fraction": m.is_truncated_fraction,
        "abs_log_ratio_mean": m.abs_log_ratio_mean,
        "advantage_mean": m.advantage_mean,
        "grad_norm": result.grad_norm,
        "lr": result.lr,
        "tokens": m.tokens,
        "sequences": m.sequences,
        "real_token_fraction": m.real_token_fraction,
        "staleness_mean": sum(staleness) / len(staleness) if staleness else 0.0,
        "staleness_max": max(staleness, default=0),
        "stale_dropped": batch.stale_dropped,
        # Sequences dropped as unusable, and optional fields ignored (batching.py).
        "unusable_dropped": sum(batch.dropped.values()),
        "fallbacks": sum(batch.fallbacks.values()),
        "skipped_batches": skipped_batches,
    }
    for reason, count in sorted(batch.dropped.items()):
        record[f"dropped/{reason}"] = count
    for reason, count in sorted(batch.fallbacks.items()):
        record[f"fallback/{reason}"] = count
    for env, score in m.env_mean_scores.items():
        record[f"atropos/env_{env}/mean_score"] = score
    # By registered name (env_<id> for an environment the gateway did not name).
    record["env_mean_scores"] = {env_names.get(e, f"env_{e}"): s for e, s in m.env_mean_scores.items()}
    if report is None:
        record["sync_error"] = sync_error
    return record
