"""Prometheus `/metrics` for the trajectory state: queue depth, store fill, ingest,
hand-outs, staleness and version attribution; and the latency of every HTTP request by
route (`RouteLatency`).

The state's values are read from the state when scraped (a custom collector), so ingest
pays nothing for them; a request pays one histogram observation. `/status` stays exactly
Atropos' shape: its clients parse it.
"""

from __future__ import annotations

import weakref
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from services.gateway.trajectory.state import TrajectoryState

_REGISTRIES: weakref.WeakKeyDictionary[TrajectoryState, CollectorRegistry] = weakref.WeakKeyDictionary()


class StateCollector:
    """Reads one TrajectoryState at scrape time."""

    def __init__(self, state: TrajectoryState) -> None:
        self._state = weakref.ref(state)

    def collect(self) -> Iterator[Metric]:
        state = self._state()
        if state is None:
            return
        c = state.counters

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"clotho_gateway_{name}", doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"clotho_gateway_{name}", doc, value=value)

        yield gauge("step", "The trainer step (batches formed), as /status reports it.", state.step)
        yield gauge("policy_version", "The policy version the gateway knows as current.", state.policy_version)
        yield gauge("queue_groups", "Groups in the queue (/status queue_size).", state.queue_size)
        yield gauge("queue_sequences", "Sequences in the queue.", state.queue.sequences)
        yield gauge("stored_groups", "Groups the store holds (queued, buffered, formed).", state.held_groups)
        yield gauge("stored_bytes", "Bytes of group JSON the store holds.", state.held_bytes)
        yield gauge("max_stored_groups", "The store's capacity in groups (0: unbounded).", state.max_groups)
        yield gauge("ready_batches", "Batches formed by /batch and not handed out yet.", state.ready_batches)
        yield gauge("kept_batches", "Batches handed out and waiting for a trainer checkpoint.", state.kept_batches)
        yield gauge("kept_groups", "Groups in batches waiting for a trainer checkpoint.", state.kept_groups)
        yield gauge("checkpointed_step", "The newest step a trainer checkpoint holds.", state.checkpointed_step)
        yield gauge("max_staleness", "The staleness bound in policy versions (0: off).", state.max_staleness)
        yield counter("submitted_groups", "Groups accepted.", c.submitted_groups)
        yield counter("submitted_sequences", "Sequences accepted.", c.submitted_sequences)
        yield counter("refused_full", "Submissions refused because the store was full.", c.refused_full)
        yield counter("batches", "Batches handed out (/batch and StreamBatches).", c.batches_handed_out)
        yield counter("kept_replayed", "Kept batches sent again to a resumed trainer.", c.kept_replayed)
        yield counter(
            "kept_released", "Kept batches released past --max-kept-batches before a checkpoint.", c.kept_released
        )
        yield counter("stale_dropped_groups", "Groups dropped for staleness.", c.stale_dropped_groups)
        yield counter("stale_dropped_sequences", "Sequences dropped for staleness.", c.stale_dropped_sequences)
        yield counter("stale_kept_groups", "Stale groups handed out anyway.", c.stale_kept_groups)
        yield counter("stale_kept_sequences", "Stale sequences handed out anyway.", c.stale_kept_sequences)
        attributed = CounterMetricFamily(
            "clotho_gateway_versions_attributed",
            "Sequences by where their policy version came from.",
            labels=["source"],
        )
        attributed.add_metric(["explicit"], c.versions_explicit)
        attributed.add_metric(["receipt"], c.versions_from_receipts)
        attributed.add_metric(["current"], c.versions_current)
        yield attributed
        commits = getattr(state.store, "commits", None)
        if commits is not None:
            yield counter("store_commits", "Transactions the durable store committed.", commits)
        memory = getattr(state.store, "memory_bytes", None)
        if memory is not None:
            yield gauge("store_sqlite_bytes", "SQLite's heap in the gateway (sqlite3_memory_used).", memory)
        wal = getattr(state.store, "wal_bytes", None)
        if wal is not None:
            yield gauge("store_wal_bytes", "The durable store's write-ahead log on disk.", wal)


# Seconds: an ingest post takes tens of microseconds, a /generate up to minutes.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)  # fmt: skip


class RouteLatency:
    """`clotho_gateway_http_request_duration_seconds{method, route}`: from a request's
    arrival to the end of its response (streams included). `route` is the route's path
    template; a path no route serves counts as `other`, so the label set stays bounded.

    Requests and scrapes both run on the gateway's event loop, so the counts need no
    lock: an observation is a bisect and two additions (prometheus-client's Histogram
    takes a lock and costs several times that on the ingest path)."""

    NAME = "clotho_gateway_http_request_duration_seconds"

    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.buckets = tuple(buckets)
        # (method, route) -> [count per bucket..., count above the last bucket, sum]
        self._series: dict[tuple[str, str], list[float]] = {}
        self._static_paths: frozenset[str] = frozenset()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def set_routes(self, paths: Iterable[str]) -> None:
        """The app's route paths: a request whose route the router did not record in
        its scope (a middleware passed on a copy) is labelled by its path when that is
        one of them."""
        self._static_paths = frozenset(p for p in paths if "{" not in p)

    def observe(self, scope: dict[str, Any], seconds: float) -> None:
        route = scope.get("route")
        path = getattr(route, "path", None)
        if path is None:
            path = scope["path"] if scope["path"] in self._static_paths else "other"
        key = (scope["method"], path)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = [0.0] * (len(self.buckets) + 2)
        series[bisect_left(self.buckets, seconds)] += 1
        series[-1] += seconds

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(
            self.NAME,
            "HTTP request latency by method and route, response streaming included.",
            labels=["method", "route"],
        )
        for (method, route), series in sorted(self._series.items()):
            cumulative, buckets = 0.0, []
            for bound, count in zip((*self.buckets, float("inf")), series[:-1]):
                cumulative += count
                buckets.append((floatToGoString(bound), cumulative))
            family.add_metric([method, route], buckets, sum_value=series[-1])
        yield family


def metrics_response(state: TrajectoryState, latency: RouteLatency | None = None) -> Response:
    registry = _REGISTRIES.get(state)
    if registry is None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(StateCollector(state))
        _REGISTRIES[state] = registry
    body = generate_latest(registry)
    if latency is not None:
        body += generate_latest(latency.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
