"""The gateway's pool of InferenceService targets: routed calls, model info and the
tokenizer (`InferencePool`, the gateway's client of InferenceService).

Every call goes to the least loaded healthy target (routing.py). A call that fails
UNAVAILABLE before its first message is retried on another healthy target, so a target
that just died costs no request. A guard (call_guard.py) bounds each call: a target
found frozen or unreachable while the call waits cancels it (retried elsewhere if
nothing was streamed yet, else 503), and a streaming call's first token and every gap
between tokens have deadlines (retried elsewhere before the first token, else 504). Every Completion that passes through is handed to the
version receipts (trajectory/receipts.py), so scored data submitted later can be
attributed to the policy version that produced it.

The tokenizer (chat templates, text prompts and outputs) is loaded once, in its own
thread: from `tokenizer_path`, as the gateway starts (`preload_tokenizer`), else on first
use by the model name the inference service reports (a Hugging Face id; the inference
service never hands out local paths).
A tokenizer that cannot be loaded is answered 503 without the path or the cause, which go
to the gateway's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
from grpc import aio
from opentelemetry import context as otel_context

from clotho.v1 import inference_service_pb2 as pb
from services.common.errors import ClothoError, Unavailable
from services.gateway.generation.call_guard import CallGuard, Deadlines
from services.gateway.generation.routing import Router, Target
from services.gateway.trajectory import receipts as _receipts

log = logging.getLogger(__name__)
T = TypeVar("T")
# The methods' full names (their client spans' names).
GENERATE = "/clotho.v1.InferenceService/Generate"
GET_MODEL_INFO = "/clotho.v1.InferenceService/GetModelInfo"

NO_INFERENCE = (
    "no inference service configured: start the gateway with --inference host:port "
    "(or CLOTHO_GATEWAY_INFERENCE) to serve /generate and the OpenAI routes"
)


def completion_version(completion: pb.Completion) -> int:
    """The version a completion is attributed to: the oldest that produced any of its
    tokens (a commit mid-sample makes it partly older; staleness counts the oldest)."""
    spans = completion.version_spans
    return min(s.version for s in spans) if spans else 0


def record_receipt(completion: pb.Completion) -> None:
    try:
        _receipts.record(list(completion.output_ids), completion_version(completion))
    except Exception:
        log.exception("could not record the version receipt of a completion")


class InferencePool:
    """Talks to one or more InferenceService targets through a Router."""

    def __init__(
        self,
        targets: list[str],
        tokenizer_path: str | None = None,
        timeout_seconds: float = 600.0,
        eject_seconds: float = 5.0,
        router: Router | None = None,
        deadlines: Deadlines | None = None,
        probe_timeout_seconds: float = 5.0,
    ) -> None:
        self.targets = list(targets)
        self.timeout_seconds = timeout_seconds
        self.deadlines = deadlines or Deadlines()
        self.router = router or Router(
            self.targets, eject_seconds=eject_seconds, probe_timeout_seconds=probe_timeout_seconds
        )
        self._tokenizer_path = tokenizer_path
        self._model_info: pb.GetModelInfoResponse | None = None
        self._tokenizer: Any = None
        self._tokenizer_lock = asyncio.Lock()
        # One thread for tokenizer work: off the event loop, and never two calls into
        # the same fast tokenizer at once (it raises "Already borrowed").
        self._tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")

    @property
    def configured(self) -> bool:
        return bool(self.targets)

    @property
    def tokenizer_path(self) -> str | None:
        return self._tokenizer_path

    async def _unary(self, call: Callable[[Target], Any]) -> Any:
        """One unary call on the least loaded target, failing over on UNAVAILABLE and
        on a target lost while the call waits."""
        if not self.targets:
            raise Unavailable(NO_INFERENCE)
        tried: list[Target] = []
        while True:
            target = self.router.acquire(exclude=tried)
            guard = None
            try:
                pending = call(target)
                guard = CallGuard(pending, target, self.deadlines, streaming=False)
                return await pending
            except (aio.AioRpcError, asyncio.CancelledError) as exc:
                self._fail_over(target, guard, exc, tried, streamed=False)
            finally:
                if guard is not None:
                    guard.close()
                self.router.release(target)

    async def model_info(self, refresh: bool = False, timeout: float | None = None) -> pb.GetModelInfoResponse:
        if self._model_info is None or refresh:
            self._model_info = await self._unary(
                lambda t: t.call(
                    GET_MODEL_INFO, t.stub.GetModelInfo, pb.GetModelInfoRequest(), timeout or self.timeout_seconds
                )
            )
        return self._model_info

    async def tokenizer(self) -> Any:
        """The tokenizer, loaded once; raises Unavailable naming the path if it cannot be."""
        if self._tokenizer is not None:
            return self._tokenizer
        async with self._tokenizer_lock:
            if self._tokenizer is None:
                path = self._tokenizer_path or (await self.model_info()).model_path
                if not path:
                    raise Unavailable("no tokenizer: set the gateway's --tokenizer-path")
                try:
                    self._tokenizer = await self.in_tokenizer_thread(_load_tokenizer, path)
                except Exception as exc:
                    log.error("could not load the tokenizer from %r: %s", path, exc, exc_info=True)
                    raise Unavailable(
                        "the gateway could not load its tokenizer (see its log); set its --tokenizer-path"
                    ) from None
                log.info("loaded tokenizer from %s", path)
        return self._tokenizer

    async def preload_tokenizer(self) -> None:
        """Load the tokenizer from tokenizer_path now, not on the first request that
        needs it (loading costs seconds: the first generation would wait for it). A
        failure is logged and the load is tried again on use."""
        if not self._tokenizer_path:
            return
        with contextlib.suppress(Unavailable):
            await self.tokenizer()

    async def in_tokenizer_thread(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run tokenizer work (encode, decode, load) in the tokenizer's thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizer_thread, functools.partial(fn, *args, **kwargs))

    async def generate(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
        """The Generate stream for one prompt, under the gateway's deadline, from the
        least loaded healthy target. Close it (or cancel its consumer) to cancel the
        call; use `contextlib.aclosing` where the loop may stop early."""
        if not self.targets:
            raise Unavailable(NO_INFERENCE)
        tried: list[Target] = []
        while True:
            target = self.router.acquire(exclude=tried)
            received = False
            call = None
            guard = None
            try:
                call = target.call(GENERATE, target.stub.Generate, request, self.timeout_seconds)
                guard = CallGuard(call, target, self.deadlines, streaming=request.stream)
                async for message in call:
                    received = True
                    guard.progress()
                    if message.WhichOneof("payload") == "completion":
                        record_receipt(message.completion)
                    yield message
                return
            except (aio.AioRpcError, asyncio.CancelledError) as exc:
                reason = self._fail_over(target, guard, exc, tried, streamed=received)
                log.info("retrying on another target after %s failed: %s", target.address, reason)
            finally:
                if guard is not None:
                    guard.close()
                if call is not None:
                    call.cancel()
                self.router.release(target)

    async def generate_many(
        self, requests: list[pb.GenerateRequest], trace_context: Any = None
    ) -> AsyncGenerator[tuple[int, pb.GenerateResponse], None]:
        """The messages of several Generate streams as they arrive, each with its
        request's position. The first failure cancels the others and is raised.
        `trace_context` (an OpenTelemetry Context) parents the calls' spans."""
        queue: asyncio.Queue[tuple[int, pb.GenerateResponse | None, BaseException | None]] = asyncio.Queue()

        async def pump(i: int, request: pb.GenerateRequest) -> None:
            token = otel_context.attach(trace_context) if trace_context is not None else None
            try:
                async for message in self.generate(request):
                    await queue.put((i, message, None))
            except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
                await queue.put((i, None, exc))
                return
            finally:
                if token is not None:
                    otel_context.detach(token)
            await queue.put((i, None, None))

        tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
        try:
            open_streams = len(tasks)
            while open_streams:
                i, message, error = await queue.get()
                if error is not None:
                    raise error
                if message is None:
                    open_streams -= 1
                    continue
                yield i, message
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def collect(self, request: pb.GenerateRequest) -> list[pb.Completion]:
        """Every sample's final Completion, in sample order."""
        n = request.sampling_params.n if request.sampling_params.HasField("n") else 1
        n = max(n, 1)
        done: dict[int, pb.Completion] = {}
        async for message in self.generate(request):
            if message.WhichOneof("payload") == "completion":
                done[message.index] = message.completion
        missing = [i for i in range(n) if i not in done]
        if missing:
            raise Unavailable(f"inference stream ended without a result for sample(s) {missing}")
        return [done[i] for i in range(n)]

    async def close(self) -> None:
        await self.router.close()
        self._tokenizer_thread.shutdown(wait=False, cancel_futures=True)

    def _fail_over(
        self,
        target: Target,
        guard: CallGuard | None,
        exc: aio.AioRpcError | asyncio.CancelledError,
        tried: list[Target],
        *,
        streamed: bool,
    ) -> str:
        """A call to `target` ended with `exc` (called from its except block). Re-raises
        what is not the target's failure, and what cannot move to another target (part
        of the answer already streamed, or no target left); otherwise records the
        failure and returns its reason, to retry elsewhere."""
        error = _guard_error(guard, exc)
        if error is None and (not isinstance(exc, aio.AioRpcError) or exc.code() != grpc.StatusCode.UNAVAILABLE):
            raise exc
        reason = str(error) if error is not None else (exc.details() or exc.code().name)  # type: ignore[union-attr]
        self.router.failed(target, reason)
        tried.append(target)
        if streamed or len(tried) >= len(self.router.targets):
            if error is not None:
                raise error from None
            raise exc
        return reason


