"""The sender side of the versioned weight-update protocol.

One push: (re)form the collective group while every shard prepares, broadcast the
buckets (the pipelined send loop of services.common.weight_wire.pipeline), have every
shard verify the checksums, then commit everywhere. Any failure aborts the update on
every shard and drops the group; the next push forms a new one under a new name. Every
stage runs under the update's deadline, and every blocking collective runs in a worker
thread under the group's timeout, so nothing hangs.

Transport, per inference service: shared memory when it runs on the trainer's host
(shm_link.py says when; services.common.weight_wire.shm how), else the collective: gloo
over CPU buffers when the model is on the CPU, NCCL over buffers on the model's GPU when
it is on CUDA. Both may serve one push (same-host and remote services together); the
buckets and their CRCs are the same either way.

From prepare on, a peer watch (peer_watch.py) probes every inference service each
second: one that dies (or stops answering) mid-update fails the stage at once, naming
it ("shard 1 (host:port) died during transfer"), instead of the update waiting out
its deadline. A stage that fails or runs out of time for another reason checks the
peers once more, so a dead peer is named rather than the symptom it caused.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from grpc import aio
from opentelemetry import trace

from clotho.v1 import inference_service_pb2 as pb
from clotho.v1 import inference_service_pb2_grpc as pb_grpc
from services.common.access import Access
from services.common.server import channel
from services.common.weight_wire import (
    BACKENDS,
    DEFAULT_BUCKET_BYTES,
    CollectiveGroup,
    Manifest,
    TrackedGroup,
    build_manifest,
    cuda_ipc,
    pipeline,
)
from services.trainer.weight_push.colocate import Colocation
from services.trainer.weight_push.peer_watch import PeerWatch
from services.trainer.weight_push.report import StageFailed, SyncReport, WeightSyncError, describe
from services.trainer.weight_push.shm_link import SegmentLink, reader_layout, uses_shared_memory

# Tensors the sender reads: a model's parameters, or name -> tensor.
Weights = torch.nn.Module | Mapping[str, torch.Tensor]

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)


# Abort must reach the shards even when the update's own deadline is spent.
ABORT_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True)
class _Shard:
    name: str
    stub: pb_grpc.InferenceServiceStub
    ranks: int
    # The first rank in the collective, or the first reader of the segment when `shm`.
    rank_offset: int
    shm: bool = False


class WeightSync:
    """Pushes a model's parameters into every inference shard, one version at a time.

    `stubs` are InferenceService stubs (one per inference service; a service may front
    several shards, as its GetModelInfo().shard_count says). With no stubs a push is a
    no-op that succeeds. `dtype` is the wire dtype (None: each tensor's own).
    `transport` is auto|collective|shm (see shm_link.py); `run_id` names this run's
    shared-memory segments, so a restarted trainer removes what a crash left.
    """

    def __init__(
        self,
        stubs: Sequence[pb_grpc.InferenceServiceStub],
        *,
        names: Sequence[str] | None = None,
        address: str = "127.0.0.1",
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        timeout_seconds: float = 60.0,
        channels: Sequence[aio.Channel] = (),
        dtype: torch.dtype | None = None,
        probe_seconds: float = 1.0,
        probe_timeout_seconds: float = 5.0,
        transport: str = "auto",
        run_id: str = "",
    ) -> None:
        self._stubs = list(stubs)
        self._names = list(names) if names is not None else [f"shard-{i}" for i in range(len(self._stubs))]
        self.address = address
        self.bucket_bytes = bucket_bytes
        self.timeout_seconds = timeout_seconds
        self.dtype = dtype
        self._channels = list(channels)
        self._group: TrackedGroup | None = None
        self._dropped: list[TrackedGroup] = []  # given up, possibly still closing
        self._shards: list[_Shard] = []
        self._manifest: Manifest | None = None
        self._manifest_proto: pb.WeightManifest | None = None
        self._lock = asyncio.Lock()
        self._backend = "gloo"
        self._peers = PeerWatch(self._names, self._stubs, probe_seconds, probe_timeout_seconds)
        self.transport = transport
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self._link: SegmentLink | None = None
        self._laid_out = False

    @classmethod
    def for_targets(cls, targets: Sequence[str], access: Access | None = None, **kwargs: Any) -> WeightSync:
        """Open a channel per InferenceService target, presenting `access`'s service token
        (TLS when it has a CA); `close()` closes them."""
        channels = [access.channel(t) if access is not None else channel(t) for t in targets]
        stubs = [pb_grpc.InferenceServiceStub(c) for c in channels]
        return cls(stubs, names=list(targets), channels=channels, **kwargs)

    @property
    def has_shards(self) -> bool:
        return bool(self._stubs)

    def colocation(self, device: torch.device) -> Colocation:
        """Memory release and resume of the same services, for colocated mode."""
        return Colocation(self._stubs, self._names, device)

    @property
    def group_name(self) -> str | None:
        return self._group.group.group_name if self._group else None

    @property
    def segment_name(self) -> str | None:
        """The shared-memory segment same-host shards read from, if any."""
        return self._link.name if self._link else None

    @property
    def manifest(self) -> Manifest | None:
        return self._manifest

    async def close(self) -> None:
        """Shut every group down (waiting at most the sync timeout for collectives
        still in flight) and close owned channels."""
        self._drop_group()
        dropped, self._dropped = self._dropped, []
        await asyncio.gather(*(g.wait_closed(self.timeout_seconds) for g in dropped))
        for ch in self._channels:
            await ch.close()
        self._channels = []

    async def served_versions(self, timeout: float | None = None) -> dict[str, int]:
        """The policy version each inference service serves now (waits for services
        that are not up yet, up to `timeout`, default the sync timeout)."""
        left = self.timeout_seconds if timeout is None else timeout
        replies = await asyncio.gather(
            *(
                stub.GetServedPolicy(pb.GetServedPolicyRequest(), timeout=left, wait_for_ready=True)
                for stub in self._stubs
            )
        )
        return {name: int(r.policy.version) for name, r in zip(self._names, replies)}

    def _manifest_for(self, tensors: Mapping[str, torch.Tensor]) -> Manifest:
        if self._manifest is None:
            # Only names, shapes and dtypes matter here; the data is read at send time.
            self._manifest = build_manifest(tensors.items(), self.bucket_bytes, self.dtype)
            self._manifest_proto = self._manifest.to_proto()
        return self._manifest

    async def push(self, weights: Weights, version: int, step: int, *, resync: bool = False) -> SyncReport:
        """Send the weights (a model's parameters, or name -> tensor) to every shard as
        `version` and commit it there. A `resync` is accepted by a shard whatever version
        it serves (after a restart from a checkpoint, or a shard that lost track).

        The caller must not modify the tensors until this returns. Raises
        WeightSyncError after aborting the update on every shard.
        """
        tensors = _named_tensors(weights)
        async with self._lock:
            attributes = {"clotho.version": version, "clotho.resync": resync}
            with tracer.start_as_current_span("weight_sync.push", attributes=attributes):
                return await self._push(tensors, version, step, resync)

    async def _push(self, tensors: Mapping[str, torch.Tensor], version: int, step: int, resync: bool) -> SyncReport:
        start = time.monotonic()
        manifest = self._manifest_for(tensors)
        if not self._stubs:
            return SyncReport(version, 0.0, 0, 0, resync=resync)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_seconds
        stages: dict[str, float] = {}
        stage = "layout"
        try:
            formed = not self._laid_out
            if formed:
                # Shards may have restarted with another layout since the last group.
                left = self._left(deadline)
                infos = await self._stage(
                    stage,
                    deadline,
                    [
                        (name, stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=left))
                        for name, stub in zip(self._names, self._stubs)
                    ],
                )
                device = next(iter(tensors.values())).device
                on_cpu = device.type == "cpu"
                uuid_here = cuda_ipc.device_uuid(device)
                try:
                    shared = [uses_shared_memory(self.transport, i, on_cpu, device_uuid=uuid_here) for i in infos]
                except ValueError as exc:
                    raise StageFailed(str(exc)) from exc
                self._shards = _layout(self._names, self._stubs, [max(int(i.shard_count), 1) for i in infos], shared)
                self._backend = "gloo" if on_cpu else "nccl"
                if any(not s.shm for s in self._shards):
                    self._host_group()
                readers = sum(s.ranks for s in self._shards if s.shm)
                if readers:
                    self._link = SegmentLink.create(manifest, readers, self.run_id, None if on_cpu else device)
                self._laid_out = True
            handle, link = self._group, self._link
            world_size = 1 + sum(s.ranks for s in self._shards if not s.shm)
            readers = sum(s.ranks for s in self._shards if s.shm)
            if link is not None:
                link.begin()

            stage = "prepare"
            mark = time.monotonic()
            left = self._left(deadline)
            calls: list[tuple[str, Awaitable[Any]]] = []
            if formed and handle is not None:
                joining = handle.run(handle.connect, name="clotho-sync-connect")
                calls.append(("trainer rank 0 joining the group", joining))
            for shard in self._shards:
                if shard.shm:
                    assert link is not None
                    rendezvous = link.rendezvous(shard.rank_offset, readers)
                else:
                    assert handle is not None
                    rendezvous = pb.Rendezvous(
                        backend=BACKENDS[handle.group.backend],
                        address=self.address,
                        port=handle.group.port,
                        world_size=world_size,
                        rank_offset=shard.rank_offset,
                        group_name=handle.group.group_name,
                    )
                request = pb.PrepareWeightUpdateRequest(
                    version=version,
                    manifest=self._manifest_proto,
                    rendezvous=rendezvous,
                    deadline_seconds=left,
                    step=step,
                    resync=resync,
                )
                calls.append((shard.name, shard.stub.PrepareWeightUpdate(request, timeout=left)))
            await self._stage(stage, deadline, calls, watch=True)
            if link is not None:
                link.opened()  # every reader maps it now: no name left to leak
            stages[stage] = time.monotonic() - mark

            stage = "transfer"
            mark = time.monotonic()
            # One span event per bucket sent (noted on the send thread, added at the end).
            sent: list[tuple[int, int]] = []

            def on_sent(index: int) -> None:
                sent.append((index, time.time_ns()))

            sends: list[tuple[str, Awaitable[Any]]] = []
            if handle is not None:
                sends.append(
                    (
                        "broadcast",
                        handle.run(pipeline.send_buckets, handle, manifest, tensors, on_sent, name="clotho-sync-send"),
                    )
                )
            if link is not None:
                # Without a collective the shared-memory writer reports the buckets sent.
                sends.append(("shared memory", link.send(manifest, tensors, on_sent if handle is None else None)))
            crcs = (
                await self._stage(
                    stage, deadline, sends, events=lambda span: _bucket_events(span, manifest, sent), watch=True
                )
            )[0]
            stages[stage] = time.monotonic() - mark

            stage = "await"
            mark = time.monotonic()
            left = self._left(deadline)
            await self._stage(
                stage,
                deadline,
                [
                    (
                        s.name,
                        s.stub.AwaitWeightTransfer(
                            pb.AwaitWeightTransferRequest(version=version, bucket_crc32s=crcs), timeout=left
                        ),
                    )
                    for s in self._shards
                ],
                watch=True,
            )
            stages[stage] = time.monotonic() - mark

            stage = "commit"
            mark = time.monotonic()
            left = self._left(deadline)
            await self._stage(
                stage,
                deadline,
                [
                    (s.name, s.stub.CommitWeightUpdate(pb.CommitWeightUpdateRequest(version=version), timeout=left))
                    for s in self._shards
                ],
                watch=True,
            )
            stages[stage] = time.monotonic() - mark
        except BaseException as exc:
            detail = exc.detail if isinstance(exc, StageFailed) else describe(exc)
            if isinstance(exc, asyncio.CancelledError):
                detail = "the trainer cancelled the update"
            if stage == "commit":
                # Commit is not atomic across shards; say so rather than hide it.
                detail += f" (shards that committed before the failure serve version {version})"
            await self._fail(version, stage, detail)
            if isinstance(exc, Exception):
                raise WeightSyncError(version, stage, detail) from exc
            raise
        return SyncReport(
            version=version,
            seconds=time.monotonic() - start,
            bytes=manifest.total_bytes,
            buckets=len(manifest.buckets),
            group_name=handle.group.group_name if handle is not None else link.name if link is not None else "",
            formed_group=formed,
            resync=resync,
            stages=stages,
        )

    @staticmethod
    def _left(deadline: float) -> float:
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise TimeoutError("deadline exceeded")
        return left

    async def _stage(
        self,
        stage: str,
        deadline: float,
        calls: list[tuple[str, Awaitable[Any]]],
        events: Callable[[trace.Span], None] | None = None,
        watch: bool = False,
    ) -> list[Any]:
        """Run `calls` concurrently; results in order. On the first failure or at the
        deadline, cancel the rest and raise StageFailed naming who failed. `events`
        adds what the stage noted to its span before the span ends. With `watch`, a
        peer that dies meanwhile fails the stage at once, named."""
        loop = asyncio.get_running_loop()
        tasks: dict[asyncio.Future[Any], str] = {asyncio.ensure_future(aw): name for name, aw in calls}
        watcher = asyncio.ensure_future(self._peers.watch(stage)) if watch else None
        with tracer.start_as_current_span(f"weight_sync.{stage}", attributes={"clotho.shards": len(calls)}) as span:
            try:
                waiting: set[asyncio.Future[Any]] = set(tasks)
                if watcher is not None:
                    waiting.add(watcher)
                while any(t in waiting for t in tasks):
                    left = deadline - loop.time()
                    done: set[asyncio.Future[Any]] = set()
                    if left > 0:
                        done, _ = await asyncio.wait(waiting, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                    if not done:
                        pending = ", ".join(sorted(tasks[t] for t in tasks if not t.done()))
                        cause = f"deadline of {self.timeout_seconds:g}s exceeded waiting for {pending}"
                        raise StageFailed(await self._peers.blame(stage, cause) if watch else cause)
                    waiting -= done
                    if watcher is not None and watcher in done:
                        watcher.result()  # raises StageFailed naming the dead peer
                    failed = [t for t in done if t is not watcher and (t.cancelled() or t.exception() is not None)]
                    if failed:
                        t = failed[0]
                        error = None if t.cancelled() else t.exception()
                        cause = f"{tasks[t]}: {describe(error) if error is not None else 'cancelled'}"
                        raise StageFailed(await self._peers.blame(stage, cause) if watch else cause)
                return [t.result() for t in tasks]
            finally:
                if events is not None and span.is_recording():
                    events(span)
                for t in [*tasks, *([watcher] if watcher is not None else [])]:
                    if not t.done():
                        t.cancel()
                    else:
                        # Mark secondary failures as retrieved; the first one is reported.
                        _ = t.cancelled() or t.exception()

    def _host_group(self) -> None:
        world_size = 1 + sum(s.ranks for s in self._shards)
        group = CollectiveGroup.host(
            self._backend, self.address, world_size, f"clotho-{uuid.uuid4().hex[:12]}", self.timeout_seconds
        )
        self._group = TrackedGroup(group)
        log.info(
            "hosting weight-transfer group %s on %s:%d (world size %d)",
            group.group_name,
            self.address,
            group.port,
            world_size,
        )

    def _drop_group(self) -> None:
        self._laid_out = False
        if self._link is not None:
            self._link.drop()
            self._link = None
        if self._group is not None:
            self._group.drop()
            self._dropped.append(self._group)
            self._group = None
        self._dropped = [g for g in self._dropped if g.busy]

    async def _fail(self, version: int, stage: str, detail: str) -> None:
        """Abort on every shard (best effort, bounded) and drop the group."""
        log.warning("weight update to version %d failed during %s: %s; aborting on every shard", version, stage, detail)
        self._drop_group()
        reason = f"trainer: {stage} failed: {detail}"
        results = await asyncio.gather(
            *(
                stub.AbortWeightUpdate(
                    pb.AbortWeightUpdateRequest(version=version, reason=reason), timeout=ABORT_TIMEOUT_SECONDS
                )
                for stub in self._stubs
            ),
            return_exceptions=True,
        )
        for name, result in zip(self._names, results):
            if isinstance(result, BaseException):
                log.warning("abort of version %d on %s failed: %s", version, name, describe(result))


def _bucket_events(span: trace.Span, manifest: Manifest, sent: list[tuple[int, int]]) -> None:
    span.set_attribute("clotho.buckets", len(manifest.buckets))
    span.set_attribute("clotho.bytes", manifest.total_bytes)
    for index, at in list(sent):
        span.add_event(
            "bucket_sent", {"clotho.bucket": index, "clotho.bytes": manifest.buckets[index].nbytes}, timestamp=at
        )


def _named_tensors(weights: Weights) -> dict[str, torch.Tensor]:
    if isinstance(weights, torch.nn.Module):
        return {n: p.detach() for n, p in weights.named_parameters()}
    return {n: t.detach() for n, t in weights.items()}


def _layout(
    names: Sequence[str],
    stubs: Sequence[pb_grpc.InferenceServiceStub],
    counts: Sequence[int],
    shared: Sequence[bool],
) -> list[_Shard]:
    """Rank 0 is the trainer; each collective service's shards take the next
    consecutive ranks, each same-host service's shards the next readers of the segment."""
    ranks = iter(reader_layout([n for n, s in zip(counts, shared) if not s]))
    readers = iter(reader_layout([n for n, s in zip(counts, shared) if s]))
    return [
        _Shard(name, stub, n, next(readers) if s else next(ranks), s)
        for name, stub, n, s in zip(names, stubs, counts, shared)
    ]
