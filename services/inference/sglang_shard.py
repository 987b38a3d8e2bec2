"""An SGLang server as a shard, driven through SGLang's HTTP API (no sglang import).

Generation: `POST /generate` with `input_ids`, `sampling_params`, `return_logprob` and
`stream: true`; the server-sent events carry `output_ids` and
`meta_info.output_token_logprobs` (cumulative by default, incremental with
`--stream-output`: both are read), `meta_info.finish_reason`, and the weight version:
`meta_info.weight_versions` spans where the server has them, else `weight_version`.
Prompt logprobs come from `logprob_start_len: 0` as `meta_info.input_token_logprobs`
(first entry None). Top-k alternatives: `top_logprobs_num` (one k for the prompt and
the output: the larger of the request's two, each list then cut to its own k) returns
`meta_info.output_top_logprobs` (per generated token, cumulative or incremental as
output_token_logprobs) and `input_top_logprobs` (per prompt position, first entry None),
each position a list of [logprob, token_id, text]. The logprobs are whatever the SGLang
server computes (the raw policy's only where it returns original logprobs).

Weight updates follow the trainer's protocol (ARCHITECTURE.md section 2) with SGLang
receiving the broadcast itself:
  Prepare -> `/init_weights_update_group` (master_address/master_port = the trainer's
             store, rank_offset = this shard's rank, world_size, group_name, backend) when
             the group is new (SGLang forms it as rank rank_offset + tp_rank, a store
             prefixed by group_name), then `/pause_generation` with mode "retract"
             (running requests go back to the queue; their KV cache is recomputed after
             the update), then one `/update_weights_from_distributed` per bucket, in
             order, with the bucket's tensor names, dtypes and shapes and
             load_format "flattened_bucket" (SGLang receives the bucket as one flat
             tensor laid out exactly as the manifest packs it); the last call also
             carries `weight_version` and `flush_cache`.
  Await   -> every bucket call succeeded (SGLang holds the bytes on the GPU, so the
             checksums cannot be compared here).
  Commit  -> `/flush_cache`, `/continue_generation`; the new version is read back.
  Abort   -> before any bucket reached SGLang: `/continue_generation`, old weights kept.
             After: SGLang has overwritten weights in place, so the shard goes
             NOT_SERVING (gRPC health) and its requests are aborted until an update
             replaces every weight (the trainer's next push or resync).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
import torch
from clotho.v1 import inference_service_pb2 as pb

from services.common.errors import (
    Aborted,
    ClothoError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    Unavailable,
)
from services.common.weight_transfer import BACKEND_NAMES, Manifest
from services.inference.api import (
    Completion,
    FinishReason,
    GenerationRequest,
    PolicyState,
    TokenChunk,
    TopLogprobs,
    VersionSpan,
)
from services.inference.sglang_process import SGLangProcess, wait_healthy
from services.inference.shard import HealthListener
from services.inference.validation import check_manifest, resolve_max_new_tokens

log = logging.getLogger(__name__)

WIRE_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
FINISH_TYPES = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.ABORT}


@dataclass(frozen=True)
class ModelSpec:
    """What the service knows of the served model without loading its weights."""

    param_specs: dict[str, tuple[tuple[int, ...], torch.dtype]]
    vocab_size: int
    max_context_len: int

    @classmethod
    def from_model_dir(cls, model_path: str | Path, max_context_len: int | None = None) -> "ModelSpec":
        """Parameter names and shapes from the config (a model built on the meta device)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(model_path))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        specs = {name: (tuple(p.shape), p.dtype) for name, p in model.named_parameters()}
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        context = max_context_len or int(getattr(text, "max_position_embeddings", 0) or 2048)
        return cls(specs, int(text.vocab_size), context)


@dataclass(eq=False)
class _Update:
    version: int
    step: int
    manifest: Manifest
    group_name: str
    resync: bool
    deadline_seconds: float
    started: float
    paused: bool = False
    # A bucket call reached SGLang: its weights may no longer be the served version's.
    sent: bool = False
    task: asyncio.Task | None = None
    timer: asyncio.TimerHandle | None = None
    error: ClothoError | None = None
    seconds: float = 0.0