def _guard_error(guard: CallGuard | None, exc: BaseException) -> ClothoError | None:
    """The guard's error if the guard ended this call, None if something else did (a
    cancellation of the caller's own task is never the guard's)."""
    if guard is None or guard.error is None:
        return None
    task = asyncio.current_task()
    if isinstance(exc, asyncio.CancelledError) and task is not None and task.cancelling():
        return None
    return guard.error


async def prefetch(stream: AsyncGenerator[T, None]) -> AsyncGenerator[T, None]:
    """Wait for the first item of `stream` and return an iterator over all of it.

    Streaming routes call this before their `200` goes out, so a call that fails at
    once (no healthy target, a request the engine refuses) still answers with its
    own HTTP status instead of an error event inside a 200 stream."""
    try:
        first = await anext(stream)
    except StopAsyncIteration:
        first = None

    async def chained() -> AsyncGenerator[T, None]:
        try:
            if first is not None:
                yield first
                async for item in stream:
                    yield item
        finally:
            await stream.aclose()

    return chained()


def _load_tokenizer(path: str) -> Any:
    # transformers is imported here, not at module load: it is slow to import and only
    # text prompts and text outputs need it. Nothing is downloaded at run time: a path
    # that is not a local directory is looked up in the local cache only (a served model
    # name fails at once instead of retrying the Hub for half a minute).
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)
