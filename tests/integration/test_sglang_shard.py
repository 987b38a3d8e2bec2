"""The SGLang shard adapter against a stand-in SGLang server (FastAPI on loopback, in this
process) that implements the routes the adapter drives, with SGLang's field names
(pydantic models that refuse unknown fields), records every call, and really joins the
weight group and receives each flattened bucket over gloo, the way SGLang's
init_custom_process_group and `load_format="flattened_bucket"` do.

Checked: the generate request and the streamed results (top-k logprobs included); the update sequence (init group
with the shard's rank, pause in "retract" mode, one update per bucket in order with the
manifest's names/dtypes/shapes, weight_version on the last, flush, continue); the
weights SGLang rebuilds equal the trainer's; a request in flight across the commit
reports both versions; a failed update turns the shard's gRPC health NOT_SERVING until a
complete update; several shards as consecutive ranks with least-loaded dispatch.
A `gpu` test runs the adapter against a real SGLang server when one can start.
"""

from __future__ import annotations

import asyncio
import datetime
import importlib.util
import json
import socket
import threading
import uuid
from typing import Any, Literal, cast

import pytest
import pytest_asyncio
import torch
import torch.distributed as dist
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import BaseModel, ConfigDict
from transformers import AutoModelForCausalLM

from clotho.v1 import inference_service_pb2 as pb
from clotho.v1 import inference_service_pb2_grpc as pb_grpc
from services.common.errors import Aborted, FailedPrecondition, InvalidArgument
from services.common.server import channel
from services.common.weight_wire import CollectiveGroup, build_manifest, crc32, pack_bucket
from services.inference.generation_types import (
    Completion,
    FinishReason,
    GenerationRequest,
    SamplingOptions,
    TokenChunk,
    TopLogprobs,
)
from services.inference.server import create_server, shard_health_name
from services.inference.settings import InferenceSettings
from services.inference.sglang_server.shard import ModelSpec, SGLangShard
from services.inference.sglang_server.stream import SGLangStream
from waiting import wait_until

TIMEOUT = 20.0
BUCKET_BYTES = 96 * 1024
VOCAB = 50


# -- the stand-in SGLang server ---------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InitWeightsUpdateGroupReqInput(_Strict):
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str = "weight_update_group"
    backend: str = "nccl"


class UpdateWeightsFromDistributedReqInput(_Strict):
    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    group_name: str = "weight_update_group"
    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: str | None = None
    load_format: str | None = None
    torch_empty_cache: bool = False


class DestroyWeightsUpdateGroupReqInput(_Strict):
    group_name: str = "weight_update_group"


class PauseGenerationReqInput(_Strict):
    mode: Literal["abort", "retract", "in_place"] = "abort"


class ContinueGenerationReqInput(_Strict):
    torch_empty_cache: bool = True


class AbortReq(_Strict):
    rid: str | None = None
    abort_all: bool = False


class SamplingParams(_Strict):
    """The SGLang sampling fields the adapter may send."""

    max_new_tokens: int | None = 128
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    n: int = 1
    ignore_eos: bool = False
    no_stop_trim: bool = False
    sampling_seed: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0


class GenerateReqInput(_Strict):
    input_ids: list[int] | list[list[int]]
    sampling_params: SamplingParams | list[SamplingParams]
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int | None = None
    stream: bool = False


def fake_token(context: list[int], version: int) -> int:
    """The stand-in's model: the next token depends on the last three and the weights'
    version."""
    return (sum(context[-3:]) * 7 + 3 + 11 * version) % (VOCAB - 3) + 3


def fake_logprob(token: int, version: int) -> float:
    return -0.01 * token - 0.1 * version


def fake_top(token: int, logprob: float, num: int) -> list[list]:
    """The stand-in's top `num` at a position whose most likely token is `token`: what
    SGLang sends per position, [logprob, token_id, text], most likely first."""
    return [[logprob - 0.25 * j, (token + j) % VOCAB, None] for j in range(num)]


