"""The training loop: batches from the gateway -> GRPO step -> weight push -> publish.

The trainer is the authority on policy versions. A version is published only after
every shard committed it; when a push fails the trainer keeps the step's weights and
pushes the next step's weights under the same next version (shards only accept
current + 1), so the published version always names weights every shard serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from typing import Any, Sequence, TextIO

import grpc
import torch
from grpc import aio

from clotho.v1 import gateway_service_pb2 as gw_pb
from clotho.v1 import gateway_service_pb2_grpc as gw_grpc
from clotho.v1 import scored_data_pb2
from services.common.server import channel
from services.trainer import checkpoint
from services.trainer.grpo import GRPOConfig, GRPOMetrics, grpo_backward
from services.trainer.policy_state import PolicyState
from services.trainer.settings import TrainerSettings
from services.trainer.weight_sync import SyncReport, WeightSync, WeightSyncError

log = logging.getLogger(__name__)

# Gateway restarts and blips: reconnect the batch stream with capped backoff.
RECONNECT_MIN_SECONDS = 0.5
RECONNECT_MAX_SECONDS = 10.0
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.FAILED_PRECONDITION}


class _StreamEnded(Exception):
    """The gateway closed the batch stream."""


class Learner:
    """Owns the model and optimizer and drives one step per batch.

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
    ) -> None:
        self.settings = settings
        self.state = state if state is not None else PolicyState()
        self.weight_sync = weight_sync
        self._out = out
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.grpo = GRPOConfig(
            clip_eps=settings.clip_eps,
            normalize_std=settings.normalize_std,
            micro_batch_size=settings.micro_batch_size,
            max_token_len=settings.max_token_len,
        )
        self.step = 0
        self.last_sync: SyncReport | None = None
        self.last_sync_error: str | None = None

    # -- setup -----------------------------------------------------------------

    async def load(self) -> None:
        """Load the model and optimizer (in a thread) and open the weight sync."""
        if self.model is None:
            await asyncio.to_thread(self._load_model)
        if self.weight_sync is None:
            self.weight_sync = WeightSync.for_targets(
                self.settings.inference,
                address=self.settings.sync_address,
                bucket_bytes=self.settings.bucket_bytes,
                timeout_seconds=self.settings.sync_timeout_seconds,
            )

    def _load_model(self) -> None:
        from transformers import AutoModelForCausalLM

        torch.manual_seed(self.settings.seed)
        model = AutoModelForCausalLM.from_pretrained(self.settings.model_path, dtype=torch.float32)
        model.to(self.settings.device)
        model.train()
        pad = getattr(model.config, "pad_token_id", None)
        if pad is not None:
            self.grpo = GRPOConfig(**{**vars(self.grpo), "pad_token_id": int(pad)})
        self.optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=self.settings.lr,
            betas=tuple(self.settings.betas),
            weight_decay=self.settings.weight_decay,
        )
        self.model = model
        log.info("loaded %s (%d parameters) on %s", self.settings.model_path,
                 sum(p.numel() for p in model.parameters()), self.settings.device)

    async def close(self) -> None:
        if self.weight_sync is not None:
            await self.weight_sync.close()

    # -- one step ---------------------------------------------------------------

    def _optimize(self, groups: Sequence[scored_data_pb2.ScoredGroup]) -> tuple[GRPOMetrics, float]:
        """Worker thread: one GRPO gradient and one optimizer step."""
        assert self.model is not None and self.optimizer is not None
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        metrics = grpo_backward(self.model, groups, self.grpo)
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = 0.0
        if params:
            max_norm = self.settings.grad_clip if self.settings.grad_clip > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        self.optimizer.step()
        return metrics, grad_norm

    async def train_step(self, groups: Sequence[scored_data_pb2.ScoredGroup]) -> dict[str, Any]:
        """Train on one batch, push the weights to every shard, publish the version once
        all committed, and print the step line. Returns the step line's fields.

        Raises ValueError for a malformed batch (nothing is changed then).
        """
        if self.model is None:
            await self.load()
        assert self.weight_sync is not None and self.model is not None
        started = time.monotonic()
        metrics, grad_norm = await asyncio.to_thread(self._optimize, groups)
        self.step += 1
        version = self.state.version + 1
        report: SyncReport | None = None
        try:
            report = await self.weight_sync.push(self.model, version, self.step)
        except WeightSyncError as exc:
            # The shards still serve the last committed version; the next step's push
            # carries these weights on (same version number, newer weights).
            log.error("step %d: %s; keeping the weights, retrying on the next step", self.step, exc)
            self.last_sync_error = str(exc)
        else:
            self.state.publish(version, self.step)
            self.last_sync, self.last_sync_error = report, None
        record: dict[str, Any] = {
            "event": "step",
            "step": self.step,
            "policy_version": self.state.version,
            "mean_score": metrics.mean_score,
            "loss": metrics.loss,
            "clip_fraction": metrics.clip_fraction,
            "sync_seconds": report.seconds if report else 0.0,
            "sync_bytes": report.bytes if report else 0,
            "step_seconds": time.monotonic() - started,
            "sync_ok": report is not None,
            "entropy": metrics.entropy,
            "ratio_mean": metrics.ratio_mean,
            "ratio_max": metrics.ratio_max,
            "grad_norm": grad_norm,
            "tokens": metrics.tokens,
            "sequences": metrics.sequences,
        }
        if report is None:
            record["sync_error"] = self.last_sync_error
        self.state.record_step(
            self.step,
            {k: float(v) for k, v in record.items()
             if isinstance(v, (int, float)) and k not in ("step", "policy_version")},
        )
        interval = self.settings.checkpoint_interval
        if (interval and self.step % interval == 0) or self._finished():
            await self.save_checkpoint()
        print(json.dumps(record), file=self._out or sys.stdout, flush=True)
        return record

    async def save_checkpoint(self) -> None:
        """Write the weights with the step and the last version every shard committed."""
        if not self.settings.checkpoint_dir or self.model is None:
            return
        path = await asyncio.to_thread(
            checkpoint.save, self.settings.checkpoint_dir, self.model, self.step, self.state.version
        )
        log.info("saved checkpoint %s (policy version %d)", path, self.state.version)

    # -- the loop ---------------------------------------------------------------

    def _finished(self) -> bool:
        return self.settings.num_steps > 0 and self.step >= self.settings.num_steps

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Register with the gateway and train on streamed batches until `num_steps`
        steps are done or `stop` is set."""
        stop = stop or asyncio.Event()
        await self.load()
        gateway = channel(self.settings.gateway)
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

    async def _consume(self, stub: gw_grpc.GatewayServiceStub) -> None:
        """One StreamBatches call: grant credits, train on each batch as it arrives."""
        call = stub.StreamBatches(wait_for_ready=True)
        outstanding = 0

        async def grant(in_hand: int) -> bool:
            """Add credits; False when the stream is already over."""
            nonlocal outstanding
            n = self._grant(outstanding, in_hand)
            if n:
                try:
                    await call.write(gw_pb.StreamBatchesRequest(credits=n))
                except (asyncio.InvalidStateError, aio.AioRpcError):
                    return False
                outstanding += n
            return True

        try:
            while not self._finished():
                if not await grant(in_hand=0):
                    raise _StreamEnded()
                response = await call.read()
                if response is aio.EOF:
                    raise _StreamEnded()
                outstanding -= 1
                # The batch is ours now: let the gateway assemble the next one while we
                # train. If the stream ended meanwhile, still train on what we hold.
                open_ = await grant(in_hand=1)
                try:
                    await self.train_step(list(response.groups))
                except ValueError as exc:
                    log.error("skipping malformed batch %d: %s", response.step, exc)
                if not open_:
                    raise _StreamEnded()
            with contextlib.suppress(asyncio.InvalidStateError, aio.AioRpcError):
                await call.done_writing()
        finally:
            call.cancel()
