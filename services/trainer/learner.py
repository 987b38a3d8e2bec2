"""The training loop on rank 0: batches from the gateway -> step -> weight push ->
publish -> checkpoint. This module is the step; its neighbours hold the other jobs:

- batch_stream.py: registration with the gateway, the StreamBatches call, credits and
  reconnects (each batch that arrives is one `train_step`);
- publisher.py: versions on the shards (push, publish once every shard committed,
  resync, the overlapped update in flight);
- acknowledgements.py: which gateway batches the weights and the checkpoints hold;
- step_record.py: the step's trace root and its step line.

Resume: with a checkpoint in checkpoint_dir the learner starts at its step and version
and, before it asks for any batch, resyncs every shard to the checkpoint's weights
(under the same version when those weights were the published ones, else as the next
version). All torch work runs in one dedicated thread, in order: a SIGTERM that cancels
a step in flight still lets its optimizer step finish before the final checkpoint.

With overlap_weight_update (one step off), a step's weights are copied and pushed while
the next step trains (publisher.py). Every step line carries the step's critical path
(wait for the batch, train, weight update, cycle).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TextIO, TypeVar

import torch
from opentelemetry import context as otel_context
from opentelemetry import trace

from clotho.v1 import gateway_service_pb2_grpc as gw_grpc
from clotho.v1 import scored_data_pb2
from services.common.access import Access
from services.common.server import channel
from services.common.telemetry import attached
from services.common.weight_wire.dtypes import from_name
from services.trainer import checkpoint
from services.trainer.acknowledgements import BatchAcknowledgements
from services.trainer.batch_log import BatchLog
from services.trainer.batch_stream import BatchStream
from services.trainer.core import StepResult, TrainerCore
from services.trainer.distributed import Ranks
from services.trainer.policy_state import PolicyState
from services.trainer.publisher import Publisher, copy_keeping_layout
from services.trainer.settings import TrainerSettings
from services.trainer.step_record import step_record, step_span
from services.trainer.weight_push import SyncReport, WeightSync, WeightSyncError
from services.trainer.weight_push.colocate import Colocation

log = logging.getLogger(__name__)
T = TypeVar("T")


class Learner:
    """Owns rank 0's TrainerCore and drives one step per batch.

    Usable without the gRPC server: `await load()`, then `await train_step(groups)` per
    batch, or `await run()` to pull batches from the gateway until `num_steps`.
    """

    def __init__(
        self,
        settings: TrainerSettings,
        state: PolicyState | None = None,
        *,
        weight_sync: WeightSync | None = None,
        out: TextIO | None = None,
        ranks: Ranks | None = None,
    ) -> None:
        self.settings = settings
        self.state = state if state is not None else PolicyState()
        self._out = out
        self.publisher = Publisher(
            self.state,
            weight_sync,
            full_weights=self._full_weights,
            current_step=lambda: self.core.step,
            emit=self._emit,
        )
        self.core = TrainerCore(settings, ranks)
        self._torch = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="clotho-torch")
        self._loaded = False
        self._closed = False
        self._saved_step = -1
        self.resumed_from: Path | None = None
        self._last_step_end: float | None = None
        # Which gateway batches the weights and the checkpoints hold (acknowledgements.py).
        self.acks = BatchAcknowledgements(enabled=bool(settings.checkpoint_dir))
        self.batch_log = BatchLog(settings.batch_log)
        # Registered environment names by env_id, as StreamBatches reports them.
        self.env_names: dict[int, str] = {}
        # Called with each step record once printed (metrics, W&B); a failure is only logged.
        self.step_listeners: list[Callable[[dict[str, Any]], None]] = []
        # Batches the gateway sent that held no usable sequence (skipped, not trained).
        self.skipped_batches = 0

    @property
    def step(self) -> int:
        return self.core.step

    @property
    def model(self) -> torch.nn.Module | None:
        return self.core.inner if self.core.model is not None else None

    async def _in_torch(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` in the torch thread. Shielded: a cancelled caller does not stop work
        that is already changing the model (it finishes before anything else runs)."""
        loop = asyncio.get_running_loop()
        # The caller's trace context crosses into the torch thread (the step's phases).
        ctx = otel_context.get_current()

        def in_context() -> T:
            with attached(ctx):
                return fn(*args)

        return await asyncio.shield(loop.run_in_executor(self._torch, in_context))

    # -- setup -----------------------------------------------------------------------

    async def load(self) -> None:
        """Load (or restore) the model and optimizer, and open the weight sync."""
        if not self._loaded:
            s = self.settings
            resume = checkpoint.latest(s.checkpoint_dir) if (s.resume and s.checkpoint_dir) else None
            restored = await self._in_torch(self.core.load, resume)
            self._loaded = True
            if restored is not None:
                self.state.restore(restored.policy_version, restored.step)
                self.publisher.restored(restored.weights_published)
                self._saved_step = restored.step
                self.resumed_from = restored.path
                self.acks.restore(checkpoint.read_state(restored.path))
                self._emit(
                    {
                        "event": "resumed",
                        "step": restored.step,
                        "policy_version": restored.policy_version,
                        "checkpoint": str(restored.path),
                        "batch_step": self.acks.consumed,
                    }
                )
                log.info(
                    "resumed from %s at step %d, policy version %d",
                    restored.path,
                    restored.step,
                    restored.policy_version,
                )
        if self.weight_sync is None:
            self.weight_sync = WeightSync.for_targets(
                self.settings.inference,
                access=Access.from_settings(self.settings),
                address=self.settings.sync_address,
                bucket_bytes=self.settings.bucket_bytes,
                timeout_seconds=self.settings.sync_timeout_seconds,
                dtype=from_name(self.settings.sync_dtype),
                transport=self.settings.weight_transport,
                run_id=self.settings.run_id or _run_id(self.settings.checkpoint_dir),
            )

    async def close(self) -> None:
        """Finish the step in flight, save a checkpoint if steps were taken since the
        last one, stop the other ranks and the weight sync. Idempotent."""
        if self._closed:
            return
        self._closed = True
        await self.publisher.settle()
        if self._loaded:
            if self.step > self._saved_step:
                with contextlib.suppress(Exception):
                    await self.save_checkpoint()
            if self.core.ranks.distributed:
                await self._in_torch(self.core.stop_followers)
        if self.weight_sync is not None:
            await self.weight_sync.close()
        await asyncio.to_thread(self._torch.shutdown, True)

    # -- versions on the shards ------------------------------------------------------

    async def sync_shards(self, stop: asyncio.Event | None = None) -> SyncReport | None:
        """Before training: bring every shard to the trainer's version and weights when
        a checkpoint was restored or a shard serves another version (publisher.py)."""
        await self.load()
        return await self.publisher.sync_shards(stop)

    async def _full_weights(self) -> dict[str, torch.Tensor]:
        return await self._in_torch(self.core.full_weights)

    # Where the versions stand (publisher.py).
    @property
    def weight_sync(self) -> WeightSync | None:
        return self.publisher.weight_sync

    @weight_sync.setter
    def weight_sync(self, value: WeightSync | None) -> None:
        self.publisher.weight_sync = value

    @property
    def resync_needed(self) -> bool:
        return self.publisher.resync_needed

    @property
    def weights_published(self) -> bool:
        return self.publisher.weights_published

    @property
    def last_sync(self) -> SyncReport | None:
        return self.publisher.last_sync

    @property
    def last_sync_error(self) -> str | None:
        return self.publisher.last_sync_error

    # -- one step ----------------------------------------------------------------------

    async def train_step(
        self,
        groups: Sequence[scored_data_pb2.ScoredGroup],
        wait_seconds: float = 0.0,
        *,
        overlap: bool = False,
        on_published: Callable[[int], Awaitable[None]] | None = None,
    ) -> dict[str, Any] | None:
        """Train on one batch, push the weights to every shard, publish the version once
        all committed, and print the step line. Returns the step line's fields.
        `wait_seconds`: how long the loop waited for this batch (reported in the line).

        `overlap` (the one-step-off loop): return once the optimizer step is done and
        leave the weight update running; it publishes the version, calls
        `on_published(version)` (without overlap the next credit tells the gateway)
        and prints the step line, and the next step's update
        starts only after it. The next step's optimizer work runs meanwhile on a copy
        of the weights taken for the update. Versions and staleness come out as without
        overlap: a step that starts while an update is in flight counts its batch's
        staleness against the version that update publishes, corrected if it fails
        (and with max_staleness set, which drops sequences by it, the step first waits
        for the update). Returns None then.

        Traced as one root span, `trainer.step` (unless the caller opened it: the
        batch stream opens it before waiting for the batch): the torch thread's
        phases and the weight push are its children.

        Raises ValueError for a malformed batch (nothing is changed then).
        """
        if trace.get_current_span().is_recording():
            return await self._train_step(groups, wait_seconds, overlap, on_published)
        with step_span(self.step + 1):
            return await self._train_step(groups, wait_seconds, overlap, on_published)

    async def _train_step(
        self,
        groups: Sequence[scored_data_pb2.ScoredGroup],
        wait_seconds: float,
        overlap: bool,
        on_published: Callable[[int], Awaitable[None]] | None,
    ) -> dict[str, Any] | None:
        await self.load()
        started = time.monotonic()
        if self.settings.max_staleness >= 0:
            await self.publisher.settle()
        pub = self.publisher
        # Where an update is in flight, its version is the one this batch is counted against.
        pending = pub.pending
        version = self.state.version + 1 if pending else self.state.version
        # Cleared before the step starts: if we are cancelled while the torch thread
        # finishes it, the final checkpoint must not claim these weights are published.
        published, pub.weights_published = pub.weights_published, False
        epoch, pub.epoch = pub.epoch, pub.epoch + 1
        interval, after = self.settings.checkpoint_interval, self.step + 1
        checkpoint_due = bool(interval and after % interval == 0) or (
            self.settings.num_steps > 0 and after >= self.settings.num_steps
        )
        # Colocated mode: the engines give their KV cache up for the step and the push
        # (which then runs on the critical path: nothing generates meanwhile).
        colocation = (
            self.weight_sync.colocation(torch.device(self.settings.device))
            if self.weight_sync is not None and self._colocated
            else None
        )
        memory: dict[str, Any] = {}
        if colocation is not None:
            memory["released"] = await colocation.release()
        overlapped = (
            overlap
            and colocation is None
            and not checkpoint_due
            and self.weight_sync is not None
            and self.weight_sync.has_shards
        )
        weights: dict[str, torch.Tensor] | None = None
        try:
            if overlapped:
                # The copy is taken in the same torch-thread call: no later step can run first.
                result, weights = await self._in_torch(self._train_and_copy, list(groups), version)
            else:
                result = await self._in_torch(self.core.train, list(groups), version)
        except ValueError:
            # Rejected before anything changed.
            pub.epoch = epoch
            pub.weights_published = published or pub.published_epoch == epoch
            if colocation is not None:
                await colocation.resume()
            raise
        step = self.step
        trained = time.monotonic()
        # The previous step's update must finish before this one's starts (versions in order).
        await pub.settle()
        if pending and self.state.version < version:
            # The update this batch was counted against did not publish its version.
            result.batch.staleness = [max(x - 1, 0) for x in result.batch.staleness]
        timing = {
            "wait_seconds": wait_seconds,
            "train_seconds": trained - started,
            "started": started,
            "trained": trained,
        }
        if weights is not None:
            timing["update_seconds"] = time.monotonic() - trained  # waiting for the previous update
            self._note_cycle(timing)
            pub.start(
                self._finish_step(
                    result, step, timing, on_published, weights=weights, weights_epoch=pub.epoch, checkpoint=False
                )
            )
            return None
        return await self._finish_step(
            result, step, timing, on_published, checkpoint=checkpoint_due, colocation=colocation, memory=memory
        )

    def _train_and_copy(
        self, groups: list[scored_data_pb2.ScoredGroup], version: int
    ) -> tuple[StepResult, dict[str, torch.Tensor]]:
        result = self.core.train(groups, version)
        return result, copy_keeping_layout(self.core.full_weights())

    def _note_cycle(self, timing: dict[str, Any]) -> None:
        """The step's cycle: from the previous step's end on the critical path to this one's."""
        end = time.monotonic()
        if self._last_step_end is not None:
            timing["cycle_seconds"] = end - self._last_step_end
        self._last_step_end = end

    async def _finish_step(
        self,
        result: StepResult,
        step: int,
        timing: dict[str, Any],
        on_published: Callable[[int], Awaitable[None]] | None,
        *,
        checkpoint: bool,
        weights: dict[str, torch.Tensor] | None = None,
        weights_epoch: int = 0,
        colocation: Colocation | None = None,
        memory: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Push the step's weights, publish, print the step line, checkpoint when due.
        With `colocation` the engines take their memory back after the push; `memory`
        (what release and resume reported) goes into the step line."""
        pushed = time.monotonic()
        report: SyncReport | None = None
        try:
            try:
                report = await self.publisher.push(weights=weights, weights_epoch=weights_epoch)
            except WeightSyncError as exc:
                # The shards still serve the last committed version; the next step's push
                # carries these weights on (same version number, newer weights).
                log.error("step %d: %s; keeping the weights, retrying on the next step", step, exc)
        finally:
            if colocation is not None and memory is not None:
                memory["resumed"] = await colocation.resume()
        if report is not None and on_published is not None and weights is not None:
            with contextlib.suppress(Exception):
                await on_published(self.state.version)
        if "update_seconds" not in timing:
            timing["update_seconds"] = time.monotonic() - pushed
            self._note_cycle(timing)
        record = step_record(
            result,
            report,
            time.monotonic() - timing["started"],
            step,
            policy_version=self.state.version,
            skipped_batches=self.skipped_batches,
            env_names=self.env_names,
            sync_error=self.last_sync_error,
        )
        if memory:
            record["memory"] = memory
        # The step's critical path, as the loop lived it: the wait for the batch, the
        # optimizer step, the weight update (until every shard committed; overlapped,
        # only the wait for the previous update), and the whole cycle since the previous
        # step's end (what the three leave is "other").
        for key in ("wait_seconds", "train_seconds", "update_seconds", "cycle_seconds"):
            if key in timing:
                record[key] = timing[key]
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attributes(
                {
                    "clotho.step": step,
                    "clotho.policy_version": self.state.version,
                    "clotho.sequences": record["sequences"],
                    "clotho.tokens": record["tokens"],
                    "clotho.sync_ok": record["sync_ok"],
                }
            )
        self.state.record_step(
            step,
            {
                k: float(v)
                for k, v in record.items()
                if isinstance(v, (int, float)) and k not in ("step", "policy_version")
            },
        )
        if checkpoint:
            await self.save_checkpoint()
        self._emit(record)
        for listener in self.step_listeners:
            try:
                listener(record)
            except Exception:  # observers never stop training
                log.exception("step listener %r failed", listener)
        return record

    @property
    def _colocated(self) -> bool:
        return bool(self.settings.colocated and self.weight_sync is not None and self.weight_sync.has_shards)

    async def save_checkpoint(self) -> None:
        """Write a checkpoint of the current step (every rank takes part)."""
        if not self.settings.checkpoint_dir or not self._loaded:
            return
        batches = self.acks.checkpoint_fields()
        state = {"policy_version": self.state.version, "weights_published": self.weights_published, **batches}
        path = await self._in_torch(self.core.save, self.settings.checkpoint_dir, state)
        self._saved_step = self.step
        self.acks.saved(batches)
        log.info("saved checkpoint %s (step %d, policy version %d)", path, self.step, self.state.version)

    def _emit(self, record: dict[str, Any]) -> None:
        print(json.dumps(record), file=self._out or sys.stdout, flush=True)

    # -- the loop ----------------------------------------------------------------------

    def finished(self) -> bool:
        return self.settings.num_steps > 0 and self.step >= self.settings.num_steps

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Resync the shards if needed, register with the gateway and train on
        streamed batches until `num_steps` steps are done or `stop` is set."""
        stop = stop or asyncio.Event()
        await self.load()
        gateway = channel(
            self.settings.gateway,
            token=self.settings.gateway_token,
            credentials=Access.from_settings(self.settings).channel_credentials(),
        )
        stream = BatchStream(self, gw_grpc.GatewayServiceStub(gateway))
        work = asyncio.ensure_future(stream.run(stop))
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if work.done():
                work.result()
        finally:
            # Also when run() itself is cancelled (run_service does that on SIGTERM).
            for task in (work, stopped):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            await gateway.close()
            await self.close()


def _run_id(checkpoint_dir: str) -> str:
    """A stable id for a run: the same checkpoint directory, the same id."""
    return hashlib.sha256(os.path.abspath(checkpoint_dir).encode()).hexdigest()[:12]