class SGLangShard:
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
        self._policy = PolicyState()
        # The version of weights the server names with something other than a number
        # (SGLang's initial "default"): what it served before any update of ours.
        self._baseline_version = 0
        self._load = 0
        self._reachable = False
        self._resync_reason: str | None = None
        self._reported: bool | None = None
        self._listener: HealthListener | None = None
        self._update: _Update | None = None
        self._last_failure: tuple[int, ClothoError] | None = None
        self._group: tuple[str, str, int, int, int, str] | None = None
        # Groups SGLang still holds that a failed update left behind: destroyed before
        # the next group is formed.
        self._stale_groups: list[str] = []
        self._health_task: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()

    # -- shard surface ----------------------------------------------------------------

    @property
    def policy(self) -> PolicyState:
        return self._policy

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

    def set_health_listener(self, listener: HealthListener) -> None:
        self._listener = listener

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
            self._policy = PolicyState(int(reported))
        self._baseline_version = self._policy.version
        log.info("SGLang shard %s ready at %s, weight version %r", self.name, self.url, reported)
        self._report_health()
        self._health_task = asyncio.create_task(self._watch_health())

    def submit(self, request: GenerationRequest) -> "SGLangStream":
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
        if self._update is not None:
            self._fail(self._update, Unavailable("the service is shutting down"))
        for task in list(self._background):
            task.cancel()
        await self.client.aclose()
        if self.process is not None:
            await self.process.stop()

    # -- weight updates ---------------------------------------------------------------

    async def prepare(
        self,
        version: int,
        manifest_msg: pb.WeightManifest,
        rendezvous: pb.Rendezvous,
        deadline_seconds: float,
        step: int,
        resync: bool = False,
    ) -> bool:
        if self._update is not None:
            raise FailedPrecondition(
                f"weight update to version {self._update.version} is in flight; commit or abort it first"
            )
        current = self._policy.version
        if not resync and version != current + 1:
            raise FailedPrecondition(f"cannot prepare version {version}: serving {current}, expected {current + 1}")
        manifest = self._check_manifest(manifest_msg)
        backend = self._check_rendezvous(rendezvous)
        if math.isnan(deadline_seconds) or deadline_seconds < 0:
            raise InvalidArgument(f"deadline_seconds must be >= 0, got {deadline_seconds}")
        deadline_seconds = deadline_seconds or self.update_timeout
        update = _Update(version, step, manifest, rendezvous.group_name, resync, deadline_seconds, time.monotonic())
        self._update = update
        self._last_failure = None
        update.timer = asyncio.get_running_loop().call_later(deadline_seconds, self._expire, update)

        key = (backend, rendezvous.address, rendezvous.port, rendezvous.world_size, rendezvous.rank_offset,
               rendezvous.group_name)
        joined = False
        try:
            if self._group != key:
                if self._group is not None:
                    self._stale_groups.append(self._group[-1])
                self._group = None
                while self._stale_groups:
                    await self._destroy_group(self._stale_groups.pop())
                # SGLang answers once every rank has joined (the trainer joins meanwhile).
                await self._call(
                    "/init_weights_update_group",
                    {
                        "master_address": rendezvous.address,
                        "master_port": rendezvous.port,
                        "rank_offset": rendezvous.rank_offset,
                        "world_size": rendezvous.world_size,
                        "group_name": rendezvous.group_name,
                        "backend": backend,
                    },
                    timeout=deadline_seconds,
                    what=f"joining weight group {rendezvous.group_name!r} as rank {rendezvous.rank_offset}",
                )
                self._group, joined = key, True
            if update.error is None:
                await self._call("/pause_generation", {"mode": "retract"}, timeout=60.0, what="pausing generation")
                update.paused = True
        except ClothoError as exc:
            raise self._fail(update, exc) from None
        if update.error is not None:
            # Dropped meanwhile (its deadline passed): nothing may stay paused for it.
            if update.paused:
                self._spawn(self._call("/continue_generation", {}, timeout=60.0, what="continuing generation",
                                       check=False))
            raise update.error
        update.task = asyncio.create_task(self._send_buckets(update))
        update.task.add_done_callback(lambda t: t.cancelled() or t.exception())
        log.info("shard %s preparing %sversion %d: %d buckets, %d bytes, group %s (%s)", self.name,
                 "a resync to " if resync else "", version, len(manifest.buckets), manifest.total_bytes,
                 rendezvous.group_name, "joined" if joined else "reused")
        return joined

    async def await_transfer(self, version: int, bucket_crc32s: list[int]) -> tuple[int, float]:
        update = self._in_flight(version, "await")
        buckets = len(update.manifest.buckets)
        if len(bucket_crc32s) != buckets:
            raise self._fail(
                update, Aborted(f"version {version}: got {len(bucket_crc32s)} checksums for {buckets} buckets")
            )
        assert update.task is not None
        remaining = max(0.0, update.started + update.deadline_seconds - time.monotonic())
        done, _ = await asyncio.wait([update.task], timeout=remaining)
        if update.error is not None:
            raise update.error
        if not done:
            raise self._fail(update, DeadlineExceeded(
                f"version {version}: buckets still missing after the {update.deadline_seconds:.1f}s deadline"))
        if update.task.exception() is not None:
            error = update.task.exception()
            raise self._fail(update, error if isinstance(error, ClothoError) else Aborted(str(error)))
        # SGLang received the bytes straight into its own memory: the checksums describe
        # what the trainer sent and cannot be recomputed here.
        return update.manifest.total_bytes, update.seconds

    async def commit(self, version: int) -> PolicyState:
        if self._update is None and self._policy.version == version and self.serving:
            return self._policy  # a retried commit that already happened
        update = self._in_flight(version, "commit")
        if update.task is None or not update.task.done() or update.task.exception() is not None:
            raise FailedPrecondition(f"version {version} is not received yet: call AwaitWeightTransfer first")
        if update.timer is not None:
            update.timer.cancel()
        try:
            # No prefix cached under the old weights may serve a later request.
            await self._call("/flush_cache", None, timeout=60.0, what="flushing the cache", check=False)
            await self._call("/continue_generation", {}, timeout=60.0, what="continuing generation")
        except ClothoError as exc:
            raise self._fail(update, exc) from None
        self._update = None
        self._policy = PolicyState(version, time.time(), update.step)
        self._resync_reason = None
        reported = await self.weight_version()
        if reported is not None and reported != str(version):
            log.warning("shard %s reports weight version %r after committing %d", self.name, reported, version)
        log.info("shard %s serves policy version %d (step %d)", self.name, version, update.step)
        self._report_health()
        return self._policy

    async def abort(self, version: int, reason: str) -> PolicyState:
        update = self._update
        if update is None or update.version != version:
            return self._policy
        self._fail(update, Aborted(f"version {version} aborted by the trainer: {reason or 'no reason given'}"))
        return self._policy

    # -- internals --------------------------------------------------------------------

    async def _send_buckets(self, update: _Update) -> None:
        manifest = update.manifest
        last = len(manifest.buckets) - 1
        for i in range(len(manifest.buckets)):
            tensors = sorted(manifest.tensors_in(i), key=lambda t: t.offset)
            body: dict[str, Any] = {
                "names": [t.name for t in tensors],
                "dtypes": [WIRE_DTYPES[t.dtype] for t in tensors],
                "shapes": [list(t.shape) for t in tensors],
                "group_name": update.group_name,
                "flush_cache": i == last,
                "abort_all_requests": False,
                "load_format": "flattened_bucket",
            }
            if i == last:
                # Only once every weight is in: the server stamps tokens with it from then on.
                body["weight_version"] = str(update.version)
            update.sent = True
            await self._call("/update_weights_from_distributed", body, timeout=self.update_timeout,
                             what=f"receiving bucket {i} of {last + 1}")
        update.seconds = time.monotonic() - update.started

    async def _call(
        self, route: str, body: dict | None, *, timeout: float, what: str, check: bool = True
    ) -> dict:
        """POST to the server; SGLang answers {"success": false, "message": ...} with
        HTTP 400 when an operation fails."""
        try:
            response = await self.client.post(route, json=body, timeout=timeout)
        except httpx.TimeoutException:
            raise DeadlineExceeded(f"shard {self.name}: {what} timed out after {timeout:.0f}s") from None
        except httpx.HTTPError as exc:
            raise Unavailable(f"shard {self.name}: {what} failed: {type(exc).__name__}: {exc}") from None
        try:
            payload = response.json()
        except ValueError:
            payload = {"message": response.text.strip()}
        if not isinstance(payload, dict):
            payload = {"message": str(payload)}
        if response.status_code != 200 or payload.get("success") is False:
            message = f"shard {self.name}: {what} failed: HTTP {response.status_code} {payload.get('message', '')}"
            if check:
                raise Aborted(message)
            log.warning("%s", message)
        return payload

    def _fail(self, update: _Update, error: ClothoError) -> ClothoError:
        """Drop `update`. Weights SGLang may have overwritten make the shard NOT_SERVING
        until a complete update; otherwise generation simply continues."""
        if update.error is not None:
            return update.error
        update.error = error
        if update.timer is not None:
            update.timer.cancel()
        if update.task is not None and not update.task.done():
            update.task.cancel()
        if self._update is update:
            self._update = None
        self._last_failure = (update.version, error)
        # The trainer re-forms the group under a new name after any failure.
        if self._group is not None:
            self._stale_groups.append(self._group[-1])
        self._group = None
        if update.sent:
            self._resync_reason = (
                f"weight update to version {update.version} failed after SGLang began loading it ({error}); "
                "serving nothing until a complete update"
            )
            self._spawn(self._call("/abort_request", {"abort_all": True}, timeout=30.0,
                                   what="aborting requests", check=False))
            self._report_health()
        elif update.paused:
            self._spawn(self._call("/continue_generation", {}, timeout=60.0, what="continuing generation",
                                   check=False))
        log.warning("shard %s dropped weight update %d: %s", self.name, update.version, error)
        return error

    def _expire(self, update: _Update) -> None:
        if self._update is update:
            self._fail(update, DeadlineExceeded(
                f"version {update.version} was not committed within its {update.deadline_seconds:.1f}s deadline"))

    def _in_flight(self, version: int, action: str) -> _Update:
        update = self._update
        if update is not None and update.version == version:
            return update
        if self._last_failure is not None and self._last_failure[0] == version:
            raise self._last_failure[1]
        if update is None:
            raise FailedPrecondition(f"cannot {action} version {version}: no weight update is prepared")
        raise FailedPrecondition(f"cannot {action} version {version}: the update in flight is version {update.version}")

    def _check_manifest(self, msg: pb.WeightManifest) -> Manifest:
        manifest = check_manifest(msg, self.spec.param_specs)
        for i, bucket in enumerate(manifest.buckets):
            # SGLang rebuilds a flattened bucket by concatenating its tensors in order.
            offset = 0
            for t in sorted(manifest.tensors_in(i), key=lambda t: t.offset):
                if t.offset != offset:
                    raise InvalidArgument(f"manifest: bucket {i} is not packed densely in order at tensor {t.name!r}")
                offset += t.numel
            if offset != bucket.numel:
                raise InvalidArgument(f"manifest: bucket {i} holds {offset} elements, declares {bucket.numel}")
        return manifest

    def _check_rendezvous(self, r: pb.Rendezvous) -> str:
        backend = BACKEND_NAMES.get(r.backend)
        if backend is None:
            raise InvalidArgument(f"rendezvous: backend must be GLOO or NCCL, got {r.backend}")
        if not r.address or not 0 < r.port < 65536:
            raise InvalidArgument(f"rendezvous: bad store address {r.address!r}:{r.port}")
        if not r.group_name:
            raise InvalidArgument("rendezvous: group_name is empty")
        if not 1 <= r.rank_offset < r.world_size:
            raise InvalidArgument(
                f"rendezvous: rank_offset {r.rank_offset} must be in [1, world_size {r.world_size}) (rank 0 is the trainer)"
            )
        return backend

    async def _destroy_group(self, group_name: str) -> None:
        """Best effort: servers without the route, or with a broken group, are left be."""
        try:
            await self.client.post("/destroy_weights_update_group", json={"group_name": group_name}, timeout=10.0)
        except httpx.HTTPError as exc:
            log.info("shard %s: could not destroy group %s: %s", self.name, group_name, exc)

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
            if self._listener is not None:
                self._listener(serving, self.not_serving_reason or "")

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def _version_of(self, reported: str | None) -> int:
        if reported is None:
            return self._policy.version
        return int(reported) if reported.isdigit() else self._baseline_version


