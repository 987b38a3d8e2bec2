"""WeightSync (sender) against minimal in-test receivers over real gRPC and gloo."""

from __future__ import annotations

from typing import cast

import pytest
import torch

from clotho.v1 import inference_service_pb2_grpc as pb_grpc
from services.common.server import channel
from services.common.weight_wire import build_manifest, crc32, pack_bucket, pack_bucket_crc32
from services.trainer.weight_push import WeightSync, WeightSyncError
from trainer_fakes import FakeShard, Servers, load_model, start_shard

BUCKET_BYTES = 256 * 1024  # several buckets for the 0.5M-parameter model


@pytest.fixture
def model(tiny_model_dir):
    return load_model(tiny_model_dir)


@pytest.fixture
async def shards(model):
    """Two inference services: one with one shard, one with two (world size 4)."""
    params = dict(model.named_parameters())
    fakes = [FakeShard(params, shard_count=1), FakeShard(params, shard_count=2)]
    servers = Servers()
    targets = []
    for fake in fakes:
        server, target = await start_shard(fake)
        servers.servers.append(server)
        targets.append(target)
    yield fakes, targets
    await servers.stop()


def make_sync(targets, timeout=10.0) -> WeightSync:
    return WeightSync.for_targets(targets, bucket_bytes=BUCKET_BYTES, timeout_seconds=timeout)


def expected_crcs(model) -> list[int]:
    named = [(n, p.detach()) for n, p in model.named_parameters()]
    manifest = build_manifest(named, BUCKET_BYTES)
    crcs = [crc32(pack_bucket(manifest, i, dict(named))) for i in range(len(manifest.buckets))]
    # Packing with the checksum computed chunk by chunk gives the same bytes and CRC.
    for i, b in enumerate(manifest.buckets):
        out = torch.empty(b.numel, dtype=b.dtype)
        assert pack_bucket_crc32(manifest, i, dict(named), out) == crcs[i]
        assert torch.equal(out, pack_bucket(manifest, i, dict(named)))
    return crcs


def assert_same_weights(fake: FakeShard, model) -> None:
    for name, p in model.named_parameters():
        assert torch.equal(fake.params[name], p.detach()), name


async def test_push_prepares_awaits_commits_in_order_and_delivers_weights(model, shards):
    fakes, targets = shards
    sync = make_sync(targets)
    try:
        report = await sync.push(model, version=1, step=1)
        assert report.version == 1 and report.formed_group
        assert report.buckets > 1
        assert report.bytes == sum(p.numel() * 4 for p in model.parameters())
        for fake in fakes:
            assert fake.calls == [("prepare", 1), ("await", 1), ("commit", 1)]
            assert fake.version == 1
            assert fake.received_crcs == [expected_crcs(model)]
            assert_same_weights(fake, model)
        # Rank 0 is the trainer; each service's shards follow in order.
        assert fakes[0].ranks == [1] and fakes[1].ranks == [2, 3]

        # The next update reuses the open group and carries the new weights.
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5)
        second = await sync.push(model, version=2, step=2)
        assert not second.formed_group and second.group_name == report.group_name
        for fake in fakes:
            assert fake.methods()[3:] == ["prepare", "await", "commit"]
            assert fake.version == 2 and fake.group_names == [report.group_name]
            assert_same_weights(fake, model)
    finally:
        await sync.close()


async def test_failed_await_aborts_every_shard_and_next_push_reforms_the_group(model, shards):
    fakes, targets = shards
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fakes[1].fail_await_calls = {1}
    sync = make_sync(targets)
    try:
        with pytest.raises(WeightSyncError) as err:
            await sync.push(model, version=1, step=1)
        assert err.value.stage == "await" and err.value.version == 1
        assert targets[1] in str(err.value) and "injected receive failure" in str(err.value)
        for fake in fakes:
            assert fake.calls[-1] == ("abort", 1)
            assert ("commit", 1) not in fake.calls
            assert fake.version == 0
            assert "injected receive failure" in fake.abort_reasons[0]
        for name, p in fakes[0].params.items():
            assert torch.equal(p, before[name])
        assert sync.group_name is None
        first_group = fakes[0].group_names[0]

        report = await sync.push(model, version=1, step=2)
        assert report.formed_group and report.group_name != first_group
        for fake in fakes:
            assert fake.group_names == [first_group, report.group_name]
            assert fake.calls[-3:] == [("prepare", 1), ("await", 1), ("commit", 1)]
            assert fake.version == 1
            assert_same_weights(fake, model)
    finally:
        await sync.close()


