"""The gateway's side of InferenceService: channels, model info and the tokenizer.

Targets are used round-robin per request. The tokenizer (for text prompts and text
outputs) is loaded once, on first use, in a thread: from `tokenizer_path` if set, else
from the model_path the inference service reports.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable, TypeVar

from clotho.v1 import inference_service_pb2 as pb
from clotho.v1 import inference_service_pb2_grpc as pb_grpc
from services.common.errors import Unavailable
from services.common.server import channel

log = logging.getLogger(__name__)
T = TypeVar("T")

NO_INFERENCE = (
    "no inference service configured: start the gateway with --inference host:port "
    "(or CLOTHO_GATEWAY_INFERENCE) to serve /generate"
)


class InferenceClient:
    """Talks to one or more InferenceService targets."""

    def __init__(self, targets: list[str], tokenizer_path: str | None = None, timeout_seconds: float = 600.0) -> None:
        self.targets = list(targets)
        self.timeout_seconds = timeout_seconds
        self._tokenizer_path = tokenizer_path
        self._channels: list[Any] = []
        self._stubs: list[pb_grpc.InferenceServiceStub] = []
        self._next = itertools.count()
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

    def stub(self) -> pb_grpc.InferenceServiceStub:
        """The next target's stub (channels are opened on first use, on the loop)."""
        if not self.targets:
            raise Unavailable(NO_INFERENCE)
        if not self._stubs:
            self._channels = [channel(t) for t in self.targets]
            self._stubs = [pb_grpc.InferenceServiceStub(c) for c in self._channels]
        return self._stubs[next(self._next) % len(self._stubs)]

    async def model_info(self, refresh: bool = False, timeout: float | None = None) -> pb.GetModelInfoResponse:
        if self._model_info is None or refresh:
            self._model_info = await self.stub().GetModelInfo(
                pb.GetModelInfoRequest(), timeout=timeout or self.timeout_seconds
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
                    raise Unavailable("no tokenizer: set --tokenizer-path; the inference service reports no model_path")
                try:
                    self._tokenizer = await self.in_tokenizer_thread(_load_tokenizer, path)
                except Exception as exc:  # noqa: BLE001 - any load failure is reported the same way
                    raise Unavailable(f"could not load the tokenizer from {path!r}: {exc}") from exc
                log.info("loaded tokenizer from %s", path)
        return self._tokenizer

    async def in_tokenizer_thread(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run tokenizer work (encode, decode, load) in the tokenizer's thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizer_thread, functools.partial(fn, *args, **kwargs))

    def generate(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
        """The Generate stream for one prompt, under the gateway's deadline."""
        return self.stub().Generate(request, timeout=self.timeout_seconds)

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
        for ch in self._channels:
            await ch.close()
        self._channels, self._stubs = [], []
        self._tokenizer_thread.shutdown(wait=False, cancel_futures=True)


def _load_tokenizer(path: str) -> Any:
    # transformers is imported here, not at module load: it is slow to import and only
    # text prompts and text outputs need it.
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