@dataclass(eq=False)
class _Sample:
    index: int
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    spans: list[VersionSpan] = field(default_factory=list)
    prompt_logprobs: tuple[float, ...] = ()
    prompt_tokens: int = 0
    output_top_logprobs: list[TopLogprobs] = field(default_factory=list)
    prompt_top_logprobs: tuple[TopLogprobs, ...] = ()
    done: bool = False


class SGLangStream:
    """One request on an SGLang shard: a streaming POST /generate read as events."""

    def __init__(self, shard: SGLangShard, request: GenerationRequest, max_new_tokens: int) -> None:
        self.shard = shard
        self.request = request
        self.max_new_tokens = max_new_tokens
        self._n = request.sampling.n
        self._samples = [_Sample(i) for i in range(self._n)]
        self._open = True
        self._agen: AsyncIterator | None = None
        shard._load += self._n

    def __aiter__(self) -> AsyncIterator[TokenChunk | Completion]:
        self._agen = self._events()
        return self._agen

    def cancel(self) -> None:
        """Closing the connection makes SGLang abort the request."""
        agen, self._agen = self._agen, None
        if agen is not None:
            self.shard._spawn(agen.aclose())  # type: ignore[attr-defined]
        self._release()

    def body(self) -> dict[str, Any]:
        opts = self.request.sampling
        sampling: dict[str, Any] = {
            "temperature": opts.temperature,
            "top_p": opts.top_p,
            "top_k": opts.top_k if opts.top_k > 0 else -1,
            "max_new_tokens": self.max_new_tokens,
            "stop": list(opts.stop),
            "stop_token_ids": list(opts.stop_token_ids),
            "ignore_eos": opts.ignore_eos,
            "no_stop_trim": True,
            # SGLang's names and semantics match SamplingParams' (its logprobs, as ever,
            # are what the server reports).
            "frequency_penalty": opts.frequency_penalty,
            "presence_penalty": opts.presence_penalty,
            "repetition_penalty": opts.repetition_penalty,
        }
        body: dict[str, Any] = {
            "return_logprob": True,
            "logprob_start_len": 0 if self.request.wants_prompt_logprobs else -1,
            "stream": True,
        }
        top = max(self.request.top_logprobs, self.request.prompt_top_logprobs)
        if top > 0:
            body["top_logprobs_num"] = top
        ids = list(self.request.input_ids)
        if opts.seed is not None and self._n > 1:
            # One seed for n parallel samples would make them identical: a batch of n
            # copies with seeds seed..seed+n-1 (the prefix cache still shares the prompt).
            body["input_ids"] = [ids] * self._n
            body["sampling_params"] = [dict(sampling, sampling_seed=opts.seed + i) for i in range(self._n)]
        else:
            if opts.seed is not None:
                sampling["sampling_seed"] = opts.seed
            if self._n > 1:
                sampling["n"] = self._n
            body["input_ids"] = ids
            body["sampling_params"] = sampling
        return body

    async def _events(self) -> AsyncIterator[TokenChunk | Completion]:
        shard = self.shard
        try:
            async with shard.client.stream("POST", "/generate", json=self.body(), timeout=httpx.Timeout(30.0, read=None)) as response:
                if response.status_code != 200:
                    text = (await response.aread()).decode(errors="replace")
                    raise _generate_error(response.status_code, text, shard.name)
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if "error" in event:
                        message = event["error"].get("message", str(event["error"])) if isinstance(event["error"], dict) else str(event["error"])
                        raise InvalidArgument(f"SGLang shard {shard.name}: {message}")
                    for out in self._consume(event):
                        yield out
        except httpx.HTTPError as exc:
            raise Unavailable(f"SGLang shard {shard.name}: {type(exc).__name__}: {exc}") from None
        finally:
            self._release()
        for sample in self._samples:
            if not sample.done:
                yield self._completion(sample, FinishReason.ABORT, "")

    def _consume(self, event: dict) -> list[TokenChunk | Completion]:
        sample = self._samples[int(event.get("index", 0)) % self._n]
        meta = event.get("meta_info") or {}
        total = int(meta.get("completion_tokens", len(sample.output_ids)))
        ids = list(event.get("output_ids") or [])
        seen = len(sample.output_ids)
        new_ids = ids[seen:] if len(ids) == total and len(ids) >= seen else ids
        lps = [float(x[0]) if x and x[0] is not None else 0.0 for x in meta.get("output_token_logprobs") or []]
        new_lps = lps[seen:] if len(lps) == total and len(lps) >= seen else lps
        new_lps = (new_lps + [0.0] * len(new_ids))[: len(new_ids)]
        k = self.request.top_logprobs
        new_tops: list[TopLogprobs] = []
        if k > 0:
            tops = [_top_logprobs(x, k) for x in meta.get("output_top_logprobs") or []]
            new_tops = tops[seen:] if len(tops) == total and len(tops) >= seen else tops
            new_tops = (new_tops + [TopLogprobs()] * len(new_ids))[: len(new_ids)]
        if meta.get("input_token_logprobs"):
            sample.prompt_logprobs = tuple(
                float(x[0]) if x and x[0] is not None else 0.0 for x in meta["input_token_logprobs"]
            )
        k_prompt = self.request.prompt_top_logprobs
        if k_prompt > 0 and meta.get("input_top_logprobs"):
            prompt_tops = [_top_logprobs(x, k_prompt) for x in meta["input_top_logprobs"]]
            # One entry per prompt position; any SGLang leaves out are the first ones.
            missing = len(self.request.input_ids) - len(prompt_tops)
            sample.prompt_top_logprobs = (*[TopLogprobs()] * max(0, missing), *prompt_tops)
        sample.prompt_tokens = int(meta.get("prompt_tokens", sample.prompt_tokens) or 0)
        out: list[TokenChunk | Completion] = []
        run_ids: list[int] = []
        run_lps: list[float] = []
        run_tops: list[TopLogprobs] = []
        run_version: int | None = None
        for j, (token, lp) in enumerate(zip(new_ids, new_lps)):
            version = self._version_at(meta, seen + j)
            if not sample.spans or sample.spans[-1].version != version:
                sample.spans.append(VersionSpan(seen + j, version))
            if run_version is not None and version != run_version:
                out.append(TokenChunk(sample.index, tuple(run_ids), tuple(run_lps), run_version, tuple(run_tops)))
                run_ids, run_lps, run_tops = [], [], []
            run_version = version
            run_ids.append(int(token))
            run_lps.append(lp)
            if new_tops:
                run_tops.append(new_tops[j])
        sample.output_ids += [int(t) for t in new_ids]
        sample.logprobs += new_lps
        sample.output_top_logprobs += new_tops
        if run_ids and self.request.stream and run_version is not None:
            out.append(TokenChunk(sample.index, tuple(run_ids), tuple(run_lps), run_version, tuple(run_tops)))
        if not self.request.stream:
            out = []
        finish = meta.get("finish_reason")
        if finish and not sample.done:
            kind = finish.get("type") if isinstance(finish, dict) else str(finish)
            matched = finish.get("matched") if isinstance(finish, dict) else None
            out.append(self._completion(sample, FINISH_TYPES.get(kind, FinishReason.ABORT),
                                        "" if matched is None else str(matched)))
        return out

    def _version_at(self, meta: dict, position: int) -> int:
        spans = meta.get("weight_versions")
        if spans:
            for span in spans:
                if span.get("start", 0) <= position < span.get("end", position + 1):
                    return self.shard._version_of(str(span.get("version")))
            return self.shard._version_of(str(spans[-1].get("version")))
        reported = meta.get("weight_version")
        return self.shard._version_of(None if reported is None else str(reported))

    def _completion(self, sample: _Sample, reason: FinishReason, matched: str) -> Completion:
        sample.done = True
        return Completion(
            index=sample.index,
            output_ids=tuple(sample.output_ids),
            output_logprobs=tuple(sample.logprobs),
            finish_reason=reason,
            matched_stop=matched,
            version_spans=tuple(sample.spans) or (VersionSpan(0, self.shard.policy.version),),
            prompt_logprobs=sample.prompt_logprobs if self.request.wants_prompt_logprobs else (),
            prompt_tokens=sample.prompt_tokens or len(self.request.input_ids),
            output_top_logprobs=tuple(sample.output_top_logprobs),
            prompt_top_logprobs=sample.prompt_top_logprobs,
        )

    def _release(self) -> None:
        if self._open:
            self._open = False
            self.shard._load -= self._n


def _top_logprobs(entries: list | None, k: int) -> TopLogprobs:
    """One position of SGLang's output_top_logprobs / input_top_logprobs (a list of
    [logprob, token_id, text], or None where the position has none), most likely first,
    cut to `k`."""
    pairs = [(float(e[0]), int(e[1])) for e in entries or () if e and e[0] is not None]
    pairs.sort(key=lambda pair: -pair[0])
    pairs = pairs[:k]
    return TopLogprobs(tuple(t for _, t in pairs), tuple(lp for lp, _ in pairs))


def _generate_error(status: int, text: str, shard: str) -> ClothoError:
    try:
        payload = json.loads(text)
        message = payload.get("error", {}).get("message") or payload.get("message") or text
    except (ValueError, AttributeError):
        message = text
    if 400 <= status < 500:
        return InvalidArgument(f"SGLang shard {shard}: {message}")
    return Unavailable(f"SGLang shard {shard}: HTTP {status} {message}")


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
