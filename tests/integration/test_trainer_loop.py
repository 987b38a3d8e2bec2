"""The learner loop against an in-test gateway and in-test shards, and the trainer
process (`python -m services.trainer`) end to end against the same doubles."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import json
import os
import signal
import sys
from pathlib import Path

import grpc
import pytest
import torch

from clotho.v1 import gateway_service_pb2 as gw_pb
from clotho.v1 import gateway_service_pb2_grpc as gw_grpc
from clotho.v1 import trainer_service_pb2 as tr_pb
from clotho.v1 import trainer_service_pb2_grpc as tr_grpc
from services.trainer.batch_stream import _Stream
from services.trainer.learner import Learner
from services.trainer.settings import TrainerSettings
from trainer_fakes import (
    FakeGateway,
    FakeShard,
    Servers,
    load_model,
    start_gateway,
    start_server,
    start_shard,
    toy_batch,
)

REPO = Path(__file__).resolve().parents[2]
RUN_SECONDS = 120.0
STEP_KEYS = {
    "event",
    "step",
    "policy_version",
    "mean_score",
    "loss",
    "clip_fraction",
    "sync_seconds",
    "sync_bytes",
    "step_seconds",
}


@pytest.fixture
async def mesh(tiny_model_dir):
    """A fake gateway with 4 batches and two single-shard fake inference services."""
    params = dict(load_model(tiny_model_dir).named_parameters())
    gateway = FakeGateway([toy_batch(seed=i) for i in range(4)])
    shards = [FakeShard(params), FakeShard(params)]
    servers = Servers()
    server, gateway_target = await start_gateway(gateway)
    servers.servers.append(server)
    targets = []
    for shard in shards:
        server, target = await start_shard(shard)
        servers.servers.append(server)
        targets.append(target)
    yield gateway, gateway_target, shards, targets
    await servers.stop()


def settings_for(model_dir, gateway_target, targets, **overrides) -> TrainerSettings:
    values = dict(
        model_path=str(model_dir),
        gateway=gateway_target,
        inference=targets,
        batch_size=4,
        num_steps=3,
        credits=2,
        bucket_bytes=256 * 1024,
        sync_timeout_seconds=20.0,
        checkpoint_dir="",
    )
    values.update(overrides)
    return TrainerSettings(**values)


async def collect_versions(learner: Learner, until: int) -> list[int]:
    seen = []
    async for policy in learner.state.watch():
        seen.append(policy.version)
        if policy.version >= until:
            return seen
    return seen


def step_lines(out: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]


def assert_shard_has(shard: FakeShard, model) -> None:
    for name, p in model.named_parameters():
        assert torch.equal(shard.params[name], p.detach()), name


async def test_learner_streams_with_credits_and_commits_every_step(tiny_model_dir, mesh, monkeypatch):
    from services.common.weight_wire import pipeline as weight_sync

    def no_packing(*args, **kwargs):
        raise AssertionError("the parameters are laid out as the buckets: nothing to pack")

    monkeypatch.setattr(weight_sync, "pack_bucket", no_packing)
    monkeypatch.setattr(weight_sync, "pack_bucket_crc32", no_packing)
    gateway, gateway_target, shards, targets = mesh
    out = io.StringIO()
    learner = Learner(settings_for(tiny_model_dir, gateway_target, targets), out=out)
    await learner.load()
    assert learner.core.laid_out
    model = learner.model
    assert model is not None
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    watcher = asyncio.ensure_future(collect_versions(learner, until=3))
    await asyncio.wait_for(learner.run(), RUN_SECONDS)

    reg = gateway.registrations[0]
    assert (reg.batch_size, reg.num_steps, reg.starting_step) == (4, 3, 0)
    # Two batches asked for up front, one per consumed batch, none past num_steps.
    assert gateway.grants[0] == 2 and sum(gateway.grants) == 3 and gateway.sent == 3
    assert gateway.max_in_flight <= 2

    lines = step_lines(out)
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert [line["policy_version"] for line in lines] == [1, 2, 3]
    model = learner.model
    assert model is not None
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    for line in lines:
        assert line.keys() >= STEP_KEYS and line["event"] == "step" and line["sync_ok"]
        assert line["sync_bytes"] == model_bytes and line["tokens"] > 0
    assert await asyncio.wait_for(watcher, 5) == [0, 1, 2, 3]

    changed = any(not torch.equal(p.detach(), initial[n]) for n, p in model.named_parameters())
    assert changed
    for shard in shards:
        assert shard.methods() == ["prepare", "await", "commit"] * 3
        assert shard.version == 3 and len(shard.group_names) == 1
        assert_shard_has(shard, learner.model)
    assert learner.state.step == 3 and "loss" in learner.state.metrics


async def test_failed_sync_keeps_weights_and_pushes_them_with_the_next_step(tiny_model_dir, mesh):
    gateway, gateway_target, shards, targets = mesh
    shards[0].fail_await_calls = {2}
    out = io.StringIO()
    learner = Learner(settings_for(tiny_model_dir, gateway_target, targets, credits=1), out=out)
    await learner.load()
    watcher = asyncio.ensure_future(collect_versions(learner, until=2))
    await asyncio.wait_for(learner.run(), RUN_SECONDS)

    lines = step_lines(out)
    assert [(x["step"], x["policy_version"], x["sync_ok"]) for x in lines] == [
        (1, 1, True),
        (2, 1, False),
        (3, 2, True),
    ]
    assert "injected receive failure" in lines[1]["sync_error"]
    assert gateway.max_in_flight <= 1
    # Version 2 was published once, after both shards committed it at step 3.
    assert await asyncio.wait_for(watcher, 5) == [0, 1, 2]
    for shard in shards:
        assert ("abort", 2) in shard.calls
        # The retry is a resync: a shard that lost track accepts it whatever it serves.
        assert shard.calls[-3:] == [("resync", 2), ("await", 2), ("commit", 2)]
        assert shard.version == 2 and len(shard.group_names) == 2
        assert_shard_has(shard, learner.model)


async def test_malformed_batch_is_skipped_and_replaced(tiny_model_dir, mesh):
    gateway, gateway_target, shards, targets = mesh
    gateway.batches[0][0].sequences[0].masks.pop()
    out = io.StringIO()
    learner = Learner(settings_for(tiny_model_dir, gateway_target, [], num_steps=2, credits=1), out=out)
    await asyncio.wait_for(learner.run(), RUN_SECONDS)
    assert [x["step"] for x in step_lines(out)] == [1, 2]
    assert gateway.sent == 3 and sum(gateway.grants) == 3


async def test_learner_reopens_the_batch_stream_when_the_gateway_ends_it(tiny_model_dir, mesh):
    gateway, gateway_target, shards, targets = mesh
    gateway.per_stream = 1
    out = io.StringIO()
    learner = Learner(settings_for(tiny_model_dir, gateway_target, targets[:1], num_steps=2, credits=1), out=out)
    await asyncio.wait_for(learner.run(), RUN_SECONDS)
    assert [(x["step"], x["policy_version"]) for x in step_lines(out)] == [(1, 1), (2, 2)]
    assert gateway.streams == 2 and len(gateway.registrations) == 1
    assert shards[0].version == 2


async def start_trainer(tiny_model_dir, gateway_target, targets, tmp_path, *flags):
    stderr = open(tmp_path / "trainer.stderr", "wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.trainer",
        "--model-path",
        str(tiny_model_dir),
        "--gateway",
        gateway_target,
        "--inference",
        ",".join(targets),
        "--batch-size",
        "4",
        "--bucket-bytes",
        str(256 * 1024),
        "--grace-seconds",
        "1",
        "--checkpoint-dir",
        str(tmp_path / "checkpoints"),
        *flags,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=stderr,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    stderr.close()
    return proc


@contextlib.asynccontextmanager
async def killed_on_exit(proc):
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            with contextlib.suppress(Exception):
                await proc.wait()


async def read_json_line(proc) -> dict:
    while True:
        line = await asyncio.wait_for(proc.stdout.readline(), RUN_SECONDS)
        assert line, "trainer exited early"
        if line.startswith(b"{"):
            return json.loads(line)


async def test_trainer_process_serves_policy_and_exits_after_num_steps(tiny_model_dir, mesh, tmp_path):
    gateway, gateway_target, shards, targets = mesh
    gateway.release.clear()  # hold batches until the test watches the policy
    proc = await start_trainer(tiny_model_dir, gateway_target, targets[:1], tmp_path, "--num-steps", "2")
    async with killed_on_exit(proc):
        ready = await read_json_line(proc)
        assert ready["event"] == "ready"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ready['grpc_port']}") as ch:
            watch = tr_grpc.TrainerServiceStub(ch).WatchPolicy(tr_pb.WatchPolicyRequest())
            assert (await asyncio.wait_for(watch.read(), RUN_SECONDS)).policy.version == 0
            gateway.release.set()
            versions = [(await asyncio.wait_for(watch.read(), RUN_SECONDS)).policy.version for _ in range(2)]
            assert versions == [1, 2]
            watch.cancel()
        steps = [await read_json_line(proc) for _ in range(2)]
        assert [(s["event"], s["step"], s["policy_version"]) for s in steps] == [("step", 1, 1), ("step", 2, 2)]
        # Done after num_steps: the process stops by itself, cleanly.
        assert await asyncio.wait_for(proc.wait(), RUN_SECONDS) == 0
        assert shards[0].version == 2


async def test_trainer_process_stops_cleanly_on_sigterm(tiny_model_dir, mesh, tmp_path):
    gateway, gateway_target, shards, targets = mesh
    proc = await start_trainer(tiny_model_dir, gateway_target, targets, tmp_path)  # unbounded
    async with killed_on_exit(proc):
        ready = await read_json_line(proc)
        assert ready["event"] == "ready"
        step = await read_json_line(proc)
        assert step["policy_version"] == 1 and step["sync_ok"]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ready['grpc_port']}") as ch:
            status = await tr_grpc.TrainerServiceStub(ch).GetTrainerStatus(tr_pb.GetTrainerStatusRequest())
            assert status.step >= 1 and status.policy.version >= 1 and "loss" in status.metrics
        proc.send_signal(signal.SIGTERM)
        # The open weight-transfer group is shut down before exit (a live gloo group
        # would abort the interpreter).
        assert await asyncio.wait_for(proc.wait(), RUN_SECONDS) == 0


@pytest.mark.parametrize("one_step_off", [True, False])
async def test_one_step_off_overlaps_the_next_batch_else_waits_for_the_commit(tiny_model_dir, mesh, one_step_off):
    gateway, gateway_target, shards, targets = mesh
    journal: list[tuple[str, int]] = []
    gateway.journal = shards[0].journal = journal
    learner = Learner(
        settings_for(tiny_model_dir, gateway_target, targets[:1], credits=1, one_step_off=one_step_off),
        out=io.StringIO(),
    )
    await asyncio.wait_for(learner.run(), RUN_SECONDS)
    if one_step_off:
        # The next batch is asked for as soon as one arrives, before its step commits.
        assert journal == [("credit", 1), ("credit", 1), ("commit", 1), ("credit", 1), ("commit", 2), ("commit", 3)]
    else:
        # On-policy: each batch is asked for only once the previous step's version is live.
        assert journal == [("credit", 1), ("commit", 1), ("credit", 1), ("commit", 2), ("credit", 1), ("commit", 3)]
    assert gateway.max_in_flight <= 1
    if "policy_version" in gw_pb.StreamBatchesRequest.DESCRIPTOR.fields_by_name:
        # Every credit carries the version the shards serve at that moment.
        assert gateway.credit_versions == ([0, 0, 1] if one_step_off else [0, 1, 2])


async def test_next_batch_after_step_asks_once_the_optimizer_step_is_done(tiny_model_dir, mesh):
    """next_batch "after_step": the next batch is asked for only after the step that
    holds a batch has taken its optimizer step (the weight push still in flight), so an
    environment that refills the gateway when a batch is taken generates it with the
    newest weights it can have. on_arrival asks before the step (the test above)."""
    gateway, gateway_target, shards, targets = mesh
    steps_at_credit: list[int] = []
    learner = Learner(
        settings_for(
            tiny_model_dir,
            gateway_target,
            targets[:1],
            credits=1,
            one_step_off=True,
            overlap_weight_update=True,
            next_batch="after_step",
        ),
        out=io.StringIO(),
    )

    class Journal(list):
        def append(self, item):
            if item[0] == "credit" and item[1] > 0:  # not a version or acknowledgement note
                steps_at_credit.append(learner.step)
            super().append(item)

    gateway.journal = Journal()
    await asyncio.wait_for(learner.run(), RUN_SECONDS)
    # One credit at the start, then one after each optimizer step but the last.
    assert steps_at_credit == [0, 1, 2]
    assert learner.step == 3 and learner.state.version == 3
    assert gateway.max_in_flight <= 1


def versioned_batches(n: int) -> list[list]:
    """Toy batches whose sequences say they were generated by policy version 0."""
    batches = [toy_batch(seed=i) for i in range(n)]
    for batch in batches:
        for group in batch:
            for seq in group.sequences:
                seq.policy_version = 0
    return batches


@pytest.mark.parametrize("fail_second", [False, True])
async def test_overlapped_weight_update_keeps_versions_and_staleness(tiny_model_dir, fail_second):
    """With overlap_weight_update a step's push runs while the next step trains; the
    step lines, published versions, shard commits and staleness are those of the
    loop without overlap, also when a push fails."""
    params = dict(load_model(tiny_model_dir).named_parameters())
    results = {}
    for overlap in (False, True):
        gateway = FakeGateway(versioned_batches(4))
        shard = FakeShard(params)
        if fail_second:
            shard.fail_await_calls = {2}
        servers = Servers()
        try:
            server, gateway_target = await start_gateway(gateway)
            servers.servers.append(server)
            server, target = await start_shard(shard)
            servers.servers.append(server)
            out = io.StringIO()
            learner = Learner(
                settings_for(
                    tiny_model_dir, gateway_target, [target], credits=1, num_steps=4, overlap_weight_update=overlap
                ),
                out=out,
            )
            await learner.load()
            watcher = asyncio.ensure_future(collect_versions(learner, until=3 if fail_second else 4))
            await asyncio.wait_for(learner.run(), RUN_SECONDS)
            lines = step_lines(out)
            results[overlap] = [(x["step"], x["policy_version"], x["sync_ok"], x["staleness_max"]) for x in lines]
            assert await asyncio.wait_for(watcher, 5) == ([0, 1, 2, 3] if fail_second else [0, 1, 2, 3, 4])
            for line in lines:
                assert {"wait_seconds", "train_seconds", "update_seconds"} <= line.keys()
            # Commits in version order; the shard ends with the final weights.
            commits = shard.versions("commit")
            assert commits == sorted(commits)
            assert_shard_has(shard, learner.model)
            assert gateway.max_in_flight <= 1
            if overlap and "policy_version" in gw_pb.StreamBatchesRequest.DESCRIPTOR.fields_by_name:
                # The gateway hears of every committed version, never of one not committed.
                assert gateway.credit_versions == sorted(gateway.credit_versions)
                assert set(commits) <= set(gateway.credit_versions) | {commits[-1]}
                assert max(gateway.credit_versions) <= commits[-1]
        finally:
            await servers.stop()
    assert results[True] == results[False]
    if fail_second:
        assert results[True] == [(1, 1, True, 0), (2, 1, False, 1), (3, 2, True, 1), (4, 3, True, 2)]
    else:
        assert results[True] == [(1, 1, True, 0), (2, 2, True, 1), (3, 3, True, 2), (4, 4, True, 3)]


class EndsAfterTwoCredits(gw_grpc.GatewayServiceServicer):
    """Sends one batch, then ends the stream as the trainer's second credit arrives:
    while the trainer may still be writing more."""

    async def StreamBatches(self, request_iterator, context):
        await request_iterator.__anext__()
        yield gw_pb.StreamBatchesResponse(step=1)
        await request_iterator.__anext__()


async def test_a_stream_ended_while_the_trainer_writes_reads_as_ended():
    # gRPC core fails a send racing the stream's end and marks the call INTERNAL; a
    # concurrent read then raises INTERNAL instead of returning EOF (about half the
    # rounds here). The learner must see the end of the stream and reconnect.
    server, target = await start_server(gw_grpc.add_GatewayServiceServicer_to_server, EndsAfterTwoCredits())
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = gw_grpc.GatewayServiceStub(channel)
            outcomes: collections.Counter[str] = collections.Counter()
            for _ in range(200):
                stream = _Stream(stub.StreamBatches())
                assert await stream.send(gw_pb.StreamBatchesRequest(credits=1))
                first = await stream.read()
                assert first is not None and first.step == 1

                async def keep_writing(stream=stream) -> None:
                    while await stream.send(gw_pb.StreamBatchesRequest(credits=1)):
                        pass

                writer = asyncio.ensure_future(keep_writing())
                assert await stream.read() is None
                await asyncio.wait_for(writer, RUN_SECONDS)
                outcomes["send failed first" if stream._send_failed else "read EOF"] += 1
                stream.call.cancel()
            assert outcomes["send failed first"] > 0, outcomes
    finally:
        await server.stop(None)
