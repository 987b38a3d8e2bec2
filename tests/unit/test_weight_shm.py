"""The same-host weight transport in pieces: which transport a service gets, the
rendezvous a shard checks, and a segment's sets, header and lifetime."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from clotho.v1 import inference_service_pb2 as pb
from services.common.errors import InvalidArgument
from services.common.weight_wire import build_manifest, crc32, shm
from services.inference.weight_update.request import check_rendezvous
from services.trainer.weight_push.shm_link import SegmentLink, uses_shared_memory

pytestmark = pytest.mark.skipif(not shm.available(), reason="no /dev/shm on this machine")

HERE = shm.host_id()
ROOT = Path(__file__).resolve().parents[2]


def info(host: str = HERE, accepts: bool = True) -> pb.GetModelInfoResponse:
    return pb.GetModelInfoResponse(host_id=host, accepts_shared_memory=accepts, shard_count=1)


def test_host_id_is_stable_and_names_boot_and_host():
    assert shm.host_id() == HERE and "/" in HERE


def test_auto_picks_shared_memory_on_the_same_host_only():
    assert uses_shared_memory("auto", info(), on_cpu=True)
    assert not uses_shared_memory("auto", info("other-boot/other-host"), on_cpu=True)
    assert not uses_shared_memory("auto", info(""), on_cpu=True)  # an older service says nothing
    assert not uses_shared_memory("auto", info(accepts=False), on_cpu=True)  # e.g. SGLang shards
    assert not uses_shared_memory("auto", info(), on_cpu=False)  # CUDA weights: the collective
    # The trainer's own host id decides, not this process's.
    assert uses_shared_memory("auto", info("a/b"), on_cpu=True, here="a/b")


def test_the_setting_forces_either_transport():
    assert not uses_shared_memory("collective", info(), on_cpu=True)
    assert uses_shared_memory("shm", info(), on_cpu=True)
    with pytest.raises(ValueError, match="another host"):
        uses_shared_memory("shm", info("x/y"), on_cpu=True)
    with pytest.raises(ValueError, match="does not accept"):
        uses_shared_memory("shm", info(accepts=False), on_cpu=True)
    with pytest.raises(ValueError, match="one of"):
        uses_shared_memory("carrier-pigeon", info(), on_cpu=True)


def small_manifest():
    named = [(f"w{i}", torch.randn(1000 + i)) for i in range(5)]
    return dict(named), build_manifest(named, bucket_bytes=8000)


def test_a_rendezvous_naming_a_segment_is_checked():
    tensors, manifest = small_manifest()
    link = SegmentLink.create(manifest, readers=3, run_id="unit")
    try:
        link.begin()
        key = check_rendezvous(link.rendezvous(reader_offset=2, readers=3))
        assert key.backend == "shm" and key.rank == 2 and key.world_size == 4
        assert key.segment is not None and key.segment.segment == link.name
        assert key.segment.buffer_set == link.buffer_set and key.segment.update_id == link.update_id
        bad = link.rendezvous(2, 3)
        bad.shared_memory.segment = "../etc/passwd"
        with pytest.raises(InvalidArgument, match="segment"):
            check_rendezvous(bad)
        bad = link.rendezvous(2, 3)
        bad.shared_memory.buffer_set = 2
        with pytest.raises(InvalidArgument, match="buffer_set"):
            check_rendezvous(bad)
        with pytest.raises(InvalidArgument, match="rank_offset"):
            check_rendezvous(link.rendezvous(4, 3))
    finally:
        link.drop()
    assert link.name not in shm.segment_names()


def test_buckets_written_are_read_back_verified_and_sets_alternate():
    tensors, manifest = small_manifest()
    segment = shm.SharedSegment.create(manifest, readers=1, run_id="unit")
    try:
        reader = shm.SegmentReader.open(segment.name, segment.nbytes, manifest)
        segment.unlink()  # the reader's mapping outlives the name
        assert segment.name not in shm.segment_names()
        first = segment.begin(update_id=7)
        stop = threading.Event()
        reading = shm.start_reading(reader, first, 7, 0.0, stop, 10.0, "unit-read")
        crcs = shm.write_buckets(segment, manifest, tensors, first, threading.Event())
        got, _ = reading.result(10)
        assert got == crcs
        for i in range(len(manifest.buckets)):
            assert crc32(reader.bucket(first, i)) == crcs[i]
        reader.serve(0, first)
        second = segment.begin(update_id=8)
        assert second != first  # never the set a reader serves
        with pytest.raises(ValueError, match="update"):
            reader.check_update(7, first)
        reader.check_update(8, second)
        # A reader still waiting when the update is given up stops.
        stop.set()
        with pytest.raises(RuntimeError, match="dropped"):
            shm.start_reading(reader, second, 8, 0.0, stop, 10.0, "unit-read").result(10)
    finally:
        segment.unlink()


def test_a_reader_without_progress_gives_up():
    tensors, manifest = small_manifest()
    segment = shm.SharedSegment.create(manifest, readers=1, run_id="unit")
    try:
        reader = shm.SegmentReader.open(segment.name, segment.nbytes, manifest)
        s = segment.begin(update_id=1)
        with pytest.raises(RuntimeError, match="no bytes written"):
            shm.start_reading(reader, s, 1, 0.0, threading.Event(), 0.2, "unit-read").result(10)
    finally:
        segment.unlink()


def test_stale_segments_of_this_run_or_of_dead_processes_are_removed():
    _, manifest = small_manifest()
    # A process that created a segment and died without unlinking it.
    code = (
        "import sys, torch; sys.path.insert(0, '.');"
        "from services.common.weight_wire import build_manifest, shm;"
        "m = build_manifest([('w', torch.zeros(10))]);"
        "print(shm.SharedSegment.create(m, 1, 'other').name)"
    )
    dead = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.strip()
    assert dead in shm.segment_names()
    # An earlier incarnation of this run (same run id, another pid).
    earlier = f"{shm.SEGMENT_PREFIX}unit-{os.getpid() + 1_000_000}-deadbeef"
    (shm.SEGMENT_DIR / earlier).write_bytes(b"")
    segment = shm.SharedSegment.create(manifest, readers=1, run_id="unit")
    try:
        names = shm.segment_names()
        assert dead not in names and earlier not in names and segment.name in names
    finally:
        segment.unlink()
    assert segment.name not in shm.segment_names()


def test_pieces_cover_every_bucket_in_order_and_match_packing():
    from services.common.weight_wire import pack_bucket

    named = [("a", torch.randn(3, 700)), ("b", torch.randn(5)), ("c", torch.randn(2_000_000))]
    tensors = dict(named)
    manifest = build_manifest(named, bucket_bytes=1 << 20)
    segment = shm.SharedSegment.create(manifest, readers=1, run_id="unit")
    try:
        s = segment.begin(update_id=3)
        crcs = shm.write_buckets(segment, manifest, tensors, s, threading.Event())
        assert segment.word(shm._WRITTEN) == manifest.total_bytes
        for i in range(len(manifest.buckets)):
            expected = pack_bucket(manifest, i, tensors)
            assert torch.equal(segment.bucket(s, i), expected) and crcs[i] == crc32(expected)
    finally:
        segment.unlink()


def test_cuda_weights_take_shared_memory_only_on_the_services_own_gpu():
    gpu = pb.GetModelInfoResponse(host_id=HERE, accepts_shared_memory=True, device_uuid="GPU-1")
    assert uses_shared_memory("auto", gpu, on_cpu=False, device_uuid="GPU-1")
    assert not uses_shared_memory("auto", gpu, on_cpu=False, device_uuid="GPU-2")
    assert not uses_shared_memory("auto", info(), on_cpu=False, device_uuid="GPU-1")  # a CPU service
    with pytest.raises(ValueError, match="another device"):
        uses_shared_memory("shm", gpu, on_cpu=False, device_uuid="GPU-2")


def test_cuda_ipc_handles_travel_as_messages():
    from services.common.weight_wire import cuda_ipc

    shared = (0, b"\x01" * 64, 4096, 0, b"/torch_123", 8, b"\x02" * 64, True)
    msg = cuda_ipc.to_proto(shared)
    assert cuda_ipc.from_proto(pb.CudaIpcHandle.FromString(msg.SerializeToString())) == shared
    assert cuda_ipc.device_uuid(torch.device("cpu")) == ""


def test_a_rendezvous_with_cuda_sets_needs_one_handle_per_set():
    r = pb.Rendezvous(
        world_size=2,
        rank_offset=1,
        group_name="clotho-wt-x-1-a",
        shared_memory=pb.SharedMemoryTransport(segment="clotho-wt-x-1-a", segment_bytes=4096, update_id=5),
    )
    segment = check_rendezvous(r).segment
    assert segment is not None
    assert segment.cuda_sets == ()
    r.shared_memory.cuda_sets.add(device=0, handle=b"h")
    with pytest.raises(InvalidArgument, match="2 handles"):
        check_rendezvous(r)
    r.shared_memory.cuda_sets.add(device=0, handle=b"g")
    key = check_rendezvous(r)
    assert key.segment is not None
    assert [h.handle for h in key.segment.cuda_sets] == [b"h", b"g"]


def test_a_reader_copying_out_checksums_what_it_keeps():
    tensors, manifest = small_manifest()
    segment = shm.SharedSegment.create(manifest, readers=1, run_id="unit")
    try:
        reader = shm.SegmentReader.open(segment.name, segment.nbytes, manifest)
        s = segment.begin(update_id=9)
        kept = [torch.empty(b.numel, dtype=b.dtype) for b in manifest.buckets]
        reading = shm.start_reading(reader, s, 9, 0.0, threading.Event(), 10.0, "unit-copy", copy_into=kept)
        crcs = shm.write_buckets(segment, manifest, tensors, s, threading.Event())
        assert reading.result(10)[0] == crcs == [crc32(k) for k in kept]
    finally:
        segment.unlink()
