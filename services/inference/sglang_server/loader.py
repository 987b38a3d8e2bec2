"""An SGLang server's side of a weight update (the loader the state machine in
weight_update/ drives), through SGLang's HTTP API, with SGLang receiving the trainer's
broadcast itself:

  begin   -> `/init_weights_update_group` (master_address/master_port = the trainer's
             store, rank_offset = this shard's rank, world_size, group_name, backend) when
             the group is new (SGLang forms it as rank rank_offset + tp_rank, a store
             prefixed by group_name), then `/pause_generation` with mode "retract"
             (running requests go back to the queue; their KV cache is recomputed after
             the update), then one `/update_weights_from_distributed` per bucket, in
             order, with the bucket's tensor names, dtypes and shapes and
             load_format "flattened_bucket" (SGLang receives the bucket as one flat
             tensor laid out exactly as the manifest packs it); the last call also
             carries `weight_version` and `flush_cache`.
  verify  -> every bucket call succeeded (SGLang holds the bytes on the GPU, so the
             checksums cannot be compared here).
  commit  -> `/flush_cache`, `/continue_generation`; the new version is read back.
  drop    -> before any bucket reached SGLang: `/continue_generation`, old weights kept.
             After: SGLang has overwritten weights in place, so the shard goes
             NOT_SERVING (gRPC health) and its requests are aborted until an update
             replaces every weight (the trainer's next push or resync).

SGLangLoader is a base of SGLangShard (the shard is its own loader): it needs the
shard's HTTP client, name, model spec, health report and background tasks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from services.common.errors import Aborted, ClothoError, DeadlineExceeded, InvalidArgument, Unavailable
from services.common.weight_wire import Manifest
from services.common.weight_wire.dtypes import name_of
from services.inference.generation_types import ServedPolicy
from services.inference.sglang_server.model_spec import ModelSpec
from services.inference.weight_update import GroupKey, Received, UpdateInFlight

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Loading:
    paused: bool = False
    # A bucket call reached SGLang: its weights may no longer be the served version's.
    sent: bool = False


class SGLangLoader:
    # Provided by the shard.
    name: str
    client: httpx.AsyncClient
    update_timeout: float
    spec: ModelSpec

    if TYPE_CHECKING:

        @property
        def serving(self) -> bool: ...

        def _report_health(self) -> None: ...

        def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None: ...

        async def weight_version(self) -> str | None: ...

    def _init_loader(self) -> None:
        self._served = ServedPolicy()
        # The version of weights the server names with something other than a number
        # (SGLang's initial "default"): what it served before any update of ours.
        self._baseline_version = 0
        # Why the shard serves nothing (weights half loaded), until a complete update.
        self._resync_reason: str | None = None
        self._group: GroupKey | None = None
        # Groups SGLang still holds that a failed update left behind: destroyed before
        # the next group is formed.
        self._stale_groups: list[str] = []

    # -- the loader ---------------------------------------------------------------------

    @property
    def served(self) -> ServedPolicy:
        return self._served

    @property
    def parameter_specs(self) -> Mapping[str, tuple[Any, ...]]:
        return self.spec.param_specs

    def serves(self, version: int) -> bool:
        return self._served.version == version and self.serving

    def check_update(self, manifest: Manifest, group: GroupKey) -> None:
        if group.segment is not None:
            raise InvalidArgument(
                "rendezvous: an SGLang shard receives weights through a collective, not shared memory"
            )
        for i, bucket in enumerate(manifest.buckets):
            # SGLang rebuilds a flattened bucket by concatenating its tensors in order.
            offset = 0
            for t in sorted(manifest.tensors_in(i), key=lambda t: t.offset):
                if t.offset != offset:
                    raise InvalidArgument(f"manifest: bucket {i} is not packed densely in order at tensor {t.name!r}")
                offset += t.numel
            if offset != bucket.numel:
                raise InvalidArgument(f"manifest: bucket {i} holds {offset} elements, declares {bucket.numel}")

    async def begin_update(self, update: UpdateInFlight) -> bool:
        loading = update.loading = _Loading()
        key = update.group
        joined = False
        if self._group != key:
            if self._group is not None:
                self._stale_groups.append(self._group.group_name)
            self._group = None
            while self._stale_groups:
                await self._destroy_group(self._stale_groups.pop())
            # SGLang answers once every rank has joined (the trainer joins meanwhile).
            await self._call(
                "/init_weights_update_group",
                {
                    "master_address": key.address,
                    "master_port": key.port,
                    "rank_offset": key.rank,
                    "world_size": key.world_size,
                    "group_name": key.group_name,
                    "backend": key.backend,
                },
                timeout=update.deadline_seconds,
                what=f"joining weight group {key.group_name!r} as rank {key.rank}",
            )
            self._group, joined = key, True
        if update.dropped is None:
            await self._call("/pause_generation", {"mode": "retract"}, timeout=60.0, what="pausing generation")
            loading.paused = True
        if update.dropped is not None:
            # Dropped meanwhile (its deadline passed): nothing may stay paused for it.
            if loading.paused:
                self._spawn(
                    self._call("/continue_generation", {}, timeout=60.0, what="continuing generation", check=False)
                )
            raise update.dropped
        update.transfer = asyncio.create_task(self._transfer(update))
        update.transfer.add_done_callback(lambda t: t.cancelled() or t.exception())
        return joined

    async def commit_update(self, update: UpdateInFlight) -> ServedPolicy:
        # No prefix cached under the old weights may serve a later request.
        await self._call("/flush_cache", None, timeout=60.0, what="flushing the cache", check=False)
        await self._call("/continue_generation", {}, timeout=60.0, what="continuing generation")
        self._served = ServedPolicy(update.version, time.time(), update.step)
        self._resync_reason = None
        reported = await self.weight_version()
        if reported is not None and reported != str(update.version):
            log.warning("shard %s reports weight version %r after committing %d", self.name, reported, update.version)
        log.info("shard %s serves policy version %d (step %d)", self.name, update.version, update.step)
        self._report_health()
        return self._served

    def drop_update(self, update: UpdateInFlight, error: ClothoError) -> None:
        """Weights SGLang may have overwritten make the shard NOT_SERVING until a
        complete update; otherwise generation simply continues."""
        if update.transfer is not None and not update.transfer.done():
            update.transfer.cancel()
        # The trainer re-forms the group under a new name after any failure.
        if self._group is not None:
            self._stale_groups.append(self._group.group_name)
        self._group = None
        loading: _Loading = update.loading or _Loading()
        if loading.sent:
            self._resync_reason = (
                f"weight update to version {update.version} failed after SGLang began loading it ({error}); "
                "serving nothing until a complete update"
            )
            self._spawn(
                self._call("/abort_request", {"abort_all": True}, timeout=30.0, what="aborting requests", check=False)
            )
            self._report_health()
        elif loading.paused:
            self._spawn(self._call("/continue_generation", {}, timeout=60.0, what="continuing generation", check=False))

    async def release(self) -> None:
        """Nothing to leave: the server holds the group (the shard closes the client)."""

    # -- HTTP -----------------------------------------------------------------------------

    async def _transfer(self, update: UpdateInFlight) -> Received:
        await self._send_buckets(update)
        return Received(None, time.monotonic() - update.started)

    async def _send_buckets(self, update: UpdateInFlight) -> None:
        manifest = update.manifest
        last = len(manifest.buckets) - 1
        for i in range(len(manifest.buckets)):
            tensors = sorted(manifest.tensors_in(i), key=lambda t: t.offset)
            body: dict[str, Any] = {
                "names": [t.name for t in tensors],
                "dtypes": [name_of(t.dtype) for t in tensors],
                "shapes": [list(t.shape) for t in tensors],
                "group_name": update.group.group_name,
                "flush_cache": i == last,
                "abort_all_requests": False,
                "load_format": "flattened_bucket",
            }
            if i == last:
                # Only once every weight is in: the server stamps tokens with it from then on.
                body["weight_version"] = str(update.version)
            update.loading.sent = True
            await self._call(
                "/update_weights_from_distributed",
                body,
                timeout=self.update_timeout,
                what=f"receiving bucket {i} of {last + 1}",
            )

    async def _destroy_group(self, group_name: str) -> None:
        """Best effort: servers without the route, or with a broken group, are left be."""
        try:
            await self.client.post("/destroy_weights_update_group", json={"group_name": group_name}, timeout=10.0)
        except httpx.HTTPError as exc:
            log.info("shard %s: could not destroy group %s: %s", self.name, group_name, exc)

    async def _call(self, route: str, body: dict | None, *, timeout: float, what: str, check: bool = True) -> dict:
        """POST to the server; SGLang answers {"success": false, "message": ...} with
        HTTP 400 when an operation fails."""
        try:
            response = await self.client.post(route, json=body, timeout=timeout)
        except httpx.TimeoutException:
            raise DeadlineExceeded(f"shard {self.name}: {what} timed out after {timeout:.0f}s") from None
        except httpx.HTTPError as exc:
            raise Unavailable(f"shard {self.name}: {what} failed: {exc or 'connection error'}") from None
        try:
            payload = response.json()
        except ValueError:
            payload = {"message": response.text.strip()}
        if not isinstance(payload, dict):
            payload = {"message": str(payload)}
        if response.status_code != 200 or payload.get("success") is False:
            message = f"shard {self.name}: {what} failed: HTTP {response.status_code} {payload.get('message', '')}"
            if check:
                raise Aborted(message)
            log.warning("%s", message)
        return payload
