"""An SGLang server as a shard, driven through SGLang's HTTP API (no sglang import):
launch or attach, health checks, generation (stream.py) and weight updates (the shard
is its own loader: loader.py)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

import httpx

from services.common.errors import Unavailable
from services.inference.generation_types import GenerationRequest, ServedPolicy
from services.inference.memory import MemoryReport
from services.inference.sglang_server.loader import SGLangLoader
from services.inference.sglang_server.model_spec import ModelSpec
from services.inference.sglang_server.process import SGLangProcess, wait_healthy
from services.inference.sglang_server.stream import SGLangStream
from services.inference.shard import Shard
from services.inference.validation import resolve_max_new_tokens
from services.inference.weight_update import WeightUpdater

log = logging.getLogger(__name__)


class SGLangShard(Shard, SGLangLoader):
    kind = "sglang"

    def __init__(
        self,
        url: str,
        spec: ModelSpec,
        *,
        name: str = "",
        max_n: int = 64,
        default_max_new_tokens: int = 128,
        update_timeout_seconds: float = 600.0,
        health_interval_seconds: float = 5.0,
        startup_timeout_seconds: float = 900.0,
        process: SGLangProcess | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.name = name or self.url
        self.spec = spec
        self.max_n = max_n
        self.default_max_new_tokens = default_max_new_tokens
        self.update_timeout = update_timeout_seconds
        self.health_interval = health_interval_seconds
        self.startup_timeout = startup_timeout_seconds
        self.process = process
        self.client = httpx.AsyncClient(base_url=self.url, timeout=httpx.Timeout(30.0))
        self._init_loader()
        self.updates = WeightUpdater(self, update_timeout_seconds)
        self._load = 0
        self._reachable = False
        self._reported: bool | None = None
        self._health_task: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()

    @property
    def load(self) -> int:
        return self._load

    @property
    def serving(self) -> bool:
        return self._reachable and self._resync_reason is None

    @property
    def not_serving_reason(self) -> str | None:
        if self._resync_reason is not None:
            return self._resync_reason
        return None if self._reachable else f"SGLang server {self.url} does not answer /health"

    @property
    def max_context_len(self) -> int:
        return self.spec.max_context_len

    @property
    def vocab_size(self) -> int:
        return int(self.spec.vocab_size)

    async def start(self) -> None:
        """Launch the server (when this shard owns one) or attach, wait for /health, and
        adopt the weight version it reports when that is a number (a restarted service
        finds the version its server already serves)."""
        if self.process is not None:
            await self.process.start()
        await wait_healthy(self.client, self.startup_timeout, self.process.process if self.process else None)
        self._reachable = True
        tp_size = await self._tp_size()
        if tp_size > 1:
            # SGLang joins the weight group as ranks rank_offset + tp_rank: such a server
            # needs tp_size ranks, and this service counts one rank per shard.
            raise RuntimeError(f"SGLang server {self.url} runs with tp_size {tp_size}; shards must use tp_size 1")
        reported = await self.weight_version()
        if reported is not None and reported.isdigit():
            self._served = ServedPolicy(int(reported))
        self._baseline_version = self._served.version
        log.info("SGLang shard %s ready at %s, weight version %r", self.name, self.url, reported)
        self._report_health()
        self._health_task = asyncio.create_task(self._watch_health())

    def submit(self, request: GenerationRequest) -> SGLangStream:
        if not self.serving:
            raise Unavailable(f"shard {self.name} is not serving: {self.not_serving_reason}")
        max_new_tokens = resolve_max_new_tokens(
            request,
            vocab_size=self.spec.vocab_size,
            max_context_len=self.spec.max_context_len,
            max_n=self.max_n,
            default_max_new_tokens=self.default_max_new_tokens,
        )
        return SGLangStream(self, request, max_new_tokens)

    async def release_memory(self) -> MemoryReport:
        """Colocated mode: retract running requests and have SGLang free its KV cache
        (and weights' memory) with /release_memory_occupation; the server must run with
        --enable-memory-saver."""
        await self._call("/pause_generation", {"mode": "retract"}, timeout=60.0, what="pausing generation")
        await self._call("/release_memory_occupation", {}, timeout=120.0, what="releasing memory")
        return MemoryReport("released", 0)

    async def resume_memory(self) -> MemoryReport:
        """Colocated mode: /resume_memory_occupation, then /continue_generation."""
        await self._call("/resume_memory_occupation", {}, timeout=120.0, what="resuming memory")
        await self._call("/continue_generation", {}, timeout=60.0, what="continuing generation")
        return MemoryReport("resumed", 0)

    async def weight_version(self) -> str | None:
        """The server's weight version: GET /get_weight_version, or the newer
        /weight_version and /model_info where the old route is gone."""
        for route in ("/get_weight_version", "/weight_version", "/model_info", "/get_model_info"):
            try:
                response = await self.client.get(route, timeout=10.0)
            except httpx.HTTPError:
                return None
            if response.status_code == 200:
                value = response.json().get("weight_version")
                if value is not None:
                    return str(value)
        return None

    async def _tp_size(self) -> int:
        for route in ("/server_info", "/get_server_info"):
            try:
                response = await self.client.get(route, timeout=10.0)
            except httpx.HTTPError:
                return 1
            if response.status_code == 200:
                try:
                    return int(response.json().get("tp_size", 1) or 1)
                except (ValueError, AttributeError):
                    return 1
        return 1

    async def close(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
        await self.updates.close()
        for task in list(self._background):
            task.cancel()
        await self.client.aclose()
        if self.process is not None:
            await self.process.stop()

    async def _watch_health(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval)
            try:
                response = await self.client.get("/health", timeout=self.health_interval)
                reachable = response.status_code == 200
            except httpx.HTTPError:
                reachable = False
            if reachable != self._reachable:
                self._reachable = reachable
                self._report_health()

    def _report_health(self) -> None:
        serving = self.serving
        if serving != self._reported:
            self._reported = serving
            self._tell_listener(serving, self.not_serving_reason or "")

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def _version_of(self, reported: str | None) -> int:
        if reported is None:
            return self._served.version
        return int(reported) if reported.isdigit() else self._baseline_version


def sglang_shards_from_settings(settings) -> list[SGLangShard]:
    """Attach to --sglang-urls, or launch --shards servers on loopback (one GPU each)."""
    model_path = settings.resolved_model_path()
    spec = ModelSpec.from_model_dir(model_path, settings.max_context_len)
    common = dict(
        max_n=settings.max_batch_size,
        default_max_new_tokens=settings.default_max_new_tokens,
        update_timeout_seconds=settings.sglang_update_timeout_seconds,
        health_interval_seconds=settings.health_check_interval_seconds,
        startup_timeout_seconds=settings.sglang_startup_timeout_seconds,
    )
    if settings.sglang_urls:
        return [SGLangShard(url, spec, name=f"sglang-{i}", **common) for i, url in enumerate(settings.sglang_urls)]
    shards = []
    for i in range(settings.shards):
        process = SGLangProcess(str(model_path), gpu_id=i, extra_args=settings.sglang_launch_args)
        shards.append(SGLangShard(process.url, spec, name=f"sglang-{i}", process=process, **common))
    return shards
