"""Prometheus metrics of the inference service, served by services.common.metrics.

Two kinds: what the servicer sees per Generate call (tokens generated, time to first
token, time per output token, weight commits), counted as the call runs; and what the
shards hold right now (samples running and queued, KV-cache rows in use, the served
policy version), read from the shards at scrape time so the engine pays nothing for them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from services.inference.generation_types import Completion
from services.inference.shard_set import ShardSet

# Seconds: a tiny CPU model answers in milliseconds, a long prompt on a busy GPU in seconds.
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class ShardCollector:
    """The shards' state at scrape time."""

    def __init__(self, shards: ShardSet) -> None:
        self._shards = shards

    def collect(self) -> Iterator[Metric]:
        shards = self._shards.shards
        running = GaugeMetricFamily(
            "clotho_inference_requests_running",
            "Samples in the running batch (a request with n samples counts n).",
            labels=["shard"],
        )
        queued = GaugeMetricFamily(
            "clotho_inference_requests_queued",
            "Samples of requests waiting for room in the batch.",
            labels=["shard"],
        )
        kv_rows = GaugeMetricFamily(
            "clotho_inference_kv_cache_rows", "KV-cache rows in use (one per running sample).", labels=["shard"]
        )
        versions = GaugeMetricFamily(
            "clotho_inference_shard_policy_version", "The policy version each shard serves.", labels=["shard"]
        )
        for shard in shards:
            engine = getattr(shard, "engine", None)
            if engine is not None:
                running.add_metric([shard.name], engine.active_samples)
                queued.add_metric([shard.name], engine.queued_samples)
                kv_rows.add_metric([shard.name], engine.kv_rows)
            else:
                # An SGLang server reports only its load (running and waiting together).
                running.add_metric([shard.name], shard.load)
            versions.add_metric([shard.name], shard.policy.version)
        yield running
        yield queued
        yield kv_rows
        yield versions
        yield GaugeMetricFamily(
            "clotho_inference_policy_version",
            "The policy version the service serves (the lowest over its shards).",
            value=self._shards.policy.version,
        )


class InferenceMetrics:
    """The service's registry and the instruments the servicer updates."""

    def __init__(self, shards: ShardSet) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.generated_tokens = Counter(
            "clotho_inference_generated_tokens",
            "Output tokens generated (streamed requests as they stream, others when a sample completes).",
            registry=self.registry,
        )
        self.requests = Counter(
            "clotho_inference_requests", "Generate calls answered, by outcome.", ["outcome"], registry=self.registry
        )
        self.time_to_first_token = Histogram(
            "clotho_inference_time_to_first_token_seconds",
            "From a Generate call's arrival to its first output token.",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.time_per_output_token = Histogram(
            "clotho_inference_time_per_output_token_seconds",
            "Per sample: (completion - first token) / (output tokens - 1).",
            buckets=TPOT_BUCKETS,
            registry=self.registry,
        )
        self.weight_commits = Counter(
            "clotho_inference_weight_commits", "Weight updates committed (every shard).", registry=self.registry
        )
        self.registry.register(ShardCollector(shards))

    def request(self, stream: bool) -> RequestTimer:
        return RequestTimer(self, stream)


class RequestTimer:
    """One Generate call's timings and token counts."""

    __slots__ = ("_first", "_metrics", "_start", "_stream")

    def __init__(self, metrics: InferenceMetrics, stream: bool) -> None:
        self._metrics = metrics
        self._stream = stream
        self._start = time.monotonic()
        self._first = 0.0

    def _first_token(self, at: float) -> None:
        if not self._first:
            self._first = at
            self._metrics.time_to_first_token.observe(max(0.0, at - self._start))

    def chunk(self, tokens: int) -> None:
        """A streamed TokenChunk of `tokens` tokens arrived."""
        if tokens:
            self._first_token(time.monotonic())
            self._metrics.generated_tokens.inc(tokens)

    def completion(self, c: Completion) -> None:
        now = time.monotonic()
        n = len(c.output_ids)
        if not n:
            return
        if c.first_token_at:
            self._first_token(c.first_token_at)
        elif not self._first:
            self._first_token(now)
        if not self._stream:
            self._metrics.generated_tokens.inc(n)
        if n > 1:
            first = c.first_token_at or self._first
            self._metrics.time_per_output_token.observe(max(0.0, now - first) / (n - 1))

    def finished(self, outcome: str) -> None:
        self._metrics.requests.labels(outcome).inc()


__all__ = ["InferenceMetrics", "RequestTimer", "ShardCollector"]
