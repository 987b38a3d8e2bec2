"""Rank 0's versions on the shards: push a step's weights, publish the version once every
shard committed it, resync, and the overlapped update in flight.

The trainer is the authority on policy versions. A version is published only after
every shard committed it; when a push fails the trainer keeps the step's weights and
pushes the next step's weights under the same next version, as a resync (shards that
restarted or lost track accept it whatever they serve), so the published version always
names weights every shard serves.

Overlap (one step off): a step's weights are copied in the torch thread right after its
optimizer step (`copy_keeping_layout`) and pushed while the next step trains; the next
push starts only once that one is over (`settle`), so versions are still published in
order and only once committed. `epoch` counts optimizer steps and `published_epoch` is
the last one whose weights every shard committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import torch
from grpc import aio

from services.trainer.policy_state import PolicyState
from services.trainer.weight_push import SyncReport, WeightSync, WeightSyncError

log = logging.getLogger(__name__)

# Resyncs (and reconnects of the batch stream) retry with capped backoff.
RECONNECT_MIN_SECONDS = 0.5
RECONNECT_MAX_SECONDS = 10.0


def copy_keeping_layout(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of `tensors` laid out as they are: each storage they use is copied once
    and every tensor becomes the same view of the copy (parameters laid out as the
    weight-sync buckets stay so: the copy is sent without packing)."""
    copies: dict[int, torch.UntypedStorage] = {}
    out = {}
    for name, t in tensors.items():
        storage = t.untyped_storage()
        copy = copies.get(storage.data_ptr())
        if copy is None:
            copy = copies[storage.data_ptr()] = torch.UntypedStorage(storage.nbytes(), device=storage.device)
            copy.copy_(storage)
        view = torch.empty(0, dtype=t.dtype, device=t.device)
        view.set_(copy, t.storage_offset(), t.size(), t.stride())
        out[name] = view
    return out


class Publisher:
    """The version bookkeeping of one trainer and its weight pushes.

    `full_weights()` returns the current parameters (awaited in the torch thread),
    `current_step()` the trainer's step, and `emit(record)` prints an event line.
    """

    def __init__(
        self,
        state: PolicyState,
        weight_sync: WeightSync | None,
        *,
        full_weights: Callable[[], Awaitable[dict[str, torch.Tensor]]],
        current_step: Callable[[], int],
        emit: Callable[[dict[str, Any]], None],
    ) -> None:
        self.state = state
        self.weight_sync = weight_sync
        self._full_weights = full_weights
        self._step = current_step
        self._emit = emit
        self.last_sync: SyncReport | None = None
        self.last_sync_error: str | None = None
        # The next push must be a resync (after a restore, or a failed push).
        self.resync_needed = False
        # The weights are the ones published under state.version.
        self.weights_published = True
        # The overlapped update in flight (it finishes its step: publishes, prints the
        # step line); optimizer steps taken and the last one every shard committed.
        self.update: asyncio.Task | None = None
        self.epoch = 0
        self.published_epoch = 0

    def restored(self, weights_published: bool) -> None:
        """A checkpoint was loaded: the next push is a resync."""
        self.weights_published = weights_published
        self.published_epoch = 0 if weights_published else -1
        self.resync_needed = True

    @property
    def pending(self) -> bool:
        """An overlapped update is still running."""
        return self.update is not None and not self.update.done()

    async def sync_shards(self, stop: asyncio.Event | None = None) -> SyncReport | None:
        """Bring every shard to the trainer's version and weights when a checkpoint was
        restored or a shard serves another version. Retries (with backoff) until it
        succeeds or `stop` is set."""
        assert self.weight_sync is not None
        if not self.weight_sync.has_shards:
            return None
        stop = stop or asyncio.Event()
        backoff = RECONNECT_MIN_SECONDS
        while not stop.is_set():
            try:
                if not self.resync_needed:
                    served = await self.weight_sync.served_versions()
                    off = {n: v for n, v in served.items() if v != self.state.version}
                    if not off:
                        return None
                    log.info("shards serve %s, the trainer's version is %d: resyncing", off, self.state.version)
                    self.resync_needed = True
                return await self.push(resync_only=True)
            except (TimeoutError, WeightSyncError, aio.AioRpcError) as exc:
                log.warning("resync failed (%s); retrying in %.1fs", exc, backoff)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff)
            backoff = min(backoff * 2, RECONNECT_MAX_SECONDS)
        return None

    async def push(
        self, resync_only: bool = False, weights: dict[str, torch.Tensor] | None = None, weights_epoch: int = 0
    ) -> SyncReport:
        """Push the weights as the next version (or, for a resync of published weights,
        as the current one); publish it once every shard committed. Raises
        WeightSyncError (the next push is then a resync). `weights`: a copy of the
        step's weights taken in the torch thread after optimizer step `weights_epoch`
        (the next step may change the parameters meanwhile); by default the parameters
        themselves are sent."""
        assert self.weight_sync is not None
        same_version = resync_only and self.weights_published
        version = self.state.version if same_version else self.state.version + 1
        if weights is None:
            epoch = self.epoch
            weights = await self._full_weights()
        else:
            epoch = weights_epoch
        try:
            report = await self.weight_sync.push(weights, version, self._step(), resync=self.resync_needed)
        except WeightSyncError as exc:
            self.resync_needed = True
            self.last_sync_error = str(exc)
            raise
        finally:
            del weights
        self.resync_needed = False
        self.published_epoch = epoch
        # A step that started since (overlapped) has changed the weights again.
        self.weights_published = self.epoch == epoch
        self.last_sync, self.last_sync_error = report, None
        if version > self.state.version:
            self.state.publish(version, self._step())
        if resync_only:
            self._emit(
                {
                    "event": "resync",
                    "step": self._step(),
                    "policy_version": version,
                    "sync_seconds": report.seconds,
                    "sync_bytes": report.bytes,
                }
            )
        return report

    def start(self, update: Awaitable[Any]) -> None:
        """Run `update` (a step's push and the rest of its step) in the background."""
        self.update = asyncio.ensure_future(update)

    async def settle(self) -> None:
        """Wait for the weight update in flight, if any. A failed push does not raise
        (its step line reports it and the next push is a resync); a caller cancelled
        meanwhile leaves the update running (close() waits for it)."""
        task = self.update
        if task is None:
            return
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                raise  # our caller was cancelled, not the update
        finally:
            if task.done() and self.update is task:
                self.update = None