async def test_rejected_prepare_aborts_and_names_the_shard(model, shards):
    fakes, targets = shards
    fakes[0].version = 5  # the shard expects version 6
    # Short timeout: the trainer's rank 0 waits that long for the rank that never
    # joins, and close() waits for it to give up.
    sync = make_sync(targets, timeout=2.0)
    try:
        with pytest.raises(WeightSyncError) as err:
            await sync.push(model, version=1, step=1)
        assert err.value.stage == "prepare"
        assert "FAILED_PRECONDITION" in str(err.value) and targets[0] in str(err.value)
        for fake in fakes:
            assert fake.calls[-1] == ("abort", 1) and ("await", 1) not in fake.calls
    finally:
        await sync.close()


async def test_unresponsive_shard_fails_at_the_deadline_instead_of_hanging(model, shards):
    fakes, targets = shards
    fakes[1].hang_prepare = True
    sync = make_sync(targets, timeout=1.5)
    try:
        with pytest.raises(WeightSyncError) as err:
            await sync.push(model, version=1, step=1)
        assert err.value.stage == "prepare"
        assert "DEADLINE_EXCEEDED" in str(err.value) or "deadline" in str(err.value)
        for fake in fakes:
            assert ("abort", 1) in fake.calls
        assert fakes[0].version == 0

        fakes[1].hang_prepare = False
        report = await sync.push(model, version=1, step=2)
        assert report.formed_group
        for fake in fakes:
            assert fake.version == 1
            assert_same_weights(fake, model)
    finally:
        await sync.close()


async def test_push_without_shards_is_a_no_op(model):
    sync = WeightSync([])
    report = await sync.push(model, version=1, step=1)
    assert report.bytes == 0 and report.buckets == 0


async def test_caller_owned_stubs_work_too(model, shards):
    fakes, targets = shards
    channels = [channel(t) for t in targets]
    sync = WeightSync(
        [pb_grpc.InferenceServiceStub(c) for c in channels],
        names=targets,
        bucket_bytes=BUCKET_BYTES,
        timeout_seconds=10.0,
    )
    try:
        await sync.push(model, version=1, step=1)
        assert all(f.version == 1 for f in fakes)
    finally:
        await sync.close()
        for c in channels:
            await c.close()


async def test_weights_laid_out_as_buckets_are_sent_without_packing(model, shards, monkeypatch):
    from services.common.weight_wire import bucket_view, flat_buckets, unpack_bucket
    from services.common.weight_wire import pipeline as weight_sync

    fakes, targets = shards
    named = {n: p.detach() for n, p in model.named_parameters()}
    manifest = build_manifest(named.items(), BUCKET_BYTES)
    flats = flat_buckets(manifest)
    laid_out = {}
    for i, flat in enumerate(flats):
        for name, view in unpack_bucket(manifest, i, flat):
            view.copy_(named[name])
            laid_out[name] = view
    assert all(
        cast(torch.Tensor, bucket_view(manifest, i, laid_out)).data_ptr() == f.data_ptr() for i, f in enumerate(flats)
    )
    assert bucket_view(manifest, 0, named) is None  # separate parameters: packed

    def no_packing(*args, **kwargs):
        raise AssertionError("packed a bucket that was already laid out")

    monkeypatch.setattr(weight_sync, "pack_bucket", no_packing)
    monkeypatch.setattr(weight_sync, "pack_bucket_crc32", no_packing)
    sync = make_sync(targets)
    try:
        await sync.push(laid_out, version=1, step=1)
        for fake in fakes:
            assert fake.received_crcs == [[crc32(f) for f in flats]]
            assert_same_weights(fake, model)
    finally:
        await sync.close()


async def test_wire_dtype_casts_float32_weights_to_bfloat16(model, shards):
    fakes, targets = shards
    sync = WeightSync.for_targets(targets, bucket_bytes=BUCKET_BYTES, timeout_seconds=10.0, dtype=torch.bfloat16)
    try:
        report = await sync.push(model, version=1, step=1)
        assert report.bytes == sum(p.numel() * 2 for p in model.parameters())
        assert sync.manifest is not None
        assert {b.dtype for b in sync.manifest.buckets} == {torch.bfloat16}
        for fake in fakes:
            for name, p in model.named_parameters():
                assert torch.equal(fake.params[name], p.detach().to(torch.bfloat16).float()), name
    finally:
        await sync.close()
