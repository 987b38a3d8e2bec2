"""The shard side of the versioned weight-update protocol, one state machine for every
engine (see ARCHITECTURE.md section 2):

    prepare -> transfer -> verify -> commit
        \\----------\\---------\\--------> abort (or a missed deadline, or a failure)

One update is in flight at a time. Prepare checks the version (current + 1, any version
for a resync), the manifest (every parameter once, with the model's shapes), the
rendezvous and the deadline, here and only here, then has the engine's loader join the
group and start receiving. Await waits for every bucket (bounded by the deadline) and
compares the checksums the loader computed with the sender's. Commit has the loader
switch the engine to the new weights. Any failure, an Abort, or a missed deadline drops
the update: the loader releases what it holds and leaves the group (the trainer re-forms
it under a new name), and a later call for that version gets the error that dropped it.

The served policy has one owner, the loader (the engine, or what the SGLang server
committed); this machine and the shards read it from there.
"""

from __future__ import annotations

import asyncio
import logging
import time

from services.common.errors import Aborted, ClothoError, DeadlineExceeded, FailedPrecondition, Unavailable
from services.inference.generation_types import ServedPolicy
from services.inference.weight_update.loader import UpdateInFlight, WeightLoader
from services.inference.weight_update.request import (
    PreparesByFields,
    TransferResult,
    UpdateRequest,
    check_deadline,
    check_manifest,
    check_rendezvous,
)

log = logging.getLogger(__name__)


