"""The training loop on rank 0: batches from the gateway -> step -> weight push ->
publish -> checkpoint.

The trainer is the authority on policy versions. A version is published only after
every shard committed it; when a push fails the trainer keeps the step's weights and
pushes the next step's weights under the same next version, as a resync (shards that
restarted or lost track accept it whatever they serve), so the published version always
names weights every shard serves.

Resume: with a checkpoint in checkpoint_dir the learner starts at its step and version
and, before it asks for any batch, resyncs every shard to the checkpoint's weights
(under the same version when those weights were the published ones, else as the next
version). All torch work runs in one dedicated thread, in order: a SIGTERM that cancels
a step in flight still lets its optimizer step finish before the final checkpoint.

With overlap_weight_update (one step off), a step's weights are copied and pushed while
the next step trains; the next push starts only once that one is over, so versions are
still published in order and only once committed. Every step line carries the step's
critical path (wait for the batch, train, weight update, cycle).

Longer than most modules (~600 lines): the loop, the version bookkeeping and the
overlapped update share the same state (version, published weights, update in flight)
and are easier to check side by side than split.
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

import grpc
import torch
from grpc import aio
from opentelemetry import context as otel_context
from opentelemetry import trace

from clotho.v1 import gateway_service_pb2 as gw_pb
from clotho.v1 import gateway_service_pb2_grpc as gw_grpc
from clotho.v1 import scored_data_pb2
from services.common.access import Access
from services.common.server import channel
from services.common.telemetry import attached, parse_traceparent
from services.common.weight_wire.dtypes import from_name
from services.trainer import checkpoint
from services.trainer.acknowledgements import BatchAcknowledgements
from services.trainer.batch_log import BatchLog
from services.trainer.core import StepResult, TrainerCore
from services.trainer.distributed import Ranks
from services.trainer.policy_state import PolicyState
from services.trainer.settings import TrainerSettings
from services.trainer.weight_push import SyncReport, WeightSync, WeightSyncError
from services.trainer.weight_push.colocate import Colocation

log = logging.getLogger(__name__)
tracer = trace.get_tracer("clotho.trainer")
T = TypeVar("T")

# Gateway restarts and blips: reconnect the batch stream with capped backoff.
RECONNECT_MIN_SECONDS = 0.5
RECONNECT_MAX_SECONDS = 10.0
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.FAILED_PRECONDITION}
# Whether this client's StreamBatchesRequest can carry the trainer's committed version.
_CREDIT_HAS_VERSION = "policy_version" in gw_pb.StreamBatchesRequest.DESCRIPTOR.fields_by_name


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


@contextlib.contextmanager
def step_span(step: int) -> Any:
    """The root span of training step `step` (a new trace, whatever is current)."""
    with tracer.start_as_current_span(
        "trainer.step", context=otel_context.Context(), attributes={"clotho.step": step}
    ) as span:
        yield span


class _StreamEnded(Exception):
    """The gateway closed the batch stream."""


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
        self.weight_sync = weight_sync
        self._out = out
        self.core = TrainerCore(settings, ranks)
        self._torch = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="clotho-torch")
        self._loaded = False
        self._closed = False
        self.last_sync: SyncReport | None = None
        self.last_sync_error: str | None = None
        # The next push must be a resync (after a restore, or a failed push).
        self.resync_needed = False
        # The weights are the ones published under state.version.
        self.weights_published = True
        self._saved_step = -1
        self.resumed_from: Path | None = None
        self._last_step_end: float | None = None
        # Overlapped weight updates (one step off): the update in flight, which finishes
        # its step (publishes, prints the step line); `_epoch` counts optimizer steps and
        # `_published_epoch` is the last one whose weights every shard committed.
        self._update: asyncio.Task | None = None
        self._epoch = 0
        self._published_epoch = 0
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
                self.weights_published = restored.weights_published
                self._published_epoch = 0 if restored.weights_published else -1
                self.resync_needed = True
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
        await self._settle_update()
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
        a checkpoint was restored or a shard serves another version. Retries (with
        backoff) until it succeeds or `stop` is set."""
        await self.load()
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
                return await self._push(resync_only=True)
            except (TimeoutError, WeightSyncError, aio.AioRpcError) as exc:
                log.warning("resync failed (%s); retrying in %.1fs", exc, backoff)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff)
            backoff = min(backoff * 2, RECONNECT_MAX_SECONDS)
        return None

    async def _push(
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
            epoch = self._epoch
            weights = await self._in_torch(self.core.full_weights)
        else:
            epoch = weights_epoch
        try:
            report = await self.weight_sync.push(weights, version, self.step, resync=self.resync_needed)
        except WeightSyncError as exc:
            self.resync_needed = True
            self.last_sync_error = str(exc)
            raise
        finally:
            del weights
        self.resync_needed = False
        self._published_epoch = epoch
        # A step that started since (overlapped) has changed the weights again.
        self.weights_published = self._epoch == epoch
        self.last_sync, self.last_sync_error = report, None
        if version > self.state.version:
            self.state.publish(version, self.step)
        if resync_only:
            self._emit(
                {
                    "event": "resync",
                    "step": self.step,
                    "policy_version": version,
                    "sync_seconds": report.seconds,
                    "sync_bytes": report.bytes,
                }
            )
        return report

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
            await self._settle_update()
        # Where an update is in flight, its version is the one this batch is counted against.
        pending = self._update is not None and not self._update.done()
        version = self.state.version + 1 if pending else self.state.version
        # Cleared before the step starts: if we are cancelled while the torch thread
        # finishes it, the final checkpoint must not claim these weights are published.
        published, self.weights_published = self.weights_published, False
        epoch, self._epoch = self._epoch, self._epoch + 1
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
            self._epoch = epoch
            self.weights_published = published or self._published_epoch == epoch
            if colocation is not None:
                await colocation.resume()
            raise
        step = self.step
        trained = time.monotonic()
        # The previous step's update must finish before this one's starts (versions in order).
        await self._settle_update()
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
            self._update = asyncio.ensure_future(
                self._finish_step(
                    result, step, timing, on_published, weights=weights, weights_epoch=self._epoch, checkpoint=False
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

    async def _settle_update(self) -> None:
        """Wait for the weight update in flight, if any. A failed push does not raise
        (its step line reports it and the next push is a resync); a caller cancelled
        meanwhile leaves the update running (close() waits for it)."""
        task = self._update
        if task is None:
            return
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                raise  # our caller was cancelled, not the update
        finally:
            if task.done() and self._update is task:
                self._update = None

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
                report = await self._push(weights=weights, weights_epoch=weights_epoch)
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
        record = self._step_record(result, report, time.monotonic() - timing["started"], step)
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

    def _step_record(self, result: StepResult, report: SyncReport | None, seconds: float, step: int) -> dict[str, Any]:
        m, batch = result.metrics, result.batch
        staleness = batch.staleness
        record: dict[str, Any] = {
            "event": "step",
            "step": step,
            "policy_version": self.state.version,
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
            "skipped_batches": self.skipped_batches,
        }
        for reason, count in sorted(batch.dropped.items()):
            record[f"dropped/{reason}"] = count
        for reason, count in sorted(batch.fallbacks.items()):
            record[f"fallback/{reason}"] = count
        for env, score in m.env_mean_scores.items():
            record[f"atropos/env_{env}/mean_score"] = score
        # By registered name (env_<id> for an environment the gateway did not name).
        record["env_mean_scores"] = {self.env_names.get(e, f"env_{e}"): s for e, s in m.env_mean_scores.items()}
        if report is None:
            record["sync_error"] = self.last_sync_error
        return record

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

    def _finished(self) -> bool:
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
        work = asyncio.ensure_future(self._run(gw_grpc.GatewayServiceStub(gateway), stop))
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

    async def _register(self, stub: gw_grpc.GatewayServiceStub) -> None:
        s = self.settings
        # wait_for_ready: the gateway may come up after us.
        reply = await stub.RegisterTrainer(
            gw_pb.RegisterTrainerRequest(
                wandb_group=s.wandb_group,
                wandb_project=s.wandb_project,
                batch_size=s.batch_size,
                max_token_len=s.max_token_len,
                checkpoint_dir=s.checkpoint_dir,
                save_checkpoint_interval=s.checkpoint_interval,
                starting_step=self.step,
                num_steps=s.num_steps,
            ),
            wait_for_ready=True,
        )
        log.info("registered with the gateway at %s as trainer %s", s.gateway, reply.uuid)

    async def _run(self, stub: gw_grpc.GatewayServiceStub, stop: asyncio.Event) -> None:
        await self.sync_shards(stop)
        if self._finished() or stop.is_set():
            return
        await self._register(stub)
        backoff = RECONNECT_MIN_SECONDS
        while not self._finished() and not stop.is_set():
            steps_before = self.step
            try:
                await self._consume(stub)
            except _StreamEnded:
                log.warning("the gateway closed the batch stream; reconnecting")
            except aio.AioRpcError as exc:
                if exc.code() not in _RETRYABLE:
                    raise
                log.warning("batch stream failed (%s: %s); reconnecting", exc.code().name, exc.details())
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    # The gateway lost our registration (it restarted).
                    await self._register(stub)
            if self._finished():
                break
            backoff = RECONNECT_MIN_SECONDS if self.step > steps_before else min(backoff * 2, RECONNECT_MAX_SECONDS)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff)

    def _grant(self, outstanding: int, in_hand: int = 0) -> int:
        """Credits to add so that at most `credits` batches are ever requested ahead and
        no more than the remaining steps (less the `in_hand` batch) are requested."""
        want = self.settings.credits - outstanding
        if self.settings.num_steps > 0:
            want = min(want, self.settings.num_steps - self.step - in_hand - outstanding)
        return max(want, 0)

    def _credit(self, n: int) -> gw_pb.StreamBatchesRequest:
        request = gw_pb.StreamBatchesRequest(credits=n)
        if _CREDIT_HAS_VERSION:
            # Lets the gateway enforce its staleness bound against what shards serve.
            request.policy_version = self.state.version
        return self.acks.annotate(request)

    async def _consume(self, stub: gw_grpc.GatewayServiceStub) -> None:
        """One StreamBatches call: grant credits, train on each batch as it arrives.

        one_step_off: the next batch is requested when a batch arrives, so its
        generation overlaps this step; otherwise only after the step's weights are
        committed, so it is generated by them."""
        call = stub.StreamBatches(wait_for_ready=True)
        outstanding = 0
        writing = asyncio.Lock()  # an overlapped update also writes (its version)
        self.acks.open_stream()

        async def grant(in_hand: int) -> bool:
            """Add credits; False when the stream is already over."""
            nonlocal outstanding
            n = self._grant(outstanding, in_hand)
            if n:
                try:
                    async with writing:
                        await call.write(self._credit(n))
                except (asyncio.InvalidStateError, aio.AioRpcError):
                    return False
                outstanding += n
            return True

        async def published(version: int) -> None:
            """An overlapped update committed: tell the gateway now, as the next credit
            would have in step with the update."""
            if _CREDIT_HAS_VERSION:
                async with writing:
                    await call.write(gw_pb.StreamBatchesRequest(credits=0, policy_version=version))

        try:
            while not self._finished():
                if not await grant(in_hand=0):
                    raise _StreamEnded()
                # The step's trace starts with the wait for its batch.
                with step_span(self.step + 1) as span:
                    waiting = time.monotonic()
                    with tracer.start_as_current_span("trainer.wait_batch"):
                        response = await call.read()
                    if response is aio.EOF:
                        span.set_attribute("clotho.outcome", "stream ended")
                        raise _StreamEnded()
                    waited = time.monotonic() - waiting
                    outstanding -= 1
                    self.acks.consume(response.step)
                    self.env_names.update(response.env_names)
                    # The gateway's hand-out span, which links to the batch's submissions.
                    handed_out = parse_traceparent(response.traceparent) if response.traceparent else None
                    if handed_out is not None:
                        span.add_link(handed_out, {"clotho.link": "batch"})
                    span.set_attribute("clotho.batch_step", response.step)
                    # The batch is ours now. One step off: let the gateway assemble the next
                    # one while we train. If the stream ended meanwhile, still train.
                    open_ = await grant(in_hand=1) if self.settings.one_step_off else True
                    try:
                        await self.train_step(
                            list(response.groups),
                            wait_seconds=waited,
                            overlap=self.settings.one_step_off and self.settings.overlap_weight_update,
                            on_published=published,
                        )
                        self.batch_log.record(response.step, self.step, response.groups)
                    except ValueError as exc:
                        self.skipped_batches += 1
                        log.error("skipping malformed batch %d: %s", response.step, exc)
                        span.set_status(trace.StatusCode.ERROR, f"malformed batch: {exc}")
                if self.acks.unreported:  # tell the gateway what the new checkpoint holds
                    with contextlib.suppress(asyncio.InvalidStateError, aio.AioRpcError):
                        async with writing:
                            await call.write(self._credit(0))
                if not open_:
                    raise _StreamEnded()
            await self._settle_update()
            with contextlib.suppress(asyncio.InvalidStateError, aio.AioRpcError):
                await call.done_writing()
        finally:
            call.cancel()


def _run_id(checkpoint_dir: str) -> str:
    """A stable id for a run: the same checkpoint directory, the same id."""
    return hashlib.sha256(os.path.abspath(checkpoint_dir).encode()).hexdigest()[:12]
