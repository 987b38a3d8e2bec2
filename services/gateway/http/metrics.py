"""Prometheus `/metrics` for the trajectory state: queue depth, store fill, ingest,
hand-outs, staleness and version attribution.

The values are read from the state when scraped (a custom collector), so ingest pays
nothing for them. `/status` stays exactly Atropos' shape: its clients parse it.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator

from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

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


def metrics_response(state: TrajectoryState) -> Response:
    registry = _REGISTRIES.get(state)
    if registry is None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(StateCollector(state))
        _REGISTRIES[state] = registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