def sglang_style_group(
    address: str,
    port: int,
    world_size: int,
    rank: int,
    name: str,
    backend: str,
    torch_helper: bool = True,
    timeout_s: float = TIMEOUT,
):
    """What SGLang's init_custom_process_group does: a tcp:// rendezvous, a store prefixed
    by the group name, torch's process-group helper."""
    from torch.distributed.distributed_c10d import (
        Backend,
        GroupName,
        PrefixStore,
        _new_process_group_helper,
        _world,
        rendezvous,
    )

    timeout = datetime.timedelta(seconds=timeout_s)
    store, rank, world_size = next(rendezvous(f"tcp://{address}:{port}", rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = PrefixStore(name, store)
    if not torch_helper:
        # A second stand-in in this process (a real server is a process of its own, where
        # the group name is free): the store keys torch's helper uses, formed directly.
        return dist.ProcessGroupGloo(PrefixStore("cpu/", PrefixStore(f"{name}/", store)), rank, world_size, timeout)
    pg, _ = _new_process_group_helper(
        world_size, rank, [], Backend(backend), store, group_name=GroupName(name), backend_options=None, timeout=timeout
    )
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


class StandIn:
    """A stand-in SGLang server: routes, recorded calls, a real weight group."""

    def __init__(
        self, weights: dict[str, torch.Tensor], *, incremental: bool = False, torch_helper: bool = True
    ) -> None:
        self.torch_helper = torch_helper
        self.weights = {k: v.clone() for k, v in weights.items()}
        self.weight_version = "default"
        self.incremental = incremental
        self.calls: list[tuple[str, dict, bool]] = []
        self.paused = False
        self.resumed = asyncio.Event()
        self.resumed.set()
        self.groups: dict[str, Any] = {}
        self.fail_bucket: int | None = None
        self.buckets_seen = 0
        self.generate_bodies: list[dict] = []
        self.aborted = 0
        self.tokens_streamed = 0
        self.app = self._build()

    def version_number(self) -> int:
        return int(self.weight_version) if self.weight_version.isdigit() else 0

    def record(self, route: str, body: dict) -> None:
        self.calls.append((route, body, self.paused))

    def routes(self) -> list[str]:
        return [c[0] for c in self.calls]

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.get("/health")
        async def health():
            return {}

        @app.get("/get_weight_version")
        async def get_weight_version():
            return {"weight_version": self.weight_version}

        @app.post("/init_weights_update_group")
        async def init_group(obj: InitWeightsUpdateGroupReqInput):
            self.record("/init_weights_update_group", obj.model_dump())
            try:
                self.groups[obj.group_name] = await asyncio.to_thread(
                    sglang_style_group,
                    obj.master_address,
                    obj.master_port,
                    obj.world_size,
                    obj.rank_offset,
                    obj.group_name,
                    obj.backend,
                    self.torch_helper,
                )
            except Exception as exc:  # noqa: BLE001 - reported as SGLang does
                return JSONResponse({"success": False, "message": f"Failed to init group: {exc}"}, 400)
            return {"success": True, "message": "Succeeded to initialize custom process group."}

        @app.post("/destroy_weights_update_group")
        async def destroy_group(obj: DestroyWeightsUpdateGroupReqInput):
            self.record("/destroy_weights_update_group", obj.model_dump())
            self.groups.pop(obj.group_name, None)
            return {"success": True, "message": "ok"}

        @app.post("/update_weights_from_distributed")
        async def update(obj: UpdateWeightsFromDistributedReqInput):
            self.record("/update_weights_from_distributed", obj.model_dump())
            index = self.buckets_seen
            self.buckets_seen += 1
            if obj.load_format != "flattened_bucket":
                return JSONResponse({"success": False, "message": "expected a flattened bucket"}, 400)
            # As SGLang's FlattenedTensorBucket now does: the tensors' bytes back to back,
            # received as one uint8 buffer and viewed per tensor in its dtype.
            dtypes = [getattr(torch, d) for d in obj.dtypes]
            sizes = [
                int(torch.Size(s).numel()) * torch.empty((), dtype=d).element_size() for s, d in zip(obj.shapes, dtypes)
            ]
            flat = torch.empty(sum(sizes), dtype=torch.uint8)
            pg = self.groups[obj.group_name]
            await asyncio.to_thread(lambda: pg.broadcast(flat, 0).wait())
            if self.fail_bucket == index:
                return JSONResponse(
                    {
                        "success": False,
                        "message": "Failed to update parameter online: boom. "
                        "The full weights of the ModelRunner are partially updated.",
                    },
                    400,
                )
            for name, shape, dtype, part in zip(obj.names, obj.shapes, dtypes, torch.split(flat, sizes)):
                self.weights[name] = part.view(dtype).reshape(shape).clone()
            if obj.weight_version is not None:
                self.weight_version = obj.weight_version
            return {"success": True, "message": "Succeeded to update parameter online."}

        @app.post("/pause_generation")
        async def pause(obj: PauseGenerationReqInput):
            self.record("/pause_generation", obj.model_dump())
            self.paused = True
            self.resumed.clear()
            return {"message": "Generation paused successfully.", "status": "ok"}

        @app.post("/continue_generation")
        async def resume(obj: ContinueGenerationReqInput):
            self.record("/continue_generation", obj.model_dump())
            self.paused = False
            self.resumed.set()
            return {"message": "Generation continued successfully.", "status": "ok"}

        @app.api_route("/flush_cache", methods=["GET", "POST"])
        async def flush():
            self.record("/flush_cache", {})
            return JSONResponse("Cache flushed.", 200)

        @app.post("/abort_request")
        async def abort(obj: AbortReq):
            self.record("/abort_request", obj.model_dump())
            self.aborted += 1
            return JSONResponse({}, 200)

        @app.post("/generate")
        async def generate(obj: GenerateReqInput):
            self.generate_bodies.append(obj.model_dump(exclude_unset=True))
            batch = isinstance(obj.input_ids[0], list)
            prompts = obj.input_ids if batch else [obj.input_ids]
            params = obj.sampling_params if isinstance(obj.sampling_params, list) else [obj.sampling_params]
            items = []
            for i, ids in enumerate(prompts):
                sp = params[i if batch else 0]
                items += [(ids, sp)] * (1 if batch else sp.n)
            return StreamingResponse(self._stream(items, obj), media_type="text/event-stream")

        return app

    async def _stream(self, items, obj: GenerateReqInput):
        state = [dict(ids=list(ids), out=[], lps=[], spans=[], sp=sp) for ids, sp in items]
        aborted_at = self.aborted
        for _step in range(max(s["sp"].max_new_tokens for s in state)):
            for index, s in enumerate(state):
                if s.get("done"):
                    continue
                await self.resumed.wait()
                version = self.version_number()
                token = fake_token(s["ids"] + s["out"], version)
                if not s["spans"] or s["spans"][-1]["version"] != self.weight_version:
                    s["spans"].append({"version": self.weight_version, "start": len(s["out"]), "end": len(s["out"])})
                s["out"].append(token)
                s["lps"].append(fake_logprob(token, version))
                s["spans"][-1]["end"] = len(s["out"])
                self.tokens_streamed += 1
                finish: dict[str, Any] | None = None
                if self.aborted != aborted_at:
                    finish = {"type": "abort", "message": "Abort all requests"}
                elif s["sp"].stop_token_ids and token in s["sp"].stop_token_ids:
                    finish = {"type": "stop", "matched": token}
                elif len(s["out"]) >= s["sp"].max_new_tokens:
                    finish = {"type": "length", "length": len(s["out"])}
                s["done"] = finish is not None
                yield self._event(index, s, finish, obj)
                await asyncio.sleep(0.002)
            if all(s.get("done") for s in state):
                break
        yield b"data: [DONE]\n\n"

    def _event(self, index: int, s: dict, finish, obj: GenerateReqInput) -> bytes:
        ids = s["out"][-1:] if self.incremental else list(s["out"])
        lps = [[lp, t, None] for lp, t in zip(s["lps"], s["out"])]
        meta = {
            "id": uuid.uuid4().hex,
            "finish_reason": finish,
            "prompt_tokens": len(s["ids"]),
            "completion_tokens": len(s["out"]),
            "cached_tokens": 0,
            "output_token_logprobs": lps[-1:] if self.incremental else lps,
            "weight_version": self.weight_version,
            "weight_versions": [dict(sp) for sp in s["spans"]],
        }
        if obj.logprob_start_len == 0 and obj.return_logprob:
            meta["input_token_logprobs"] = [[None if i == 0 else -0.5, t, None] for i, t in enumerate(s["ids"])]
        if obj.return_logprob and obj.top_logprobs_num:
            tops = [fake_top(t, lp, obj.top_logprobs_num) for lp, t in zip(s["lps"], s["out"])]
            meta["output_top_logprobs"] = tops[-1:] if self.incremental else tops
            if obj.logprob_start_len == 0:
                # As SGLang: the first prompt position has no prediction (None).
                meta["input_top_logprobs"] = [None] + [fake_top(t, -0.5, obj.top_logprobs_num) for t in s["ids"][1:]]
        return (
            b"data: "
            + json.dumps({"text": "", "output_ids": ids, "meta_info": meta, "index": index}).encode()
            + b"\n\n"
        )


async def start_uvicorn(app: FastAPI) -> tuple[uvicorn.Server, asyncio.Task, str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        assert not task.done(), "the stand-in server did not start"
        await asyncio.sleep(0.01)
    return server, task, f"http://127.0.0.1:{port}"


# -- the trainer side ---------------------------------------------------------------------


class SGLangCompatibleTrainer:
    """Rank 0 of a gloo group formed with the same store prefixes as SGLang's side."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.name = f"clotho-{uuid.uuid4().hex[:12]}"
        self.store = dist.TCPStore(
            "127.0.0.1",
            0,
            world_size,
            is_master=True,
            timeout=datetime.timedelta(seconds=TIMEOUT),
            wait_for_workers=False,
        )
        self.port = self.store.port
        self.pg: dist.ProcessGroupGloo | None = None

    def connect(self) -> None:
        prefix = dist.PrefixStore("cpu/", dist.PrefixStore(f"{self.name}/", dist.PrefixStore(self.name, self.store)))
        self.pg = dist.ProcessGroupGloo(prefix, 0, self.world_size, datetime.timedelta(seconds=TIMEOUT))

    def broadcast(self, flat: torch.Tensor) -> None:
        assert self.pg is not None
        # torch's stub gives Backend (ProcessGroupGloo's base) none of the collectives it has.
        self.pg.broadcast(flat, 0).wait()  # type: ignore[attr-defined]

    def rendezvous(self, rank_offset: int = 1) -> pb.Rendezvous:
        return pb.Rendezvous(
            backend=pb.COLLECTIVE_BACKEND_GLOO,
            address="127.0.0.1",
            port=self.port,
            world_size=self.world_size,
            rank_offset=rank_offset,
            group_name=self.name,
        )


async def push(
    target,
    trainer: SGLangCompatibleTrainer,
    weights: dict[str, torch.Tensor],
    version: int,
    *,
    resync: bool = False,
    between=None,
) -> None:
    """Prepare, broadcast, await, commit on `target` (a shard or a ShardSet)."""
    manifest = build_manifest(list(weights.items()), BUCKET_BYTES)
    connect = None if trainer.pg is not None else asyncio.create_task(asyncio.to_thread(trainer.connect))
    await target.prepare(version, manifest.to_proto(), trainer.rendezvous(), 60.0, 10 * version, resync=resync)
    if connect is not None:
        await connect
    crcs = []
    for i in range(len(manifest.buckets)):
        flat = pack_bucket(manifest, i, weights)
        crcs.append(crc32(flat))
        await asyncio.to_thread(trainer.broadcast, flat)
    await target.await_transfer(version, crcs)
    if between is not None:
        await between()
    await target.commit(version)


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_weights(tiny_model_dir) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def spec(tiny_model_dir) -> ModelSpec:
    return ModelSpec.from_model_dir(tiny_model_dir)


def perturbed(weights: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: w + 0.05 * torch.randn(w.shape, generator=gen) for n, w in weights.items()}


@pytest_asyncio.fixture
async def standins(model_weights):
    servers: list[tuple[uvicorn.Server, asyncio.Task]] = []

    async def make(**kw) -> tuple[StandIn, str]:
        # torch registers group names per process: only the first stand-in uses its helper.
        standin = StandIn(model_weights, torch_helper=not servers, **kw)
        server, task, url = await start_uvicorn(standin.app)
        servers.append((server, task))
        return standin, url

    yield make
    for server, _task in servers:
        server.should_exit = True
    await asyncio.gather(*(t for _, t in servers), return_exceptions=True)


@pytest_asyncio.fixture
async def shard(standins, spec):
    standin, url = await standins()
    s = SGLangShard(url, spec, name="sglang-test", health_interval_seconds=0.2, startup_timeout_seconds=10)
    await s.start()
    yield s, standin
    await s.close()


def expected_tokens(prompt: list[int], steps: int, version: int = 0) -> list[int]:
    out: list[int] = []
    for _ in range(steps):
        out.append(fake_token(prompt + out, version))
    return out


PROMPT = [1, 20, 21, 22, 10]


def only_completion(events: list[TokenChunk | Completion]) -> Completion:
    """The one event of a request that does not stream: its Completion."""
    [c] = events
    assert isinstance(c, Completion)
    return c


# -- generation ---------------------------------------------------------------------------


@pytest.mark.parametrize("incremental", [False, True], ids=["cumulative", "incremental"])
async def test_generate_request_and_stream(standins, spec, incremental):
    standin, url = await standins(incremental=incremental)
    shard = SGLangShard(url, spec, name="s", startup_timeout_seconds=10)
    await shard.start()
    try:
        request = GenerationRequest(
            PROMPT,
            SamplingOptions(
                temperature=0.7,
                top_p=0.9,
                top_k=0,
                max_new_tokens=6,
                stop_token_ids=(999,),
                stop=("zz",),
                n=2,
                seed=5,
                ignore_eos=True,
                frequency_penalty=0.5,
                presence_penalty=-0.25,
                repetition_penalty=1.5,
            ),
            return_prompt_logprobs=True,
            stream=True,
        )
        chunks: dict[int, list[int]] = {0: [], 1: []}
        finals: dict[int, Completion] = {}
        async for event in shard.submit(request):
            if isinstance(event, TokenChunk):
                assert event.index not in finals and event.version == 0
                chunks[event.index] += event.token_ids
            else:
                finals[event.index] = event
        assert shard.load == 0
        expected = expected_tokens(PROMPT, 6)
        for i in (0, 1):
            c = finals[i]
            assert list(c.output_ids) == chunks[i] == expected
            assert c.output_logprobs == pytest.approx([fake_logprob(t, 0) for t in expected])
            assert c.finish_reason is FinishReason.LENGTH and c.prompt_tokens == len(PROMPT)
            assert [(s.start_token, s.version) for s in c.version_spans] == [(0, 0)]
            assert c.prompt_logprobs == (0.0, -0.5, -0.5, -0.5, -0.5)

        # A seeded n=2 request goes out as a batch of two seeds (one seed for n parallel
        # samples would make them identical); the field names are SGLang's.
        [body] = standin.generate_bodies
        assert body["input_ids"] == [PROMPT, PROMPT] and body["stream"] is True
        assert body["return_logprob"] is True and body["logprob_start_len"] == 0
        sp = body["sampling_params"]
        assert [p["sampling_seed"] for p in sp] == [5, 6]
        assert sp[0] == {
            "temperature": pytest.approx(0.7),
            "top_p": pytest.approx(0.9),
            "top_k": -1,
            "max_new_tokens": 6,
            "stop": ["zz"],
            "stop_token_ids": [999],
            "ignore_eos": True,
            "no_stop_trim": True,
            "sampling_seed": 5,
            "frequency_penalty": 0.5,
            "presence_penalty": -0.25,
            "repetition_penalty": 1.5,
        }

        stop = expected[2]
        c = only_completion(
            [
                e
                async for e in shard.submit(
                    GenerationRequest(PROMPT, SamplingOptions(max_new_tokens=6, stop_token_ids=(stop,)))
                )
            ]
        )
        assert c.finish_reason is FinishReason.STOP and c.matched_stop == str(stop)
        assert list(c.output_ids) == expected[: expected.index(stop) + 1]
        assert "n" not in standin.generate_bodies[-1]["sampling_params"]

        with pytest.raises(InvalidArgument, match="outside the vocabulary"):
            shard.submit(GenerationRequest([1, 10_000]))
    finally:
        await shard.close()


def expected_top(token: int, k: int, version: int = 0) -> TopLogprobs:
    entries = fake_top(token, fake_logprob(token, version), k)
    return TopLogprobs(tuple(e[1] for e in entries), tuple(e[0] for e in entries))


@pytest.mark.parametrize("incremental", [False, True], ids=["cumulative", "incremental"])
async def test_top_logprobs_map_from_sglang_meta_info(standins, spec, incremental):
    standin, url = await standins(incremental=incremental)
    shard = SGLangShard(url, spec, name="s", startup_timeout_seconds=10)
    await shard.start()
    try:
        # Different k for the output and the prompt: SGLang takes one top_logprobs_num
        # (the larger); each list is cut to its own k. prompt_top_logprobs implies the
        # prompt logprobs. n=2 with a seed goes out as a batch.
        request = GenerationRequest(
            PROMPT, SamplingOptions(max_new_tokens=5, n=2, seed=1), stream=True, top_logprobs=2, prompt_top_logprobs=3
        )
        chunks: dict[int, list[TopLogprobs]] = {0: [], 1: []}
        finals: dict[int, Completion] = {}
        async for event in shard.submit(request):
            if isinstance(event, TokenChunk):
                assert len(event.top_logprobs) == len(event.token_ids)
                chunks[event.index] += event.top_logprobs
            else:
                finals[event.index] = event
        [body] = standin.generate_bodies
        assert body["top_logprobs_num"] == 3 and body["return_logprob"] is True and body["logprob_start_len"] == 0
        expected = expected_tokens(PROMPT, 5)
        for i in (0, 1):
            c = finals[i]
            assert list(c.output_ids) == expected
            assert list(c.output_top_logprobs) == chunks[i] == [expected_top(t, 2) for t in expected]
            # The sampled token is the stand-in's most likely one, with its logprob.
            assert [top.logprobs[0] for top in c.output_top_logprobs] == pytest.approx(list(c.output_logprobs))
            assert c.prompt_top_logprobs[0] == TopLogprobs() and len(c.prompt_top_logprobs) == len(PROMPT)
            for t, top in zip(PROMPT[1:], c.prompt_top_logprobs[1:]):
                assert top == TopLogprobs((t, (t + 1) % VOCAB, (t + 2) % VOCAB), (-0.5, -0.75, -1.0))
            assert c.prompt_logprobs == (0.0, -0.5, -0.5, -0.5, -0.5)

        # Only output top logprobs: no prompt logprobs asked, none returned.
        request = GenerationRequest(PROMPT, SamplingOptions(max_new_tokens=3), top_logprobs=4)
        c = only_completion([e async for e in shard.submit(request)])
        body = standin.generate_bodies[-1]
        assert body["top_logprobs_num"] == 4 and body["logprob_start_len"] == -1
        assert list(c.output_top_logprobs) == [expected_top(t, 4) for t in expected_tokens(PROMPT, 3)]
        assert c.prompt_top_logprobs == () and c.prompt_logprobs == ()

        # Neither: SGLang is not asked for any.
        [c] = [
            e
            async for e in shard.submit(GenerationRequest(PROMPT, SamplingOptions(max_new_tokens=3), stream=True))
            if isinstance(e, Completion)
        ]
        assert "top_logprobs_num" not in standin.generate_bodies[-1]
        assert c.output_top_logprobs == () and c.prompt_top_logprobs == ()

        with pytest.raises(InvalidArgument, match="top_logprobs must be between 0 and 20, got 25"):
            shard.submit(GenerationRequest(PROMPT, top_logprobs=25))
        with pytest.raises(InvalidArgument, match="prompt_top_logprobs must be between 0 and 20, got 21"):
            shard.submit(GenerationRequest(PROMPT, prompt_top_logprobs=21))
    finally:
        await shard.close()


# -- weight updates -------------------------------------------------------------------------


async def test_update_drives_sglang_in_order_and_spans_cover_the_commit(shard, model_weights):
    s, standin = shard
    trainer = SGLangCompatibleTrainer(world_size=2)
    new = perturbed(model_weights, seed=1)
    manifest = build_manifest(list(new.items()), BUCKET_BYTES)
    assert len(manifest.buckets) > 3

    # A long request in flight across the update.
    stream = s.submit(GenerationRequest(PROMPT, SamplingOptions(temperature=0.0, max_new_tokens=60), stream=True))
    events = aiter(stream)
    seen: list[TokenChunk] = []
    seen.append(await anext(events))

    async def before_commit():
        # Paused between the transfer and the commit: nothing is generated meanwhile.
        streamed = standin.tokens_streamed
        await asyncio.sleep(0.1)
        assert standin.tokens_streamed == streamed

    await push(s, trainer, new, version=1, between=before_commit)
    rest = [e async for e in events]
    completion = rest[-1]
    assert isinstance(completion, Completion) and completion.finish_reason is FinishReason.LENGTH

    routes = standin.routes()
    updates = [c for c in standin.calls if c[0] == "/update_weights_from_distributed"]
    assert routes[:2] == ["/init_weights_update_group", "/pause_generation"]
    assert routes[2 : 2 + len(updates)] == ["/update_weights_from_distributed"] * len(manifest.buckets)
    assert routes[2 + len(updates) :] == ["/flush_cache", "/continue_generation"]
    init = standin.calls[0][1]
    assert init == {
        "master_address": "127.0.0.1",
        "master_port": trainer.port,
        "rank_offset": 1,
        "world_size": 2,
        "group_name": trainer.name,
        "backend": "gloo",
    }
    assert standin.calls[1][1] == {"mode": "retract"}
    for i, (_, body, paused) in enumerate(updates):
        tensors = manifest.tensors_in(i)
        assert paused, "weights are loaded only while generation is paused"
        assert body["names"] == [t.name for t in tensors]
        assert body["shapes"] == [list(t.shape) for t in tensors]
        assert body["dtypes"] == ["float32"] * len(tensors)
        assert body["load_format"] == "flattened_bucket" and body["group_name"] == trainer.name
        last = i == len(updates) - 1
        assert body["weight_version"] == ("1" if last else None) and body["flush_cache"] is last
    for name, tensor in new.items():
        assert torch.equal(standin.weights[name], tensor), name
    assert s.policy.version == 1 and s.policy.step == 10 and standin.weight_version == "1"

    # The request in flight: tokens before the commit from version 0, after it from 1.
    spans = [(sp.start_token, sp.version) for sp in completion.version_spans]
    assert len(spans) == 2 and spans[0] == (0, 0) and spans[1][1] == 1
    k = spans[1][0]
    out = list(completion.output_ids)
    assert out[:k] == expected_tokens(PROMPT, k, version=0)
    assert out[k:] == expected_tokens(PROMPT + out[:k], 60 - k, version=1)
    chunk_versions = [(e.token_ids, e.version) for e in seen + rest if isinstance(e, TokenChunk)]
    assert [t for ids, _ in chunk_versions for t in ids] == out
    assert {v for _, v in chunk_versions} == {0, 1}

    # The next update reuses the group: no second init.
    await push(s, trainer, perturbed(model_weights, seed=2), version=2)
    assert standin.routes().count("/init_weights_update_group") == 1
    assert s.policy.version == 2 and standin.weight_version == "2"

    with pytest.raises(FailedPrecondition, match="expected 3"):
        await s.prepare(5, manifest.to_proto(), trainer.rendezvous(), 10, 0)


async def test_manifest_and_rendezvous_are_checked_before_touching_sglang(shard, model_weights):
    s, standin = shard
    trainer = SGLangCompatibleTrainer(world_size=2)
    manifest = build_manifest(list(model_weights.items()), BUCKET_BYTES).to_proto()
    renamed = pb.WeightManifest()
    renamed.CopyFrom(manifest)
    renamed.tensors[2].name = "model.layers.9.bogus"
    with pytest.raises(InvalidArgument, match="model.layers.9.bogus"):
        await s.prepare(1, renamed, trainer.rendezvous(), 10, 0)
    with pytest.raises(InvalidArgument, match="rank_offset"):
        await s.prepare(1, manifest, trainer.rendezvous(rank_offset=0), 10, 0)
    assert standin.calls == []


async def test_abort_before_any_bucket_keeps_serving_the_old_weights(shard, model_weights):
    s, standin = shard
    trainer = SGLangCompatibleTrainer(world_size=2)
    manifest = build_manifest(list(model_weights.items()), BUCKET_BYTES)
    standin.fail_bucket = None
    connect = asyncio.create_task(asyncio.to_thread(trainer.connect))
    # Hold the first bucket call back: the abort comes before SGLang loads anything.
    s._send_buckets = _never
    await s.prepare(1, manifest.to_proto(), trainer.rendezvous(), 60, 0)
    await connect
    policy = await s.abort(1, "another shard failed")
    assert policy.version == 0
    await wait_until(lambda: standin.routes()[-1:] == ["/continue_generation"])
    assert s.serving and "/update_weights_from_distributed" not in standin.routes()
    with pytest.raises(Aborted, match="another shard failed"):
        await s.commit(1)


async def _never(*_args) -> None:
    await asyncio.Event().wait()


async def test_failed_update_is_not_serving_until_a_complete_update(standins, tiny_model_dir, model_weights):
    standin, url = await standins()
    settings = InferenceSettings(
        model_path=str(tiny_model_dir),
        engine="sglang",
        sglang_urls=[url],
        health_check_interval_seconds=0.2,
        sglang_startup_timeout_seconds=10,
    )
    server, port = create_server(settings)
    servicer = server.servicer
    assert servicer is not None
    await servicer.start()
    await server.server.start()
    await server.set_serving(True)
    chan = channel(f"127.0.0.1:{port}")
    stub = pb_grpc.InferenceServiceStub(chan)
    health = health_pb2_grpc.HealthStub(chan)
    SERVING = health_pb2.HealthCheckResponse.SERVING

    async def status(name: str) -> int:
        return (await health.Check(health_pb2.HealthCheckRequest(service=name))).status

    try:
        info = await stub.GetModelInfo(pb.GetModelInfoRequest())
        assert (info.engine, info.shard_count, info.eos_token_id) == ("sglang", 1, 2)
        assert await status(shard_health_name(0)) == SERVING and await status("clotho.v1.InferenceService") == SERVING

        trainer = SGLangCompatibleTrainer(world_size=2)
        # The last bucket fails after it arrived (SGLang's load_weights failing), so the
        # trainer's broadcasts all complete and SGLang's weights are half new.
        standin.fail_bucket = len(build_manifest(list(model_weights.items()), BUCKET_BYTES).buckets) - 1
        with pytest.raises(Aborted, match="partially updated"):
            await push(servicer.shards, trainer, perturbed(model_weights, seed=3), version=1)
        await servicer.shards.abort(1, "transfer failed")
        await wait_until(lambda: "/abort_request" in standin.routes())
        assert await _eventually(lambda: status(shard_health_name(0)), health_pb2.HealthCheckResponse.NOT_SERVING)
        assert await status("clotho.v1.InferenceService") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert "/continue_generation" not in standin.routes(), "half-loaded weights must not generate"
        with pytest.raises(Exception) as err:
            [r async for r in stub.Generate(pb.GenerateRequest(input_ids=PROMPT))]
        assert "UNAVAILABLE" in str(err.value)
        assert (await stub.GetServedPolicy(pb.GetServedPolicyRequest())).policy.version == 0

        # The trainer re-forms its group and pushes again: a complete update resyncs.
        standin.fail_bucket = None
        trainer = SGLangCompatibleTrainer(world_size=2)
        await push(servicer.shards, trainer, perturbed(model_weights, seed=4), version=1)
        assert await _eventually(lambda: status(shard_health_name(0)), SERVING)
        assert await status("clotho.v1.InferenceService") == SERVING
        assert "/destroy_weights_update_group" in standin.routes()
        responses = [
            r
            async for r in stub.Generate(
                pb.GenerateRequest(
                    input_ids=PROMPT, sampling_params=pb.SamplingParams(temperature=0.0, max_new_tokens=4)
                )
            )
        ]
        c = responses[-1].completion
        assert list(c.output_ids) == expected_tokens(PROMPT, 4, version=1)
        assert [(s.start_token, s.version) for s in c.version_spans] == [(0, 1)]
    finally:
        await chan.close()
        await server.server.stop(0)
        await servicer.close()


async def _eventually(get, want, timeout: float = 10.0) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while await get() != want:
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def test_two_shards_are_consecutive_ranks_with_least_loaded_dispatch(standins, tiny_model_dir, model_weights):
    (a, url_a), (b, url_b) = await standins(), await standins()
    settings = InferenceSettings(
        model_path=str(tiny_model_dir), engine="sglang", sglang_urls=[url_a, url_b], sglang_startup_timeout_seconds=10
    )
    server, _ = create_server(settings)
    assert server.servicer is not None
    shards = server.servicer.shards
    await shards.start()
    try:
        trainer = SGLangCompatibleTrainer(world_size=3)
        rdv = trainer.rendezvous(rank_offset=1)
        new = perturbed(model_weights, seed=5)
        await push(shards, trainer, new, version=1)
        assert [x.calls[0][1]["rank_offset"] for x in (a, b)] == [1, 2]
        assert all(x.calls[0][1]["world_size"] == 3 for x in (a, b))
        for x in (a, b):
            assert all(torch.equal(x.weights[n], t) for n, t in new.items())
        assert shards.policy.version == 1

        with pytest.raises(InvalidArgument, match="do not fit world_size"):
            bad = pb.Rendezvous()
            bad.CopyFrom(rdv)
            bad.world_size = 2
            await shards.prepare(2, build_manifest(list(new.items())).to_proto(), bad, 10, 0)

        # Long requests land on alternate shards: each goes to the least-loaded one.
        streams = [
            cast(
                SGLangStream, shards.submit(GenerationRequest(PROMPT, SamplingOptions(max_new_tokens=40), stream=True))
            )
            for _ in range(4)
        ]
        assert [s.shard for s in streams] == [shards.shards[0], shards.shards[1]] * 2
        assert [sh.load for sh in shards.shards] == [2, 2]
        for s in streams:
            [e async for e in s]
        assert len(a.generate_bodies) == len(b.generate_bodies) == 2
    finally:
        await shards.close()


async def test_trainer_collective_group_meets_an_sglang_formed_group():
    """The trainer's group and one formed the way SGLang forms it share store keys."""
    host = CollectiveGroup.host("gloo", "127.0.0.1", 2, f"clotho-{uuid.uuid4().hex[:12]}", 3.0)
    got: dict[str, Any] = {}

    def shard_side() -> None:
        try:
            pg = sglang_style_group("127.0.0.1", host.port, 2, 1, host.group_name, "gloo", timeout_s=3.0)
            buf = torch.zeros(4)
            pg.broadcast(buf, 0).wait()
            got["data"] = buf
        except Exception as exc:  # noqa: BLE001
            got["error"] = exc

    thread = threading.Thread(target=shard_side, daemon=True)
    thread.start()
    try:
        await asyncio.to_thread(host.connect)
        await asyncio.to_thread(host.broadcast, torch.arange(4.0))
    finally:
        await asyncio.to_thread(thread.join, 15)
        host.close()
    assert torch.equal(got["data"], torch.arange(4.0))


# -- a real SGLang server -------------------------------------------------------------------


def _real_sglang_available() -> bool:
    return importlib.util.find_spec("sglang") is not None and torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _real_sglang_available(), reason="needs the sglang package and a CUDA device")
async def test_real_sglang_server_generates_and_takes_a_weight_update(tiny_model_dir, model_weights, tmp_path):
    from services.inference.sglang_server.process import SGLangProcess

    spec = ModelSpec.from_model_dir(tiny_model_dir)
    process = SGLangProcess(
        str(tiny_model_dir),
        gpu_id=0,
        log_dir=tmp_path,
        extra_args=("--mem-fraction-static 0.2 --disable-cuda-graph --attention-backend triton --dtype float32"),
    )
    s = SGLangShard(process.url, spec, name="real", process=process, startup_timeout_seconds=600)
    await s.start()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()

        def greedy(weights, steps):
            model.load_state_dict(weights, strict=False)
            ids = list(PROMPT)
            with torch.no_grad():
                for _ in range(steps):
                    ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            return ids[len(PROMPT) :]

        request = GenerationRequest(PROMPT, SamplingOptions(temperature=0.0, max_new_tokens=8, ignore_eos=True))
        c = only_completion([e async for e in s.submit(request)])
        assert list(c.output_ids) == greedy(model_weights, 8)

        # The trainer side as the real trainer forms it (NCCL, rank 0).
        new = perturbed(model_weights, seed=7)
        group = CollectiveGroup.host("nccl", "127.0.0.1", 2, f"clotho-{uuid.uuid4().hex[:12]}", 120.0)
        manifest = build_manifest(list(new.items()), BUCKET_BYTES)
        connect = asyncio.create_task(asyncio.to_thread(group.connect))
        rdv = pb.Rendezvous(
            backend=pb.COLLECTIVE_BACKEND_NCCL,
            address="127.0.0.1",
            port=group.port,
            world_size=2,
            rank_offset=1,
            group_name=group.group_name,
        )
        await s.prepare(1, manifest.to_proto(), rdv, 300, 1)
        await connect
        gpu = {n: t.cuda() for n, t in new.items()}
        crcs = []
        for i in range(len(manifest.buckets)):
            flat = pack_bucket(manifest, i, gpu)
            crcs.append(crc32(flat))
            await asyncio.to_thread(group.broadcast, flat)
        await s.await_transfer(1, crcs)
        await s.commit(1)
        group.close()
        c = only_completion([e async for e in s.submit(request)])
        assert list(c.output_ids) == greedy(new, 8)
        assert [(sp.start_token, sp.version) for sp in c.version_spans] == [(0, 1)]
    finally:
        await s.close()
