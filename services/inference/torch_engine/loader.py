"""The torch engine's side of a weight update (the loader the state machine in
weight_update/ drives): join the trainer's gloo or NCCL group, receive every bucket
into staging buffers (checksumming each), and at commit have the engine switch to them
between two decode steps.

Speed: the checksum of bucket i is computed in a second thread while bucket i + 1 is on
the wire. When the wire dtypes are the model's, the engine adopts the staged buffers as
its parameters (no copy at commit), and the buffers the parameters used before become
the staging of the next update (no fresh allocation, so no page faults on the next
receive): the shard holds two copies of the weights, the served one and the next one.
Everything that can block (joining, receiving, closing a group) runs in threads, never
on the event loop.

Same host (a rendezvous naming a shared-memory segment, services.common.weight_wire.shm):
the loader maps the segment once (kept across updates, as a group is), checksums each
bucket in place as the trainer publishes it, and at commit the engine adopts the
segment's bucket views as its parameters, then the header records which set it serves
so the trainer writes the next update into the other one. No staging copy, no socket.
When the segment's sets are the trainer's GPU memory (CUDA IPC), each piece is copied
into the shard's own staging buffers as it is published and the copy is checksummed;
the commit is then the collective path's.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from services.common.errors import (
    Aborted,
    ClothoError,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from services.common.weight_wire import (
    CollectiveGroup,
    Manifest,
    flat_buckets,
    join_all,
    start_receiving,
    unpack_bucket,
)
from services.common.weight_wire.shm import SegmentReader, start_reading
from services.inference.generation_types import ServedPolicy
from services.inference.torch_engine.engine import GenerationEngine
from services.inference.weight_update import GroupKey, UpdateInFlight, WeightUpdater

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Staging:
    buffers: list[torch.Tensor] | None
    device: torch.device
    # The engine takes the staging buffers over as its parameters.
    adopt: bool
    # Same-host transport: the segment the buffers lie in, this shard's reader index,
    # the set, and what stops the reader thread.
    segment: SegmentReader | None = None
    reader: int = 0
    buffer_set: int = -1
    stop: threading.Event | None = None
    # The buffers are the shard's own (copied from CUDA IPC sets), not the segment's.
    copied: bool = False


class TorchLoader:
    """Receives updates for one GenerationEngine; the engine owns the served policy."""

    def __init__(self, engine: GenerationEngine, collective_timeout_seconds: float, name: str = "torch") -> None:
        self.engine = engine
        self.name = name
        self.collective_timeout = collective_timeout_seconds
        # Called after every commit the engine ran (its health may have changed).
        self.after_commit: Callable[[], None] | None = None
        self._group: CollectiveGroup | None = None
        self._group_key: GroupKey | None = None
        self._closers: list[threading.Thread] = []
        # Bucket buffers the engine's parameters view now (adopted by the last commit),
        # and a free set to receive the next update into.
        self._live: list[torch.Tensor] | None = None
        self._spare: list[torch.Tensor] | None = None
        # The shared-memory segment of same-host updates, mapped while the trainer keeps it.
        self._segment: SegmentReader | None = None

    @property
    def served(self) -> ServedPolicy:
        return self.engine.policy

    @property
    def parameter_specs(self) -> Mapping[str, tuple[Any, ...]]:
        return self.engine.parameter_specs

    def serves(self, version: int) -> bool:
        return self.engine.policy.version == version

    def check_update(self, manifest: Manifest, group: GroupKey) -> None:
        if group.backend == "nccl" and self.engine.device.type != "cuda":
            raise InvalidArgument("rendezvous: NCCL needs a CUDA engine; this shard runs on " + str(self.engine.device))

    async def begin_update(self, update: UpdateInFlight) -> bool:
        if update.group.segment is not None:
            return await self._begin_shared(update)
        key = update.group
        device = self.engine.device if key.backend == "nccl" else torch.device("cpu")
        specs = self.engine.parameter_specs
        adopt = device == self.engine.device and all(t.dtype == specs[t.name][1] for t in update.manifest.tensors)
        joined = False
        if self._group is None or self._group_key != key:
            if self._group is not None:
                self._close_in_background(self._group)
                self._group, self._group_key = None, None
            try:
                group = await asyncio.to_thread(self._connect, key, device)
            except Exception as exc:
                raise Unavailable(
                    f"could not join weight group {key.group_name!r} at {key.address}:{key.port} "
                    f"as rank {key.rank} of {key.world_size}: {exc}"
                ) from exc
            if update.dropped is not None:
                self._close_in_background(group)
                raise update.dropped
            self._group, self._group_key = group, key
            joined = True
        try:
            staging = self._staging_for(update.manifest, device)
        except RuntimeError as exc:
            raise ResourceExhausted(
                f"no memory to stage version {update.version} ({update.manifest.total_bytes} bytes): {exc}"
            ) from exc
        update.loading = _Staging(staging, device, adopt)
        assert self._group is not None
        # Resolves to (CRCs, seconds): a Received.
        update.transfer = asyncio.wrap_future(
            start_receiving(self._group, list(staging), device, update.started, name=f"weights-v{update.version}")
        )
        # Retrieve the outcome even when nobody awaits it (an aborted update).
        update.transfer.add_done_callback(lambda f: f.cancelled() or f.exception())
        return joined

    async def _begin_shared(self, update: UpdateInFlight) -> bool:
        """Map the segment (unless already mapped) and checksum its buckets as they land."""
        key = update.group
        seg = key.segment
        assert seg is not None
        joined = False
        if self._segment is None or self._segment.name != seg.segment:
            self._segment = None
            if seg.cuda_sets and self.engine.device.type != "cuda":
                raise InvalidArgument("rendezvous: CUDA IPC sets need a CUDA engine; this shard runs on the CPU")
            try:
                self._segment = await asyncio.to_thread(
                    SegmentReader.open,
                    seg.segment,
                    seg.segment_bytes,
                    update.manifest,
                    list(seg.cuda_sets) or None,
                    self.engine.device if seg.cuda_sets else None,
                )
            except (OSError, ValueError, RuntimeError) as exc:
                raise Unavailable(f"could not map weight segment {seg.segment!r}: {exc}") from exc
            joined = True
        reader = self._segment
        try:
            reader.check_update(seg.update_id, seg.buffer_set)
        except ValueError as exc:
            raise FailedPrecondition(str(exc)) from exc
        specs = self.engine.parameter_specs
        same_dtypes = all(t.dtype == specs[t.name][1] for t in update.manifest.tensors)
        stop = threading.Event()
        copy_into = None
        if seg.cuda_sets:
            try:
                copy_into = self._staging_for(update.manifest, self.engine.device)
            except RuntimeError as exc:
                raise ResourceExhausted(f"no memory to stage version {update.version}: {exc}") from exc
            update.loading = _Staging(
                copy_into, self.engine.device, same_dtypes, reader, key.rank - 1, seg.buffer_set, stop, copied=True
            )
        else:
            adopt = self.engine.device.type == "cpu" and same_dtypes
            views = [reader.bucket(seg.buffer_set, i) for i in range(len(update.manifest.buckets))]
            update.loading = _Staging(views, torch.device("cpu"), adopt, reader, key.rank - 1, seg.buffer_set, stop)
        update.transfer = asyncio.wrap_future(
            start_reading(
                reader,
                seg.buffer_set,
                seg.update_id,
                update.started,
                stop,
                update.deadline_seconds,
                name=f"weights-v{update.version}",
                copy_into=copy_into,
            )
        )
        update.transfer.add_done_callback(lambda f: f.cancelled() or f.exception())
        return joined

    async def commit_update(self, update: UpdateInFlight) -> ServedPolicy:
        staging: _Staging = update.loading
        assert staging.buffers is not None
        staged = {
            name: view
            for i, flat in enumerate(staging.buffers)
            for name, view in unpack_bucket(update.manifest, i, flat)
        }
        try:
            policy = await asyncio.wrap_future(
                self.engine.commit_weights(
                    staged, update.version, update.step, resync=update.resync, adopt=staging.adopt
                )
            )
        except Exception as exc:
            raise Aborted(f"commit of version {update.version} failed: {exc}") from exc
        finally:
            if self.after_commit is not None:
                self.after_commit()
        if staging.segment is not None and staging.copied:
            staging.segment.serve(staging.reader, -1)  # nothing served from the trainer's sets
            self._recycle(staging)
        elif staging.segment is not None:
            # The trainer writes the next update into the set nobody serves.
            staging.segment.serve(staging.reader, staging.buffer_set if staging.adopt else -1)
            staging.buffers = None
            if staging.adopt:
                self._live = self._spare = None  # the parameters live in the segment now
        else:
            self._recycle(staging)
        return policy

    def drop_update(self, update: UpdateInFlight, error: ClothoError) -> None:
        if update.loading is not None:
            update.loading.buffers = None
            if update.loading.stop is not None:
                update.loading.stop.set()
        # The trainer drops its segment after a failure; parameters adopted from it
        # keep their memory mapped through their own references.
        self._segment = None
        if self._group is not None:
            self._close_in_background(self._group)
            self._group, self._group_key = None, None

    async def release(self) -> None:
        """Close the group, waiting (bounded) for every group closing in the background:
        a process group still alive at interpreter exit aborts the process."""
        if self._group is not None:
            self._close_in_background(self._group)
            self._group, self._group_key = None, None
        self._spare = None
        self._segment = None
        closers, self._closers = self._closers, []
        await asyncio.to_thread(join_all, closers, self.collective_timeout + 5.0)

    def _staging_for(self, manifest: Manifest, device: torch.device) -> list[torch.Tensor]:
        """The spare buffer set when it fits the manifest's buckets, else new buffers."""
        spare, self._spare = self._spare, None
        if (
            spare is not None
            and len(spare) == len(manifest.buckets)
            and all(
                buf.numel() == b.numel and buf.dtype == b.dtype and buf.device == device
                for buf, b in zip(spare, manifest.buckets)
            )
        ):
            return spare
        del spare  # free it before allocating the new set
        return flat_buckets(manifest, device)

    def _recycle(self, staging: _Staging) -> None:
        """After a commit: which buffer set is free for the next update. Only buffers of
        committed updates are recycled: a dropped update's receive thread may still be
        writing into its own."""
        buffers, staging.buffers = staging.buffers, None
        if buffers is None:
            return
        if staging.adopt:
            # The parameters now view `buffers`; the set they viewed before is free.
            self._spare, self._live = self._live, buffers
        else:
            self._spare = buffers

    def _connect(self, key: GroupKey, device: torch.device) -> CollectiveGroup:
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)
        group = CollectiveGroup(
            key.backend, key.address, key.port, key.world_size, key.rank, key.group_name, self.collective_timeout
        )
        try:
            group.connect()
        except Exception:
            group.close()
            raise
        return group

    def _close_in_background(self, group: CollectiveGroup) -> None:
        # Closing waits for any collective still pending on the group to time out, so it
        # runs off the event loop and nobody waits for it (except `close`).
        self._closers = [t for t in self._closers if t.is_alive()]
        closer = threading.Thread(target=group.close, name=f"close-{group.group_name}", daemon=True)
        closer.start()
        self._closers.append(closer)


class WeightReceiver(WeightUpdater):
    """The weight-update state machine over a TorchLoader: what a torch shard receives
    updates with."""

    loader: TorchLoader

    def __init__(self, engine: GenerationEngine, collective_timeout_seconds: float, name: str = "torch") -> None:
        super().__init__(TorchLoader(engine, collective_timeout_seconds, name), collective_timeout_seconds)
