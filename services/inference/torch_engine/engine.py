"""The torch generation engine: owns the model and runs every forward pass and every
weight commit in one dedicated worker thread.

The asyncio side calls `submit` (validated on the spot) and iterates the returned
GenerationStream; the worker hands results back with `loop.call_soon_threadsafe` into
that stream's asyncio.Queue. Weight commits queue up the same way and are applied by the
worker between two decode steps, so no token ever comes from half-copied weights.

Scheduling is continuous, at iteration level. Each loop turn applies pending commits,
recomputes the running rows' KV cache if a commit made it stale, admits waiting requests
into the running batch (a prefill of the newcomers only, within the bounds on rows,
reserved KV tokens and prefill tokens per turn; the rest wait in FIFO order), then runs
one decode step for every row. Finished rows leave the batch at once.

Progress: the worker stamps `_progress_at` at every turn; `stalled_seconds()` is how
long it has made none while work is waiting (0 when idle), what the shard's watchdog
(torch_engine/shard.py) reads to report a wedged engine NOT_SERVING.

Colocated mode: `release_memory` has the worker free the KV cache and stop stepping
(requests wait; running rows keep their tokens; commits still apply), `resume_memory`
has it take the cache back: the running rows' keys and values are recomputed under the
weights served then, as after a commit. (Above 450 lines: the worker loop owns requests,
commits and memory operations under one lock, and splitting it would spread that lock.)
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from transformers import AutoTokenizer

from services.common.errors import FailedPrecondition, InvalidArgument, Unavailable
from services.common.telemetry import recording_context
from services.inference.generation_types import Completion, GenerationRequest, ServedPolicy, TokenChunk
from services.inference.memory import MemoryReport, measure
from services.inference.torch_engine.batch import Batch, Event, RequestState
from services.inference.torch_engine.runner import ModelRunner
from services.inference.validation import resolve_max_new_tokens

log = logging.getLogger(__name__)


@dataclass
class _PendingCommit:
    staged: Mapping[str, torch.Tensor]
    version: int
    step: int
    future: concurrent.futures.Future
    # A full resync (trainer restarted from a checkpoint): any version is accepted.
    resync: bool = False
    # The staged tensors become the parameters (no copy) where dtype and device match.
    adopt: bool = False


class GenerationStream:
    """Results of one submitted request: iterate for TokenChunk (streaming requests only)
    and Completion events until every sample has completed. An engine failure is raised
    from the iteration."""

    def __init__(self, state: RequestState, queue: asyncio.Queue[list[Event]]) -> None:
        self._state = state
        self._queue = queue
        self._remaining = state.n

    @property
    def request_id(self) -> str:
        return self._state.spec.request_id

    def __aiter__(self) -> AsyncIterator[TokenChunk | Completion]:
        return self._events()

    async def _events(self) -> AsyncIterator[TokenChunk | Completion]:
        while self._remaining:
            for event in await self._queue.get():
                if isinstance(event, BaseException):
                    self._remaining = 0
                    raise event
                if isinstance(event, Completion):
                    self._remaining -= 1
                yield event

    async def completions(self) -> list[Completion]:
        """Wait for the end and return the completions ordered by sample index."""
        done = [e async for e in self if isinstance(e, Completion)]
        return sorted(done, key=lambda c: c.index)

    def cancel(self) -> None:
        """Stop this request's samples at the next step (a no-op once finished)."""
        self._state.cancelled = True


