"""Several torch shards behind one service: GetModelInfo counts them, generation goes to
the least-loaded one, and one weight update reaches every shard, shard i joining the
trainer's group as rank rank_offset + i (a real gloo group on loopback)."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import torch

from clotho.v1 import inference_service_pb2 as pb
from services.common.errors import InvalidArgument, Unavailable
from services.common.weight_wire import CollectiveGroup, build_manifest, crc32, pack_bucket
from services.inference.generation_types import GenerationRequest, SamplingOptions
from services.inference.server import create_server, shard_health_name
from services.inference.settings import InferenceSettings
from services.inference.shard_set import ShardSet

TIMEOUT = 15.0


@pytest.fixture
async def server(tiny_model_dir):
    settings = InferenceSettings(model_path=str(tiny_model_dir), shards=2, weight_update_timeout_seconds=TIMEOUT)
    srv, _port = create_server(settings)
    yield srv
    assert srv.servicer is not None
    await srv.servicer.close()


def engines(server):
    return [shard.engine for shard in server.servicer.shards.shards]


async def test_model_info_counts_the_shards_and_health_names_each(server):
    info = await server.servicer.GetModelInfo(pb.GetModelInfoRequest(), None)
    assert (info.engine, info.shard_count) == ("torch", 2)
    await server.set_serving(True)
    for name in (shard_health_name(0), shard_health_name(1), "clotho.v1.InferenceService", ""):
        status = await server.health.Check(_health_request(name), None)
        assert status.status == status.SERVING, name
    await server.set_serving(False)
    status = await server.health.Check(_health_request(shard_health_name(1)), None)
    assert status.status == status.NOT_SERVING


def _health_request(name: str):
    from grpc_health.v1 import health_pb2

    return health_pb2.HealthCheckRequest(service=name)


async def test_requests_go_to_the_least_loaded_shard(server):
    shards: ShardSet = server.servicer.shards
    request = GenerationRequest([1, 20, 21], SamplingOptions(temperature=0.0, max_new_tokens=300, ignore_eos=True))
    streams = [shards.submit(request) for _ in range(4)]
    assert [e.load for e in engines(server)] == [2, 2]
    for s in streams:
        s.cancel()
    for s in streams:
        [c async for c in s]


async def test_one_update_reaches_every_shard_as_consecutive_ranks(server):
    servicer = server.servicer
    first, second = engines(server)
    weights = {n: p.detach() + 0.02 for n, p in first.runner.model.named_parameters()}
    manifest = build_manifest(list(weights.items()), 64 * 1024)
    group = CollectiveGroup.host("gloo", "127.0.0.1", 3, f"clotho-{uuid.uuid4().hex[:12]}", TIMEOUT)
    rendezvous = pb.Rendezvous(
        backend=pb.COLLECTIVE_BACKEND_GLOO,
        address="127.0.0.1",
        port=group.port,
        world_size=3,
        rank_offset=1,
        group_name=group.group_name,
    )
    try:
        too_small = pb.Rendezvous()
        too_small.CopyFrom(rendezvous)
        too_small.world_size = 2
        with pytest.raises(InvalidArgument, match="do not fit world_size 2"):
            await servicer.shards.prepare(1, manifest.to_proto(), too_small, 30, 1)

        connect = asyncio.create_task(asyncio.to_thread(group.connect))
        prepared = await servicer.PrepareWeightUpdate(
            pb.PrepareWeightUpdateRequest(
                version=1, manifest=manifest.to_proto(), rendezvous=rendezvous, deadline_seconds=30, step=3
            ),
            None,
        )
        await connect
        assert prepared.joined_group
        crcs = []
        for i in range(len(manifest.buckets)):
            flat = pack_bucket(manifest, i, weights)
            crcs.append(crc32(flat))
            await asyncio.to_thread(group.broadcast, flat)
        awaited = await servicer.AwaitWeightTransfer(pb.AwaitWeightTransferRequest(version=1, bucket_crc32s=crcs), None)
        assert awaited.bytes_received == 2 * manifest.total_bytes
        committed = await servicer.CommitWeightUpdate(pb.CommitWeightUpdateRequest(version=1), None)
        assert committed.policy.version == 1
    finally:
        await asyncio.to_thread(group.close)
    for engine in (first, second):
        assert engine.policy.version == 1
        for name, p in engine.runner.model.named_parameters():
            assert torch.equal(p.detach(), weights[name]), name
    served = await servicer.GetServedPolicy(pb.GetServedPolicyRequest(), None)
    assert served.policy.version == 1


async def test_no_serving_shard_is_unavailable(server):
    for engine in engines(server):
        engine._broken = "test: a commit failed part-way"
    with pytest.raises(Unavailable, match="none of the 2 shards"):
        server.servicer.shards.submit(GenerationRequest([1, 2, 3]))
    for engine in engines(server):
        engine._broken = None
