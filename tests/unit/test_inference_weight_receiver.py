"""The shard side of the weight-update protocol, driven in-process by a trainer rank 0
on a real gloo group over loopback; and the servicer's Generate cancellation."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator
from typing import Any

import pytest
import pytest_asyncio
import torch

from clotho.v1 import inference_service_pb2 as pb
from services.common.errors import Aborted, DeadlineExceeded, FailedPrecondition, InvalidArgument
from services.common.weight_wire import CollectiveGroup, Manifest, build_manifest, crc32, pack_bucket
from services.inference.servicer import InferenceServicer
from services.inference.torch_engine.engine import GenerationEngine
from services.inference.torch_engine.loader import WeightReceiver
from waiting import wait_until

TIMEOUT = 10.0
# The servicer reads nothing from the gRPC context in these calls.
NO_CONTEXT: Any = None


@pytest.fixture
def engine(tiny_model_dir):
    eng = GenerationEngine(tiny_model_dir)
    yield eng
    eng.close()


@pytest_asyncio.fixture
async def receiver(engine):
    rec = WeightReceiver(engine, collective_timeout_seconds=TIMEOUT)
    yield rec
    await rec.close()


class Trainer:
    """Rank 0 of the weight-transfer group, in this process."""

    def __init__(self) -> None:
        self.group: CollectiveGroup | None = None

    def host(self) -> None:
        self.close()
        self.group = CollectiveGroup.host("gloo", "127.0.0.1", 2, f"clotho-test-{uuid.uuid4().hex[:8]}", TIMEOUT)

    def rendezvous(self, rank: int = 1) -> pb.Rendezvous:
        assert self.group is not None
        return pb.Rendezvous(
            backend=pb.COLLECTIVE_BACKEND_GLOO,
            address="127.0.0.1",
            port=self.group.port,
            world_size=2,
            rank_offset=rank,
            group_name=self.group.group_name,
        )

    async def prepare(self, receiver: WeightReceiver, version: int, manifest: Manifest, deadline: float = 30.0) -> bool:
        assert self.group is not None
        connect = None if self.group.connected else asyncio.create_task(asyncio.to_thread(self.group.connect))
        joined = await receiver.prepare(version, manifest.to_proto(), self.rendezvous(), deadline, step=version * 10)
        if connect is not None:
            await connect
        return joined

    async def send(self, manifest: Manifest, weights: dict[str, torch.Tensor], buckets: int | None = None) -> list[int]:
        assert self.group is not None
        crcs = []
        for i in range(len(manifest.buckets) if buckets is None else buckets):
            flat = pack_bucket(manifest, i, weights)
            crcs.append(crc32(flat))
            await asyncio.to_thread(self.group.broadcast, flat)
        return crcs

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None


@pytest.fixture
def trainer():
    t = Trainer()
    yield t
    t.close()


def new_weights(engine: GenerationEngine, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        name: p.detach().clone() + 0.01 * torch.randn(p.shape, generator=gen)
        for name, p in engine.runner.model.named_parameters()
    }


def model_state(engine: GenerationEngine) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in engine.runner.model.named_parameters()}


def assert_weights(engine: GenerationEngine, expected: dict[str, torch.Tensor]) -> None:
    for name, p in engine.runner.model.named_parameters():
        assert torch.equal(p.detach(), expected[name]), name


async def test_prepare_checks_version_manifest_and_rendezvous(engine, receiver, trainer):
    trainer.host()
    weights = model_state(engine)
    manifest = build_manifest(weights.items(), bucket_bytes=64 * 1024)
    rdv = trainer.rendezvous()

    with pytest.raises(FailedPrecondition, match="serving 0, expected 1"):
        await receiver.prepare(2, manifest.to_proto(), rdv, 30, 0)

    renamed = manifest.to_proto()
    renamed.tensors[3].name = "model.layers.9.bogus"
    with pytest.raises(InvalidArgument, match="model.layers.9.bogus"):
        await receiver.prepare(1, renamed, rdv, 30, 0)

    reshaped = manifest.to_proto()
    name = reshaped.tensors[0].name
    reshaped.tensors[0].shape[0] -= 1
    with pytest.raises(InvalidArgument, match=f"{name}.*shape"):
        await receiver.prepare(1, reshaped, rdv, 30, 0)

    partial = build_manifest([(k, v) for k, v in weights.items() if k != "lm_head.weight"])
    with pytest.raises(InvalidArgument, match="lm_head.weight.*missing"):
        await receiver.prepare(1, partial.to_proto(), rdv, 30, 0)

    bad_rank = trainer.rendezvous(rank=0)
    with pytest.raises(InvalidArgument, match="rank_offset"):
        await receiver.prepare(1, manifest.to_proto(), bad_rank, 30, 0)

    assert receiver.in_flight_version is None and engine.policy.version == 0


async def test_update_commits_and_the_group_is_reused(engine, receiver, trainer):
    trainer.host()
    for version in (1, 2):
        weights = new_weights(engine, seed=version)
        manifest = build_manifest(weights.items(), bucket_bytes=64 * 1024)
        assert len(manifest.buckets) > 3
        joined = await trainer.prepare(receiver, version, manifest)
        assert joined is (version == 1)
        with pytest.raises(FailedPrecondition, match=f"version {version} is in flight"):
            await receiver.prepare(version + 1, manifest.to_proto(), trainer.rendezvous(), 30, 0)
        with pytest.raises(FailedPrecondition, match="AwaitWeightTransfer"):
            await receiver.commit(version)
        crcs = await trainer.send(manifest, weights)
        result = await receiver.await_transfer(version, crcs)
        assert result.bytes_received == manifest.total_bytes
        policy = await receiver.commit(version)
        assert (policy.version, policy.step) == (version, version * 10)
        assert engine.policy.version == version and receiver.in_flight_version is None
        assert_weights(engine, weights)


async def test_checksum_mismatch_drops_the_update(engine, receiver, trainer):
    trainer.host()
    old = model_state(engine)
    weights = new_weights(engine, seed=1)
    manifest = build_manifest(weights.items(), bucket_bytes=64 * 1024)
    await trainer.prepare(receiver, 1, manifest)
    crcs = await trainer.send(manifest, weights)
    crcs[2] ^= 1
    with pytest.raises(Aborted, match="bucket 2 arrived with crc32"):
        await receiver.await_transfer(1, crcs)
    with pytest.raises(Aborted, match="bucket 2"):
        await receiver.commit(1)
    assert engine.policy.version == 0 and receiver.in_flight_version is None
    assert_weights(engine, old)

    # The group was closed: the next update forms a new one and goes through.
    trainer.host()
    assert await trainer.prepare(receiver, 1, manifest) is True
    await receiver.await_transfer(1, await trainer.send(manifest, weights))
    assert (await receiver.commit(1)).version == 1
    assert_weights(engine, weights)


async def test_missed_deadline_aborts_by_itself(engine, receiver, trainer):
    trainer.host()
    old = model_state(engine)
    weights = new_weights(engine, seed=1)
    manifest = build_manifest(weights.items(), bucket_bytes=64 * 1024)
    await trainer.prepare(receiver, 1, manifest, deadline=0.5)
    await trainer.send(manifest, weights, buckets=1)
    await wait_until(lambda: receiver.in_flight_version is None)
    with pytest.raises(DeadlineExceeded, match="deadline"):
        await receiver.await_transfer(1, [0] * len(manifest.buckets))
    assert engine.policy.version == 0
    assert_weights(engine, old)


async def test_abort_mid_transfer_keeps_old_weights(engine, receiver, trainer):
    trainer.host()
    old = model_state(engine)
    weights = new_weights(engine, seed=1)
    manifest = build_manifest(weights.items(), bucket_bytes=64 * 1024)
    await trainer.prepare(receiver, 1, manifest)
    await trainer.send(manifest, weights, buckets=1)
    policy = await receiver.abort(1, "trainer gave up")
    assert policy.version == 0 and receiver.in_flight_version is None
    with pytest.raises(Aborted, match="trainer gave up"):
        await receiver.commit(1)
    assert_weights(engine, old)


async def test_cancelled_generate_stops_its_samples(engine, receiver):
    servicer = InferenceServicer(engine, receiver, "tiny")
    request = pb.GenerateRequest(
        input_ids=[1, 20, 21],
        sampling_params=pb.SamplingParams(temperature=0.0, max_new_tokens=400, ignore_eos=True, n=3),
        stream=True,
    )
    responses = servicer.Generate(request, context=NO_CONTEXT)
    first = await anext(responses)
    assert first.WhichOneof("payload") == "chunk"
    await wait_until(lambda: engine.active_samples == 3)
    assert isinstance(responses, AsyncGenerator)
    await responses.aclose()  # what a client cancel does to the handler
    await wait_until(lambda: engine.active_samples == 0)
    assert engine.tokens_generated < 3 * 400, "the samples ran to the end instead of stopping"


async def test_resync_accepts_any_version_and_replaces_every_weight(engine, receiver, trainer):
    trainer.host()
    for version in (5, 2, 2):  # ahead, back, and the same version again
        weights = new_weights(engine, seed=version * 7 + len(trainer.group.group_name))
        manifest = build_manifest(weights.items(), bucket_bytes=64 * 1024)
        rdv = trainer.rendezvous()
        if version == 5:
            # Not current + 1: refused unless it is a resync.
            with pytest.raises(FailedPrecondition, match="expected 1"):
                await receiver.prepare(version, manifest.to_proto(), rdv, 30, 0)
        connect = None if trainer.group.connected else asyncio.create_task(asyncio.to_thread(trainer.group.connect))
        await receiver.prepare(version, manifest.to_proto(), rdv, 30, step=40, resync=True)
        if connect is not None:
            await connect
        await receiver.await_transfer(version, await trainer.send(manifest, weights))
        policy = await receiver.commit(version)
        assert (policy.version, policy.step) == (version, 40) and engine.policy.version == version
        assert_weights(engine, weights)


def param_storages(engine: GenerationEngine) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in engine.runner.model.parameters()}


async def test_commit_adopts_the_staging_and_the_old_buffers_receive_the_next_update(engine, receiver, trainer):
    """Wire dtype = model dtype: the engine takes the received buckets over as its
    parameters (no copy at commit), and from the third update on the receiver receives
    into the buffers the parameters used two updates ago (no fresh allocation)."""
    trainer.host()
    storages = []
    for version in (1, 2, 3, 4):
        weights = new_weights(engine, seed=version)
        manifest = build_manifest(weights.items(), bucket_bytes=64 * 1024)
        await trainer.prepare(receiver, version, manifest)
        await receiver.await_transfer(version, await trainer.send(manifest, weights))
        await receiver.commit(version)
        assert_weights(engine, weights)
        storages.append(param_storages(engine))
        # Every parameter lives in one of the update's buckets.
        assert len(storages[-1]) == len(manifest.buckets)
    assert storages[0].isdisjoint(storages[1])
    assert storages[2] == storages[0] and storages[3] == storages[1]


async def test_other_wire_dtype_is_copied_not_adopted(engine, receiver, trainer):
    trainer.host()
    before = param_storages(engine)
    weights = {n: t.to(torch.bfloat16) for n, t in new_weights(engine, seed=3).items()}
    manifest = build_manifest(weights.items(), bucket_bytes=64 * 1024)
    await trainer.prepare(receiver, 1, manifest)
    await receiver.await_transfer(1, await trainer.send(manifest, weights))
    await receiver.commit(1)
    assert param_storages(engine) == before
    assert_weights(engine, {n: t.float() for n, t in weights.items()})