class GenerationEngine:
    def __init__(
        self,
        model_path: str | Path,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        max_batch_size: int = 64,
        max_batch_tokens: int = 65536,
        max_prefill_tokens: int = 1024,
        max_context_len: int | None = None,
        default_max_new_tokens: int = 128,
        seed: int = 0,
        single_thread_work: float = 0.0,
    ) -> None:
        self.model_path = Path(model_path).resolve()
        # The shard's name on its spans (TorchShard sets it).
        self.name = "torch"
        self.runner = ModelRunner(self.model_path, device, dtype, single_thread_work=single_thread_work)
        self.device = self.runner.device
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_path))
        self.vocab_size = self.runner.vocab_size
        self.eos_token_ids = _eos_ids(self.runner.model, self.tokenizer)
        tok_eos = self.tokenizer.eos_token_id
        self.eos_token_id = tok_eos if tok_eos is not None else min(self.eos_token_ids, default=-1)
        self.max_context_len = int(max_context_len or self.runner.max_positions or 2048)
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_prefill_tokens = max_prefill_tokens
        self.default_max_new_tokens = default_max_new_tokens
        self._default_generator = torch.Generator(device=self.device).manual_seed(seed)
        self._policy = ServedPolicy()
        self._cv = threading.Condition()
        self._intake: collections.deque[RequestState] = collections.deque()
        self._commits: list[_PendingCommit] = []
        # Colocated mode: ("release" | "resume", future) waiting for the worker, and
        # whether the KV cache is given up now.
        self._memory_ops: list[tuple[str, concurrent.futures.Future[MemoryReport]]] = []
        self._released = False
        self._stopping = False
        self._broken: str | None = None
        self._active_samples = 0
        self._queued_samples = 0
        self._batch = Batch(self.runner, self._decode_text, max_batch_size)
        self._progress_at = time.monotonic()
        # True while the worker is in a turn (not waiting for work).
        self._working = False
        self._thread = threading.Thread(target=self._run, name="inference-engine", daemon=True)
        self._thread.start()

    @property
    def policy(self) -> ServedPolicy:
        """The version every token generated from now on is stamped with."""
        return self._policy

    @property
    def parameter_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of every parameter a weight update must carry."""
        return self.runner.parameter_specs

    @property
    def active_samples(self) -> int:
        """Samples in the running batch after the last step."""
        return self._active_samples

    @property
    def queued_samples(self) -> int:
        """Samples of requests waiting for room in the batch."""
        return self._queued_samples

    @property
    def load(self) -> int:
        """Samples running or waiting: what a dispatcher balances on."""
        return self._active_samples + self._queued_samples

    @property
    def kv_rows(self) -> int:
        """KV-cache rows in use (one per running sample)."""
        return self._batch.cache.rows

    @property
    def broken(self) -> str | None:
        """Why the engine cannot serve any more (a commit failed part-way), if so."""
        return self._broken

    def stalled_seconds(self) -> float:
        """Seconds the worker has made no progress while work waits; 0 when idle (and
        while released in colocated mode, when requests wait by design)."""
        if not self._working and (self._released or not (self._intake or self._commits)):
            return 0.0
        return max(time.monotonic() - self._progress_at, 0.0)

    @property
    def tokens_generated(self) -> int:
        """Tokens sampled since start, over all requests."""
        return self._batch.tokens_generated

    def submit(self, request: GenerationRequest) -> GenerationStream:
        """Queue a request (call from the event loop that will iterate the stream).
        Raises InvalidArgument for a bad request, Unavailable when the engine cannot serve."""
        max_new_tokens = self._validate(request)
        if self._broken:
            raise Unavailable(self._broken)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[list[Event]] = asyncio.Queue()
        opts = request.sampling
        stop_ids = set(opts.stop_token_ids)
        if not opts.ignore_eos:
            stop_ids |= self.eos_token_ids
        generator = (
            torch.Generator(device=self.device).manual_seed(opts.seed)
            if opts.seed is not None
            else self._default_generator
        )
        state = RequestState(request, max_new_tokens, frozenset(stop_ids), generator, loop, queue)
        # The worker thread notes this request's timings under the caller's span (the
        # context crosses the thread on the request; spans.py writes them at the end).
        state.trace_ctx = recording_context()
        if state.trace_ctx is not None:
            state.submitted_ns, state.shard = time.time_ns(), self.name
        if state.reserved_tokens > self.max_batch_tokens:
            raise InvalidArgument(
                f"request needs {state.reserved_tokens} KV-cache tokens (n x (prompt + max_new_tokens)), "
                f"more than max_batch_tokens {self.max_batch_tokens}"
            )
        with self._cv:
            if self._stopping:
                raise Unavailable("the engine is shutting down")
            if not self._working:
                self._progress_at = time.monotonic()
            self._intake.append(state)
            self._queued_samples += state.n
            self._cv.notify()
        return GenerationStream(state, queue)

    def commit_weights(
        self,
        staged: Mapping[str, torch.Tensor],
        version: int,
        step: int = 0,
        *,
        resync: bool = False,
        adopt: bool = False,
    ) -> concurrent.futures.Future[ServedPolicy]:
        """Have the worker copy `staged` (every parameter, by name) into the model between
        two decode steps and serve `version` from then on. The future resolves to the new
        ServedPolicy, or fails with InvalidArgument / FailedPrecondition leaving the old
        weights untouched. (Await it with asyncio.wrap_future.) `resync` accepts any
        version, not only current + 1; `adopt` hands the staged tensors over as the new
        parameter storage instead of copying them (the caller must not write them again)."""
        future: concurrent.futures.Future[ServedPolicy] = concurrent.futures.Future()
        with self._cv:
            if self._stopping:
                future.set_exception(Unavailable("the engine is shutting down"))
                return future
            if not self._working:
                self._progress_at = time.monotonic()
            self._commits.append(_PendingCommit(staged, version, step, future, resync, adopt))
            self._cv.notify()
        return future

    @property
    def released(self) -> bool:
        """Whether the KV cache is given up (colocated mode, between release and resume)."""
        return self._released

    def release_memory(self) -> concurrent.futures.Future[MemoryReport]:
        """Have the worker free the KV cache and pause generation (colocated mode)."""
        return self._memory_op("release")

    def resume_memory(self) -> concurrent.futures.Future[MemoryReport]:
        """Have the worker take the KV cache back and resume generation."""
        return self._memory_op("resume")

    def _memory_op(self, kind: str) -> concurrent.futures.Future[MemoryReport]:
        future: concurrent.futures.Future[MemoryReport] = concurrent.futures.Future()
        with self._cv:
            if self._stopping:
                future.set_exception(Unavailable("the engine is shutting down"))
                return future
            self._memory_ops.append((kind, future))
            self._cv.notify()
        return future

    def close(self, timeout: float = 30.0) -> None:
        """Stop the worker; requests still queued or running end with Unavailable."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout)

    # -- validation (event loop side) -------------------------------------------------

    def _validate(self, request: GenerationRequest) -> int:
        """Check a request and return its resolved max_new_tokens."""
        return resolve_max_new_tokens(
            request,
            vocab_size=self.vocab_size,
            max_context_len=self.max_context_len,
            max_n=self.max_batch_size,
            default_max_new_tokens=self.default_max_new_tokens,
        )

    # -- worker thread ----------------------------------------------------------------

    def _has_work(self, batch: Batch) -> bool:
        """Whether the worker has something to do (called under the lock)."""
        return bool(
            self._stopping or self._commits or self._memory_ops or (not self._released and (self._intake or batch.size))
        )

    def _run(self) -> None:
        batch = self._batch
        while True:
            with self._cv:
                self._progress_at = time.monotonic()
                if not self._has_work(batch):
                    # Idle (or released, in colocated mode): no progress is owed meanwhile.
                    self._working = False
                    while not self._has_work(batch):
                        self._cv.wait()
                    self._progress_at = time.monotonic()
                self._working = True
                if self._stopping:
                    break
                commits, self._commits = self._commits, []
                memory_ops, self._memory_ops = self._memory_ops, []
            for commit in commits:
                self._apply_commit(commit, batch)
                self._progress_at = time.monotonic()
            for kind, future in memory_ops:
                self._apply_memory_op(kind, future, batch)
            if self._released:
                continue
            admitted: list[RequestState] = []
            try:
                with torch.inference_mode():
                    batch.reap_cancelled()
                    stepped = False
                    if batch.stale and not self._broken:
                        batch.step(self._policy.version)
                        stepped = True
                    with self._cv:
                        admitted = self._take_admissible(batch)
                    if self._broken:
                        batch.fail(admitted, Unavailable(self._broken))
                    elif admitted:
                        batch.admit(admitted, self._policy.version)
                        # First tokens go out before the next step: time to first token.
                        self._active_samples = batch.size
                        batch.flush()
                    if batch.size and not stepped:
                        batch.step(self._policy.version)
            except Exception as exc:
                log.exception("generation step failed")
                batch.fail(admitted, Unavailable(f"generation failed: {exc}"))
            # Counted before the results go out: whoever sees a completion sees its row gone.
            self._active_samples = batch.size
            batch.flush()
        self._shutdown(batch)

    def _take_admissible(self, batch: Batch) -> list[RequestState]:
        """Waiting requests that fit next to the running rows, FIFO (called under the
        lock): within max_batch_size rows, max_batch_tokens reserved KV tokens and
        max_prefill_tokens prompt tokens this turn. The head request is always taken
        into an empty batch, so nothing waits forever. Requests cancelled while queued
        end with ABORT."""
        taken: list[RequestState] = []
        rows, tokens, prefill = batch.size, batch.reserved_tokens, 0
        while self._intake:
            head = self._intake[0]
            if head.cancelled:
                self._intake.popleft()
                self._queued_samples -= head.n
                batch.abort_unstarted(head)
                continue
            head_rows = head.n if head.max_new_tokens > 0 else 0
            fits = (
                rows + head_rows <= self.max_batch_size
                and tokens + head.reserved_tokens <= self.max_batch_tokens
                and prefill + len(head.input_ids) <= self.max_prefill_tokens
            )
            if not fits and (taken or rows):
                break
            taken.append(self._intake.popleft())
            self._queued_samples -= head.n
            rows += head_rows
            tokens += head.reserved_tokens
            prefill += len(head.input_ids)
        return taken

    def _apply_commit(self, commit: _PendingCommit, batch: Batch) -> None:
        if not commit.future.set_running_or_notify_cancel():
            return
        current = self._policy.version
        if not commit.resync and commit.version != current + 1:
            commit.future.set_exception(
                FailedPrecondition(f"cannot commit version {commit.version}: serving {current}, expected {current + 1}")
            )
            return
        try:
            self.runner.check_weights(commit.staged)
        except ValueError as exc:
            commit.future.set_exception(InvalidArgument(str(exc)))
            return
        try:
            if commit.adopt:
                self._adopt_weights(commit.staged)
            else:
                self.runner.load_weights(commit.staged)
        except Exception as exc:
            self._broken = f"weight commit of version {commit.version} failed part-way ({exc}); restart the shard"
            log.exception("weight commit failed part-way; the engine stops serving")
            commit.future.set_exception(Unavailable(self._broken))
            return
        self._policy = ServedPolicy(commit.version, time.time(), commit.step)
        # Keys and values cached by the old weights are recomputed before the next token
        # (there is no prefix cache, so nothing computed before the commit is reused).
        batch.invalidate_cache()
        log.info("serving policy version %d (step %d)", commit.version, commit.step)
        commit.future.set_result(self._policy)

    def _apply_memory_op(self, kind: str, future: concurrent.futures.Future[MemoryReport], batch: Batch) -> None:
        if not future.set_running_or_notify_cancel():
            return
        freed = 0
        if kind == "release":
            freed = batch.cache.release() if not self._released else 0
            self._released = True
            batch.invalidate_cache()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        else:
            self._released = False
        report = measure("released" if self._released else "resumed", self.device, batch.cache.bytes_allocated, freed)
        log.info("KV cache %s (%d bytes freed)", report.phase, freed)
        future.set_result(report)

    def _adopt_weights(self, staged: Mapping[str, torch.Tensor]) -> None:
        """Point each parameter at its staged tensor (a copy where dtype or device
        differ): a commit of any size then costs no memory traffic."""
        with torch.no_grad():
            for name, param in self.runner.model.named_parameters():
                tensor = staged[name]
                if tensor.dtype == param.dtype and tensor.device == param.device:
                    param.data = tensor
                else:
                    param.copy_(tensor)

    def _shutdown(self, batch: Batch) -> None:
        with self._cv:
            waiting, self._intake = list(self._intake), collections.deque()
            self._queued_samples = 0
            commits, self._commits = self._commits, []
            memory_ops, self._memory_ops = self._memory_ops, []
        for _, future in memory_ops:
            if future.set_running_or_notify_cancel():
                future.set_exception(Unavailable("the engine is shutting down"))
        batch.fail(waiting, Unavailable("the engine is shutting down"))
        batch.flush()
        for commit in commits:
            if commit.future.set_running_or_notify_cancel():
                commit.future.set_exception(Unavailable("the engine is shutting down"))

    def _decode_text(self, ids: list[int]) -> str:
        # A flat id list decodes to one string (transformers types decode as str | list[str]).
        return cast(str, self.tokenizer.decode(ids))


def _eos_ids(model: torch.nn.Module, tokenizer) -> set[int]:
    ids: set[int] = set()
    sources = [getattr(model, "generation_config", None), model.config]
    for source in sources:
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def engine_from_settings(settings, device: str | None = None) -> GenerationEngine:
    """Build the engine an InferenceSettings describes (on `device`, default its device)."""
    return GenerationEngine(
        settings.resolved_model_path(),
        device=device or settings.device,
        dtype=settings.dtype,
        max_batch_size=settings.max_batch_size,
        max_batch_tokens=settings.max_batch_tokens,
        max_prefill_tokens=settings.max_prefill_tokens,
        max_context_len=settings.max_context_len,
        default_max_new_tokens=settings.default_max_new_tokens,
        seed=settings.seed,
        single_thread_work=settings.single_thread_work,
    )


__all__ = ["GenerationEngine", "GenerationStream", "engine_from_settings"]