class WeightUpdater(PreparesByFields):
    """The weight-update protocol of one shard over its engine's `loader`.
    `default_deadline_seconds` applies when a Prepare carries none."""

    def __init__(self, loader: WeightLoader, default_deadline_seconds: float) -> None:
        self.loader = loader
        self.default_deadline_seconds = default_deadline_seconds
        self._update: UpdateInFlight | None = None
        self._last_failure: tuple[int, ClothoError] | None = None

    @property
    def policy(self) -> ServedPolicy:
        """The version every token generated from now on is stamped with."""
        return self.loader.served

    @property
    def in_flight_version(self) -> int | None:
        return self._update.version if self._update is not None else None

    async def begin(self, request: UpdateRequest) -> bool:
        """Check the update, join (or reuse) the group and start receiving. Returns
        whether the group was formed for this update."""
        if self._update is not None:
            raise FailedPrecondition(
                f"weight update to version {self._update.version} is in flight; commit or abort it first"
            )
        version = request.version
        current = self.policy.version
        if not request.resync and version != current + 1:
            raise FailedPrecondition(f"cannot prepare version {version}: serving {current}, expected {current + 1}")
        manifest = check_manifest(request.manifest, self.loader.parameter_specs)
        group = check_rendezvous(request.rendezvous)
        self.loader.check_update(manifest, group)
        check_deadline(request.deadline_seconds)
        deadline_seconds = request.deadline_seconds or self.default_deadline_seconds

        loop = asyncio.get_running_loop()
        update = UpdateInFlight(
            version=version,
            step=request.step,
            resync=request.resync,
            manifest=manifest,
            group=group,
            deadline_seconds=deadline_seconds,
            deadline=loop.time() + deadline_seconds,
            started=time.monotonic(),
            failed=loop.create_future(),
        )
        self._update = update
        self._last_failure = None
        update.timer = loop.call_later(deadline_seconds, self._expire, update)
        try:
            joined = await self.loader.begin_update(update)
        except ClothoError as exc:
            raise self._fail(update, exc) from exc.__cause__
        log.info(
            "%s preparing %sversion %d: %d buckets, %d bytes, group %s (%s), deadline %.1fs",
            self.loader.name,
            "a resync to " if request.resync else "",
            version,
            len(manifest.buckets),
            manifest.total_bytes,
            group.group_name,
            "joined" if joined else "reused",
            deadline_seconds,
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
                update,
                Aborted(f"version {version}: got {len(bucket_crc32s)} checksums for {buckets} buckets; update dropped"),
            )
        assert update.transfer is not None
        remaining = max(0.0, update.deadline - asyncio.get_running_loop().time())
        await asyncio.wait([update.transfer, update.failed], timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        if update.failed.done():
            raise update.failed.result()
        if not update.transfer.done():
            raise self._fail(
                update,
                DeadlineExceeded(
                    f"version {version}: buckets still missing after the {update.deadline_seconds:.1f}s deadline; update dropped"
                ),
            )
        error = update.transfer.exception()
        if error is not None:
            raise self._fail(
                update,
                error
                if isinstance(error, ClothoError)
                else Aborted(f"version {version}: receiving weights failed ({error}); update dropped"),
            )
        crcs, seconds = update.transfer.result()  # a Received
        for i, (mine, theirs) in enumerate(zip(crcs or (), bucket_crc32s)):
            if mine != theirs:
                raise self._fail(
                    update,
                    Aborted(
                        f"version {version}: bucket {i} arrived with crc32 {mine:#010x}, sender reports "
                        f"{theirs:#010x}; update dropped"
                    ),
                )
        update.verified = TransferResult(update.manifest.total_bytes, seconds)
        log.info(
            "%s: version %d received%s in %.3fs",
            self.loader.name,
            version,
            "" if crcs is None else " and verified",
            seconds,
        )
        return update.verified

    async def commit(self, version: int) -> ServedPolicy:
        """Have the engine switch to the verified weights."""
        if self._update is None and self.loader.serves(version):
            return self.policy  # a retried commit that already happened
        update = self._in_flight(version, "commit")
        if update.commit is None:
            if update.verified is None:
                raise FailedPrecondition(
                    f"version {version} is not verified yet: call AwaitWeightTransfer before committing"
                )
            if update.timer is not None:
                update.timer.cancel()
            update.commit = asyncio.ensure_future(self.loader.commit_update(update))
            update.commit.add_done_callback(lambda fut: self._after_commit(update, fut))
        # Shielded: a caller that goes away does not stop a commit the engine has queued.
        try:
            return await asyncio.shield(update.commit)
        except ClothoError:
            if update.failed.done():
                raise update.failed.result() from None
            raise

    async def abort(self, version: int, reason: str) -> ServedPolicy:
        """Drop the prepared update (a no-op when `version` is not in flight)."""
        update = self._update
        if update is None or update.version != version:
            log.info(
                "%s: abort of version %d: nothing in flight for it (%s)",
                self.loader.name,
                version,
                reason or "no reason given",
            )
            return self.policy
        if update.commit is not None:
            # Too late to drop: the engine has the commit under way; report what it became.
            await asyncio.wait([update.commit])
            return self.policy
        self._fail(update, Aborted(f"version {version} aborted by the trainer: {reason or 'no reason given'}"))
        return self.policy

    async def close(self) -> None:
        """Drop any update in flight and have the loader leave its group."""
        if self._update is not None:
            self._fail(self._update, Unavailable("the service is shutting down"))
        await self.loader.release()

    def _in_flight(self, version: int, action: str) -> UpdateInFlight:
        update = self._update
        if update is not None and update.version == version:
            return update
        if self._last_failure is not None and self._last_failure[0] == version:
            raise self._last_failure[1]
        if update is None:
            raise FailedPrecondition(f"cannot {action} version {version}: no weight update is prepared")
        raise FailedPrecondition(f"cannot {action} version {version}: the update in flight is version {update.version}")

    def _expire(self, update: UpdateInFlight) -> None:
        if self._update is update and update.commit is None:
            self._fail(
                update,
                DeadlineExceeded(
                    f"version {update.version} was not committed within its {update.deadline_seconds:.1f}s deadline; dropped"
                ),
            )

    def _after_commit(self, update: UpdateInFlight, fut: asyncio.Future) -> None:
        if fut.cancelled() or fut.exception() is not None:
            error = None if fut.cancelled() else fut.exception()
            self._fail(
                update,
                error
                if isinstance(error, ClothoError)
                else Aborted(f"commit of version {update.version} failed: {error}"),
            )
            return
        if self._update is update:
            self._update = None

    def _fail(self, update: UpdateInFlight, error: ClothoError) -> ClothoError:
        """Drop `update` and have the loader release it. Returns `error` (or the error
        that dropped it first) for the caller to raise."""
        if update.failed.done():
            return update.failed.result()
        update.failed.set_result(error)
        if update.timer is not None:
            update.timer.cancel()
        if self._update is update:
            self._update = None
        self._last_failure = (update.version, error)
        self.loader.drop_update(update, error)
        log.warning("%s dropped weight update %d: %s", self.loader.name, update.version, error)
        return error
