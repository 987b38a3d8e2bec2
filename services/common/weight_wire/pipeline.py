"""The bucket pipeline on both ends of a broadcast, and the threads it runs in.

Sender: a packer thread fills (and checksums) bucket i + 1 into a scratch buffer while
bucket i is on the wire; a bucket whose tensors already lie contiguously in one storage,
in manifest order and dtype, is sent from there without packing. Receiver: bucket i's
checksum is computed in a second thread while bucket i + 1 is received. On both ends
up to BROADCASTS_IN_FLIGHT collectives are queued at once.

Every blocking collective runs in a daemon thread of its own under the group's timeout,
never on the event loop and never in the default executor.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from services.common.weight_wire.collective import CollectiveGroup
from services.common.weight_wire.manifest import Manifest
from services.common.weight_wire.packing import bucket_view, crc32, pack_bucket, pack_bucket_crc32

log = logging.getLogger(__name__)

T = TypeVar("T")

# Collectives queued at once on each side: the next buckets' broadcasts wait behind the
# current one, so the link never idles for a round trip between buckets (stop-and-wait
# per bucket cost ~25% with 16 MiB buckets over gloo on the 2-core development machine).
BROADCASTS_IN_FLIGHT = 3


def in_daemon_thread(
    fn: Callable[..., T], *args: Any, name: str, track: list[threading.Thread] | None = None
) -> asyncio.Future[T]:
    """Run a blocking collective call in its own daemon thread.

    Not asyncio.to_thread: a collective abandoned at a deadline keeps its thread until
    the group's timeout, and must neither occupy the default executor (the learner's
    torch work runs there) nor hold up interpreter or event-loop shutdown.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not future.done():
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    def body() -> None:
        value: T | BaseException
        try:
            ok, value = True, fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            ok, value = False, exc
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
            loop.call_soon_threadsafe(settle, ok, value)

    thread = threading.Thread(target=body, name=name, daemon=True)
    if track is not None:
        keep_alive_only(track, thread)
    thread.start()
    return future


def keep_alive_only(track: list[threading.Thread], thread: threading.Thread) -> None:
    """Add `thread` to `track`, dropping the threads there that have finished (a group
    lives across every update: a list that only grew would hold two finished threads
    per update for the life of the process)."""
    track[:] = [t for t in track if t.is_alive()]
    track.append(thread)


def join_all(threads: list[threading.Thread], timeout: float) -> None:
    """Join every thread, all within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))


@dataclass
class TrackedGroup:
    """A hosted group and the threads working on it.

    A live gloo group aborts the interpreter at exit, and close() blocks while a
    collective is in flight; so every thread is tracked and `wait_closed` lets the
    process shut the group down before it exits.
    """

    group: CollectiveGroup
    abandoned: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    # Packing buffers (raw bytes, viewed as each bucket's dtype), reused across the
    # group's updates: one is packed while the others are on the wire. Per group, so a send
    # thread abandoned with an old group never writes into a live update's buffer.
    scratch: list[torch.Tensor] = field(default_factory=list)

    def scratch_buffers(self, nbytes: int, device: torch.device, count: int) -> list[torch.Tensor]:
        if len(self.scratch) != count or self.scratch[0].numel() < nbytes or self.scratch[0].device != device:
            self.scratch = []  # drop the old ones before allocating
            self.scratch = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(count)]
        return self.scratch

    def run(self, fn: Callable[..., T], *args: Any, name: str) -> asyncio.Future[T]:
        return in_daemon_thread(fn, *args, name=name, track=self.threads)

    def connect(self) -> None:
        self.group.connect()
        if self.abandoned.is_set():
            # Dropped while we were joining: nobody else will close it.
            self.group.close()

    def drop(self) -> None:
        """Give the group up: its threads stop at their next check, and it is closed
        in a thread of its own (never on the loop)."""
        if self.abandoned.is_set():
            return
        self.abandoned.set()
        thread = threading.Thread(target=self.group.close, name="clotho-sync-close", daemon=True)
        keep_alive_only(self.threads, thread)
        thread.start()

    @property
    def busy(self) -> bool:
        return any(t.is_alive() for t in self.threads)

    async def wait_closed(self, timeout: float) -> None:
        """Wait (bounded) until every thread of a dropped group has finished."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        for thread in list(self.threads):
            left = end - loop.time()
            if left <= 0:
                log.warning("group %s still busy after %.1fs", self.group.group_name, timeout)
                return
            await in_daemon_thread(thread.join, left, name="clotho-sync-join")


