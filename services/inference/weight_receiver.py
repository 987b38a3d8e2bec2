"""The shard side of the versioned weight-update protocol: prepare, receive, verify,
commit or abort (see ARCHITECTURE.md section 2).

One update is in flight at a time. Prepare joins the trainer's collective group (or
reuses it when the group name is unchanged), allocates one staging buffer per bucket and
starts a receive thread that broadcasts into them in manifest order and checksums each.
Await compares those checksums with the sender's; Commit hands the staged tensors to the
engine, which switches to them between two decode steps.

Speed: the checksum of bucket i is computed in a second thread while bucket i + 1 is on
the wire. When the wire dtypes are the model's, the engine adopts the staged buffers as
its parameters (no copy at commit), and the buffers the parameters used before become
the staging of the next update (no fresh allocation, so no page faults on the next
receive): the shard holds two copies of the weights, the served one and the next one.
A resync (trainer restarted from a checkpoint) is an update that may carry any version. Any failure, an Abort, or a missed
deadline drops the staging and closes the group; the engine keeps its weights and
version. Everything that can block (joining, receiving, closing a group) runs in threads,
never on the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass

import torch
from clotho.v1 import inference_service_pb2 as pb

from services.common.errors import (
    Aborted,
    ClothoError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from services.common.weight_transfer import (
    BACKEND_NAMES,
    BROADCASTS_IN_FLIGHT,
    CollectiveGroup,
    Manifest,
    crc32,
    flat_buckets,
    unpack_bucket,
)
from services.inference.api import PolicyState
from services.inference.engine import GenerationEngine
from services.inference.validation import check_manifest

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class _GroupKey:
    backend: str
    address: str
    port: int
    world_size: int
    rank: int
    group_name: str


@dataclass(frozen=True)
class TransferResult:
    bytes_received: int
    seconds: float


@dataclass(eq=False)
class _Update:
    """One prepared update. `failed` resolves to the error that dropped it (a result,
    not an exception, so nobody has to retrieve it)."""

    version: int
    step: int
    manifest: Manifest
    deadline_seconds: float
    deadline: float
    started: float
    failed: asyncio.Future
    timer: asyncio.TimerHandle | None = None
    staging: list[torch.Tensor] | None = None
    received: asyncio.Future | None = None
    verified: TransferResult | None = None
    commit: asyncio.Future | None = None
    resync: bool = False
    # The engine takes the staging buffers over as its parameters.
    adopt: bool = False


class WeightReceiver:
    def __init__(self, engine: GenerationEngine, collective_timeout_seconds: float) -> None:
        self.engine = engine
        self.collective_timeout = collective_timeout_seconds
        self._update: _Update | None = None
        self._group: CollectiveGroup | None = None
        self._group_key: _GroupKey | None = None
        self._last_failure: tuple[int, ClothoError] | None = None
        self._closers: list[threading.Thread] = []
        # Bucket buffers the engine's parameters view now (adopted by the last commit),
        # and a free set to receive the next update into.
        self._live: list[torch.Tensor] | None = None
        self._spare: list[torch.Tensor] | None = None

    @property
    def in_flight_version(self) -> int | None:
        return self._update.version if self._update is not None else None

    async def prepare(
        self,
        version: int,
        manifest_msg: pb.WeightManifest,
        rendezvous: pb.Rendezvous,
        deadline_seconds: float,
        step: int,
        resync: bool = False,
    ) -> bool:
        """Check the update, join (or reuse) the group and start receiving. Returns
        whether the group was formed for this update. A `resync` may carry any version."""
        if self._update is not None:
            raise FailedPrecondition(
                f"weight update to version {self._update.version} is in flight; commit or abort it first"
            )
        current = self.engine.policy.version
        if not resync and version != current + 1:
            raise FailedPrecondition(f"cannot prepare version {version}: serving {current}, expected {current + 1}")
        manifest = self._check_manifest(manifest_msg)
        key, staging_device = self._check_rendezvous(rendezvous)
        if math.isnan(deadline_seconds) or deadline_seconds < 0:
            raise InvalidArgument(f"deadline_seconds must be >= 0, got {deadline_seconds}")
        deadline_seconds = deadline_seconds or self.collective_timeout

        loop = asyncio.get_running_loop()
        update = _Update(
            version=version,
            step=step,
            manifest=manifest,
            deadline_seconds=deadline_seconds,
            deadline=loop.time() + deadline_seconds,
            started=time.monotonic(),
            failed=loop.create_future(),
            resync=resync,
            adopt=self._can_adopt(manifest, staging_device),
        )
        self._update = update
        self._last_failure = None
        update.timer = loop.call_later(deadline_seconds, self._expire, update)

        joined = False
        if self._group is None or self._group_key != key:
            if self._group is not None:
                self._close_in_background(self._group)
                self._group, self._group_key = None, None
            try:
                group = await asyncio.to_thread(self._connect, key, staging_device)
            except Exception as exc:  # noqa: BLE001 - any join failure ends this update
                error = Unavailable(
                    f"could not join weight group {key.group_name!r} at {key.address}:{key.port} "
                    f"as rank {key.rank} of {key.world_size}: {exc}"
                )
                self._fail(update, error)
                raise error from exc
            if update.failed.done():
                self._close_in_background(group)
                raise update.failed.result()
            self._group, self._group_key = group, key
            joined = True

        try:
            update.staging = self._staging_for(manifest, staging_device)
        except RuntimeError as exc:
            error = ResourceExhausted(f"no memory to stage version {version} ({manifest.total_bytes} bytes): {exc}")
            self._fail(update, error)
            raise error from exc
        update.received = self._start_receiving(update, self._group, staging_device)
        log.info(
            "preparing %sversion %d: %d buckets, %d bytes, group %s (%s), deadline %.1fs",
            "a resync to " if resync else "", version, len(manifest.buckets), manifest.total_bytes,
            key.group_name, "joined" if joined else "reused", deadline_seconds,
        )
        return joined

    async def await_transfer(self, version: int, bucket_crc32s: list[int]) -> TransferResult:
        """Wait for every bucket (bounded by the deadline) and compare checksums."""
        update = self._in_flight(version, "await")
        if update.verified is not None:
            return update.verified
        buckets = len(update.manifest.buckets)
        if len(bucket_crc32s) != buckets:
            raise self._fail(
                update, Aborted(f"version {version}: got {len(bucket_crc32s)} checksums for {buckets} buckets; update dropped")
            )
        assert update.received is not None
        remaining = max(0.0, update.deadline - asyncio.get_running_loop().time())
        await asyncio.wait([update.received, update.failed], timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        if update.failed.done():
            raise update.failed.result()
        if not update.received.done():
            raise self._fail(
                update,
                DeadlineExceeded(
                    f"version {version}: buckets still missing after the {update.deadline_seconds:.1f}s deadline; update dropped"
                ),
            )
        if update.received.exception() is not None:
            raise self._fail(
                update, Aborted(f"version {version}: receiving weights failed ({update.received.exception()}); update dropped")
            )
        got, seconds = update.received.result()
        for i, (mine, theirs) in enumerate(zip(got, bucket_crc32s)):
            if mine != theirs:
                raise self._fail(
                    update,
                    Aborted(
                        f"version {version}: bucket {i} arrived with crc32 {mine:#010x}, sender reports "
                        f"{theirs:#010x}; update dropped"
                    ),
                )
        update.verified = TransferResult(update.manifest.total_bytes, seconds)
        log.info("version %d received and verified in %.3fs", version, seconds)
        return update.verified

    async def commit(self, version: int) -> PolicyState:
        """Have the engine switch to the verified staged weights between two steps."""
        if self._update is None and self.engine.policy.version == version:
            return self.engine.policy  # a retried commit that already happened
        update = self._in_flight(version, "commit")
        if update.commit is None:
            if update.verified is None:
                raise FailedPrecondition(
                    f"version {version} is not verified yet: call AwaitWeightTransfer before committing"
                )
            if update.timer is not None:
                update.timer.cancel()
            assert update.staging is not None
            staged = {
                name: view
                for i, flat in enumerate(update.staging)
                for name, view in unpack_bucket(update.manifest, i, flat)
            }
            update.commit = asyncio.wrap_future(
                self.engine.commit_weights(staged, version, update.step, resync=update.resync, adopt=update.adopt)
            )
            update.commit.add_done_callback(lambda fut: self._after_commit(update, fut))
        # Shielded: a caller that goes away does not stop a commit the engine has queued.
        try:
            return await asyncio.shield(update.commit)
        except ClothoError:
            if update.failed.done():
                raise update.failed.result() from None
            raise

    async def abort(self, version: int, reason: str) -> PolicyState:
        """Drop the prepared update (a no-op when `version` is not in flight)."""
        update = self._update
        if update is None or update.version != version:
            log.info("abort of version %d: nothing in flight for it (%s)", version, reason or "no reason given")
            return self.engine.policy
        if update.commit is not None:
            # Too late to drop: the engine has the commit queued; report what it became.
            await asyncio.wait([update.commit])
            return self.engine.policy
        self._fail(update, Aborted(f"version {version} aborted by the trainer: {reason or 'no reason given'}"))
        return self.engine.policy

    async def close(self) -> None:
        """Drop any update in flight and close the group, waiting (bounded) for every
        group closing in the background: a process group still alive at interpreter exit
        aborts the process."""
        if self._update is not None:
            self._fail(self._update, Unavailable("the service is shutting down"))
        if self._group is not None:
            self._close_in_background(self._group)
            self._group, self._group_key = None, None
        self._spare = None
        closers, self._closers = self._closers, []
        await asyncio.to_thread(_join_all, closers, self.collective_timeout + 5.0)

    # -- checks -------------------------------------------------------------------------

    def _check_manifest(self, msg: pb.WeightManifest) -> Manifest:
        return check_manifest(msg, self.engine.parameter_specs)

    def _check_rendezvous(self, r: pb.Rendezvous) -> tuple[_GroupKey, torch.device]:
        backend = BACKEND_NAMES.get(r.backend)
        if backend is None:
            raise InvalidArgument(f"rendezvous: backend must be GLOO or NCCL, got {r.backend}")
        if backend == "nccl" and self.engine.device.type != "cuda":
            raise InvalidArgument("rendezvous: NCCL needs a CUDA engine; this shard runs on " + str(self.engine.device))
        if not r.address or not 0 < r.port < 65536:
            raise InvalidArgument(f"rendezvous: bad store address {r.address!r}:{r.port}")
        if not r.group_name:
            raise InvalidArgument("rendezvous: group_name is empty")
        if not 1 <= r.rank_offset < r.world_size:
            raise InvalidArgument(
                f"rendezvous: rank_offset {r.rank_offset} must be in [1, world_size {r.world_size}) (rank 0 is the trainer)"
            )
        key = _GroupKey(backend, r.address, int(r.port), int(r.world_size), int(r.rank_offset), r.group_name)
        device = self.engine.device if backend == "nccl" else torch.device("cpu")
        return key, device

    def _can_adopt(self, manifest: Manifest, device: torch.device) -> bool:
        specs = self.engine.parameter_specs
        return device == self.engine.device and all(t.dtype == specs[t.name][1] for t in manifest.tensors)

    def _staging_for(self, manifest: Manifest, device: torch.device) -> list[torch.Tensor]:
        """The spare buffer set when it fits the manifest's buckets, else new buffers."""
        spare, self._spare = self._spare, None
        if spare is not None and len(spare) == len(manifest.buckets) and all(
            buf.numel() == b.numel and buf.dtype == b.dtype and buf.device == device
            for buf, b in zip(spare, manifest.buckets)
        ):
            return spare
        del spare  # free it before allocating the new set
        return flat_buckets(manifest, device)

    def _recycle(self, update: _Update) -> None:
        """After a commit: which buffer set is free for the next update. Only buffers of
        committed updates are recycled: a dropped update's receive thread may still be
        writing into its own."""
        staging, update.staging = update.staging, None
        if staging is None:
            return
        if update.adopt:
            # The parameters now view `staging`; the set they viewed before is free.
            self._spare, self._live = self._live, staging
        else:
            self._spare = staging

    def _in_flight(self, version: int, action: str) -> _Update:
        update = self._update
        if update is not None and update.version == version:
            return update
        if self._last_failure is not None and self._last_failure[0] == version:
            raise self._last_failure[1]
        if update is None:
            raise FailedPrecondition(f"cannot {action} version {version}: no weight update is prepared")
        raise FailedPrecondition(f"cannot {action} version {version}: the update in flight is version {update.version}")

    # -- threads and failure --------------------------------------------------------------

    def _connect(self, key: _GroupKey, device: torch.device) -> CollectiveGroup:
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)
        group = CollectiveGroup(
            key.backend, key.address, key.port, key.world_size, key.rank, key.group_name, self.collective_timeout
        )
        try:
            group.connect()
        except Exception:
            group.close()
            raise
        return group

    def _start_receiving(self, update: _Update, group: CollectiveGroup | None, device: torch.device) -> asyncio.Future:
        done: concurrent.futures.Future = concurrent.futures.Future()
        # The thread holds the buffers until it ends: after a drop, when its pending
        # broadcast fails (at once if the trainer closed its side, else at the timeout).
        staging = list(update.staging or [])
        started = update.started

        # Bucket i's checksum is computed here while bucket i + 1 is received.
        arrived: queue.SimpleQueue[torch.Tensor | None] = queue.SimpleQueue()
        crcs: list[int] = []
        checksummed = threading.Thread(
            target=_checksum_all, args=(arrived, crcs), name=f"weights-crc-v{update.version}", daemon=True
        )

        def receive() -> None:
            if device.type == "cuda" and device.index is not None:
                torch.cuda.set_device(device)
            received = 0
            # Bucket i + 1's receive is posted before bucket i is waited for, so the
            # sender never waits for us between buckets.
            in_flight: collections.deque = collections.deque()

            def finish_one() -> None:
                nonlocal received
                flat, work = in_flight.popleft()
                group.wait(work)
                received += 1
                arrived.put(flat)

            try:
                assert group is not None
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
        threading.Thread(target=receive, name=f"weights-v{update.version}", daemon=True).start()
        received = asyncio.wrap_future(done)
        # Retrieve the outcome even when nobody awaits it (an aborted update).
        received.add_done_callback(lambda f: f.cancelled() or f.exception())
        return received

    def _expire(self, update: _Update) -> None:
        if self._update is update and update.commit is None:
            self._fail(
                update,
                DeadlineExceeded(
                    f"version {update.version} was not committed within its {update.deadline_seconds:.1f}s deadline; dropped"
                ),
            )

    def _after_commit(self, update: _Update, fut: asyncio.Future) -> None:
        if fut.cancelled() or fut.exception() is not None:
            error = fut.exception() if not fut.cancelled() else None
            self._fail(update, Aborted(f"commit of version {update.version} failed: {error}"))
            return
        self._recycle(update)
        if self._update is update:
            self._update = None

    def _fail(self, update: _Update, error: ClothoError) -> ClothoError:
        """Drop `update`: release its staging, forget it, close the group (the trainer
        re-forms it under a new name). Returns `error` for the caller to raise."""
        if update.failed.done():
            return update.failed.result()
        update.failed.set_result(error)
        if update.timer is not None:
            update.timer.cancel()
        update.staging = None
        if self._update is update:
            self._update = None
        self._last_failure = (update.version, error)
        if self._group is not None:
            self._close_in_background(self._group)
            self._group, self._group_key = None, None
        log.warning("weight update dropped: %s", error)
        return error


    def _close_in_background(self, group: CollectiveGroup) -> None:
        # Closing waits for any collective still pending on the group to time out, so it
        # runs off the event loop and nobody waits for it (except `close`).
        self._closers = [t for t in self._closers if t.is_alive()]
        closer = threading.Thread(target=group.close, name=f"close-{group.group_name}", daemon=True)
        closer.start()
        self._closers.append(closer)


def _checksum_all(arrived: "queue.SimpleQueue[torch.Tensor | None]", out: list[int]) -> None:
    """CRC of each bucket as it arrives, until None."""
    while (flat := arrived.get()) is not None:
        out.append(crc32(flat))


def _join_all(threads: list[threading.Thread], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
