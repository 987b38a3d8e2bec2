"""Test doubles for the trainer's peers, shared by the trainer's integration tests.

FakeShard is a minimal receiver of the weight-update protocol (a real gloo
CollectiveGroup per shard rank, staging buffers, CRC checks) that records every call.
FakeGateway serves StreamBatches with credit accounting. Both run as grpc.aio servers
in the test's event loop; collectives run in their own threads, as the protocol needs.
This module holds no tests.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch
from grpc import aio

from clotho.v1 import gateway_service_pb2 as gw_pb
from clotho.v1 import gateway_service_pb2_grpc as gw_grpc
from clotho.v1 import inference_service_pb2 as pb
from clotho.v1 import inference_service_pb2_grpc as pb_grpc
from clotho.v1 import policy_pb2, scored_data_pb2
from services.common.weight_wire import CollectiveGroup, Manifest, crc32, in_daemon_thread, unpack_bucket

RECEIVE_TIMEOUT_SECONDS = 10.0

_Context = aio.ServicerContext[Any, Any]


def load_model(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def toy_batch(
    n_groups: int = 2, group_size: int = 2, seed: int = 0, vocab: int = 40
) -> list[scored_data_pb2.ScoredGroup]:
    """Groups of prompt + completion token ids (ids from the tiny vocabulary) with
    distinct scores inside each group."""
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for _ in range(n_groups):
        prompt = torch.randint(7, vocab, (5,), generator=gen).tolist()
        seqs = []
        for j in range(group_size):
            completion = torch.randint(7, vocab, (4 + j,), generator=gen).tolist()
            seqs.append(
                scored_data_pb2.ScoredSequence(
                    tokens=prompt + completion,
                    masks=[-100] * len(prompt) + completion,
                    score=float(j),
                )
            )
        groups.append(scored_data_pb2.ScoredGroup(sequences=seqs))
    return groups


@dataclass
class _Prepared:
    version: int
    manifest: Manifest
    staging: list[list[torch.Tensor]]  # per rank, per bucket
    threads: list[threading.Thread]
    results: list[dict[str, Any]]


class FakeShard(pb_grpc.InferenceServiceServicer):
    """An InferenceService with `shard_count` ranks that receives weight updates into a
    dict of tensors and records the calls it got as (method, version)."""

    def __init__(self, params: Mapping[str, torch.Tensor], shard_count: int = 1) -> None:
        self.params = {n: t.detach().clone() for n, t in params.items()}
        self.shard_count = shard_count
        self.version = 0
        self.calls: list[tuple[str, int]] = []
        self.abort_reasons: list[str] = []
        self.groups: list[CollectiveGroup] = []
        self.group_names: list[str] = []  # every group this shard formed, in order
        self.ranks: list[int] = []
        self.received_crcs: list[list[int]] = []
        self.fail_await_calls: set[int] = set()  # 1-based Await call numbers to fail
        self.hang_prepare = False
        self.journal: list[tuple[str, int]] | None = None  # shared with a FakeGateway: event order
        self._await_calls = 0
        self._prepared: _Prepared | None = None

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: _Context) -> pb.GetModelInfoResponse:
        return pb.GetModelInfoResponse(model_name="tiny", engine="fake", shard_count=self.shard_count)

    async def GetServedPolicy(
        self, request: pb.GetServedPolicyRequest, context: _Context
    ) -> pb.GetServedPolicyResponse:
        return pb.GetServedPolicyResponse(policy=policy_pb2.PolicyVersion(version=self.version))

    async def PrepareWeightUpdate(
        self, request: pb.PrepareWeightUpdateRequest, context: _Context
    ) -> pb.PrepareWeightUpdateResponse:
        self.calls.append(("resync" if request.resync else "prepare", request.version))
        if self.hang_prepare:
            await asyncio.Event().wait()  # until the caller's deadline cancels us
        if not request.resync and request.version != self.version + 1:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"version {request.version} is not {self.version} + 1"
            )
        manifest = Manifest.from_proto(request.manifest)
        for t in manifest.tensors:
            if t.name not in self.params or tuple(self.params[t.name].shape) != t.shape:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"tensor {t.name} does not match")
        rz = request.rendezvous
        joined = False
        if not self.groups or self.groups[0].group_name != rz.group_name:
            self._close_groups()
            ranks = [rz.rank_offset + i for i in range(self.shard_count)]
            groups = [
                CollectiveGroup("gloo", rz.address, rz.port, rz.world_size, r, rz.group_name, RECEIVE_TIMEOUT_SECONDS)
                for r in ranks
            ]
            await asyncio.gather(*(in_daemon_thread(g.connect, name="fake-shard-connect") for g in groups))
            self.groups, self.ranks, joined = groups, ranks, True
            self.group_names.append(rz.group_name)
        staging = [[torch.empty(b.numel, dtype=b.dtype) for b in manifest.buckets] for _ in self.groups]
        results: list[dict[str, Any]] = [{} for _ in self.groups]
        threads = [
            threading.Thread(target=self._receive, args=(g, bufs, res), daemon=True)
            for g, bufs, res in zip(self.groups, staging, results)
        ]
        for th in threads:
            th.start()
        self._prepared = _Prepared(request.version, manifest, staging, threads, results)
        return pb.PrepareWeightUpdateResponse(joined_group=joined)

    @staticmethod
    def _receive(group: CollectiveGroup, bufs: list[torch.Tensor], result: dict[str, Any]) -> None:
        try:
            crcs = []
            for buf in bufs:
                group.broadcast(buf, root=0)
                crcs.append(crc32(buf))
            result["crcs"] = crcs
        except Exception as exc:  # noqa: BLE001 - reported by Await
            result["error"] = exc

    async def AwaitWeightTransfer(
        self, request: pb.AwaitWeightTransferRequest, context: _Context
    ) -> pb.AwaitWeightTransferResponse:
        self.calls.append(("await", request.version))
        self._await_calls += 1
        p = self._prepared
        if p is None or p.version != request.version:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "nothing prepared")
        for t in p.threads:
            await in_daemon_thread(t.join, RECEIVE_TIMEOUT_SECONDS, name="fake-shard-join")
        if self._await_calls in self.fail_await_calls:
            self._drop()
            await context.abort(grpc.StatusCode.ABORTED, "injected receive failure")
        for res in p.results:
            if "error" in res or res.get("crcs") != list(request.bucket_crc32s):
                self._drop()
                await context.abort(grpc.StatusCode.ABORTED, f"transfer failed: {res}")
        self.received_crcs.append(list(request.bucket_crc32s))
        return pb.AwaitWeightTransferResponse(bytes_received=p.manifest.total_bytes)

    async def CommitWeightUpdate(
        self, request: pb.CommitWeightUpdateRequest, context: _Context
    ) -> pb.CommitWeightUpdateResponse:
        self.calls.append(("commit", request.version))
        p = self._prepared
        if p is None or p.version != request.version:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "nothing to commit")
        for i, flat in enumerate(p.staging[0]):
            for name, view in unpack_bucket(p.manifest, i, flat):
                self.params[name].copy_(view)
        self.version = request.version
        self._prepared = None
        if self.journal is not None:
            self.journal.append(("commit", request.version))
        return pb.CommitWeightUpdateResponse(policy=policy_pb2.PolicyVersion(version=self.version))

    async def AbortWeightUpdate(
        self, request: pb.AbortWeightUpdateRequest, context: _Context
    ) -> pb.AbortWeightUpdateResponse:
        self.calls.append(("abort", request.version))
        self.abort_reasons.append(request.reason)
        self._drop()
        return pb.AbortWeightUpdateResponse(policy=policy_pb2.PolicyVersion(version=self.version))

    def _drop(self) -> None:
        self._prepared = None
        self._close_groups()

    def _close_groups(self) -> None:
        groups, self.groups = self.groups, []
        for g in groups:
            # close() waits for an in-flight collective to time out: not on the loop.
            threading.Thread(target=g.close, daemon=True).start()

    def methods(self) -> list[str]:
        return [m for m, _ in self.calls]

    def versions(self, method: str) -> list[int]:
        return [v for m, v in self.calls if m == method]


class FakeGateway(gw_grpc.GatewayServiceServicer):
    """Hands out `batches` in order, never more than the credits granted, and records
    the credit traffic. Sending starts once `release` is set."""

    def __init__(self, batches: Sequence[list[scored_data_pb2.ScoredGroup]]) -> None:
        self.batches = list(batches)
        self.registrations: list[gw_pb.RegisterTrainerRequest] = []
        self.grants: list[int] = []
        self.sent = 0
        self.max_in_flight = 0
        self.streams = 0
        self.per_stream: int | None = None  # end each stream after this many batches
        self.release = asyncio.Event()
        self.release.set()
        # Out of batches: keep the stream open until `add` brings more (instead of ending).
        self.hold_when_empty = False
        self._added = asyncio.Event()
        self.journal: list[tuple[str, int]] | None = None  # ("credit", n) as they arrive
        self.credit_versions: list[int] = []  # policy_version sent with each credit, if any

    def add(self, batch: list[scored_data_pb2.ScoredGroup]) -> None:
        self.batches.append(batch)
        self._added.set()

    async def RegisterTrainer(
        self, request: gw_pb.RegisterTrainerRequest, context: _Context
    ) -> gw_pb.RegisterTrainerResponse:
        self.registrations.append(request)
        return gw_pb.RegisterTrainerResponse(uuid="42")

    async def StreamBatches(
        self, request_iterator: AsyncIterator[gw_pb.StreamBatchesRequest], context: _Context
    ) -> AsyncIterator[gw_pb.StreamBatchesResponse]:
        credits = 0
        changed = asyncio.Event()

        async def read_credits() -> None:
            nonlocal credits
            try:
                async for req in request_iterator:
                    self.grants.append(req.credits)
                    if self.journal is not None:
                        self.journal.append(("credit", req.credits))
                    if "policy_version" in type(req).DESCRIPTOR.fields_by_name:
                        self.credit_versions.append(req.policy_version)
                    credits += req.credits
                    # Batches granted but not yet delivered: what the trainer asked ahead.
                    self.max_in_flight = max(self.max_in_flight, credits)
                    changed.set()
            finally:
                changed.set()

        reader = asyncio.ensure_future(read_credits())
        self.streams += 1
        sent_here = 0
        try:
            await self.release.wait()
            while self.sent < len(self.batches) or self.hold_when_empty:
                if self.sent >= len(self.batches):
                    self._added.clear()
                    await self._added.wait()
                    continue
                if self.per_stream is not None and sent_here >= self.per_stream:
                    return
                while credits == 0:
                    changed.clear()
                    if reader.done():
                        return
                    await changed.wait()
                credits -= 1
                batch = self.batches[self.sent]
                self.sent += 1
                sent_here += 1
                yield gw_pb.StreamBatchesResponse(groups=batch, step=self.sent)
            await reader
        finally:
            reader.cancel()


async def start_server(add: Callable[[Any, aio.Server], None], servicer: object) -> tuple[aio.Server, str]:
    server = aio.server()
    add(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def start_shard(shard: FakeShard) -> tuple[aio.Server, str]:
    return await start_server(pb_grpc.add_InferenceServiceServicer_to_server, shard)


async def start_gateway(gateway: FakeGateway) -> tuple[aio.Server, str]:
    return await start_server(gw_grpc.add_GatewayServiceServicer_to_server, gateway)


@dataclass
class Servers:
    servers: list[aio.Server] = field(default_factory=list)

    async def stop(self) -> None:
        for s in self.servers:
            await s.stop(None)