def send_buckets(
    handle: TrackedGroup,
    manifest: Manifest,
    tensors: Mapping[str, torch.Tensor],
    on_sent: Callable[[int], None] | None = None,
) -> list[int]:
    """Worker thread (rank 0): broadcast each bucket in manifest order while a packer
    thread prepares the next one; returns the buckets' CRCs. `on_sent(i)` is called
    (on this thread) once bucket i's broadcast has completed."""
    device = next(iter(tensors.values())).device
    # (bucket, its CRC, the scratch buffer it was packed into or None)
    ready: queue.SimpleQueue[tuple[torch.Tensor, int, torch.Tensor | None] | BaseException] = queue.SimpleQueue()
    free: queue.SimpleQueue[torch.Tensor] = queue.SimpleQueue()
    # Buckets already contiguous in the tensors' own storage need no scratch space.
    views = [bucket_view(manifest, i, tensors) for i in range(len(manifest.buckets))]
    packed = [b.nbytes for b, v in zip(manifest.buckets, views) if v is None]
    if packed:
        for buf in handle.scratch_buffers(max(packed), device, BROADCASTS_IN_FLIGHT + 1):
            free.put(buf)
    stop = threading.Event()

    def pack_all() -> None:
        try:
            for i, bucket in enumerate(manifest.buckets):
                flat = views[i]
                if flat is not None:
                    ready.put((flat, crc32(flat), None))
                    continue
                raw = free.get()
                if stop.is_set() or handle.abandoned.is_set():
                    return
                flat = raw[: bucket.nbytes].view(bucket.dtype)
                if device.type == "cuda":
                    flat = pack_bucket(manifest, i, tensors, out=flat)
                    torch.cuda.current_stream(device).synchronize()
                    ready.put((flat, crc32(flat), raw))
                else:
                    ready.put((flat, pack_bucket_crc32(manifest, i, tensors, flat), raw))
        except BaseException as exc:  # noqa: BLE001 - handed to the sending thread
            ready.put(exc)

    packer = threading.Thread(target=pack_all, name="clotho-sync-pack", daemon=True)
    keep_alive_only(handle.threads, packer)
    packer.start()
    crcs = []
    in_flight: collections.deque[tuple[Any, torch.Tensor | None, int]] = collections.deque()

    def finish_one() -> None:
        work, raw, index = in_flight.popleft()
        handle.group.wait(work)
        if raw is not None:
            free.put(raw)  # sent: the packer may fill it again
        if on_sent is not None:
            on_sent(index)

    try:
        for i in range(len(manifest.buckets)):
            if handle.abandoned.is_set():
                # The update was given up; stop reading tensors the learner now owns.
                raise RuntimeError("weight update abandoned")
            item = ready.get()
            if isinstance(item, BaseException):
                raise RuntimeError(f"packing bucket {i} failed: {item}") from item
            flat, crc, raw = item
            crcs.append(crc)
            in_flight.append((handle.group.broadcast_async(flat, root=0), raw, i))
            if len(in_flight) >= BROADCASTS_IN_FLIGHT:
                finish_one()
        while in_flight:
            finish_one()
    finally:
        stop.set()
        # Unblock a packer waiting for a buffer.
        for _ in range(BROADCASTS_IN_FLIGHT + 1):
            free.put(torch.empty(0, dtype=torch.uint8))
    return crcs


def start_receiving(
    group: CollectiveGroup, staging: list[torch.Tensor], device: torch.device, started: float, name: str
) -> concurrent.futures.Future[tuple[list[int], float]]:
    """Receive every bucket into `staging` (in manifest order) in a thread of its own and
    checksum each in another; the future resolves to (the CRCs, seconds since `started`)
    or fails with a RuntimeError naming the bucket. The threads hold the buffers until
    they end: after a drop, when the pending broadcast fails (at once if the sender
    closed its side, else at the group's timeout)."""
    done: concurrent.futures.Future[tuple[list[int], float]] = concurrent.futures.Future()
    arrived: queue.SimpleQueue[torch.Tensor | None] = queue.SimpleQueue()
    crcs: list[int] = []

    def checksum_all() -> None:
        while (flat := arrived.get()) is not None:
            crcs.append(crc32(flat))

    checksummed = threading.Thread(target=checksum_all, name=f"{name}-crc", daemon=True)

    def receive() -> None:
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)
        received = 0
        # Bucket i + 1's receive is posted before bucket i is waited for, so the
        # sender never waits for us between buckets.
        in_flight: collections.deque[tuple[torch.Tensor, dist.Work]] = collections.deque()

        def finish_one() -> None:
            nonlocal received
            flat, work = in_flight.popleft()
            group.wait(work)
            received += 1
            arrived.put(flat)

        try:
            for flat in staging:
                in_flight.append((flat, group.broadcast_async(flat, root=0)))
                if len(in_flight) >= BROADCASTS_IN_FLIGHT:
                    finish_one()
            while in_flight:
                finish_one()
        except Exception as exc:  # noqa: BLE001 - reported through the future
            arrived.put(None)
            done.set_exception(RuntimeError(f"bucket {received} of {len(staging)}: {exc}"))
            return
        arrived.put(None)
        checksummed.join()
        if len(crcs) != len(staging):
            done.set_exception(RuntimeError("checksumming the received buckets failed"))
            return
        done.set_result((list(crcs), time.monotonic() - started))

    checksummed.start()
    threading.Thread(target=receive, name=name, daemon=True).start()
    return done
