"""What a weight push reports: a SyncReport when every shard committed, a
WeightSyncError naming the stage and the shard when it was aborted."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from grpc import aio

from services.common.errors import Aborted


@dataclass(frozen=True)
class SyncReport:
    """One committed update."""

    version: int
    seconds: float
    bytes: int
    buckets: int
    group_name: str = ""
    # True when this update formed a new collective group.
    formed_group: bool = False
    resync: bool = False
    # Seconds spent in each stage (prepare, transfer, await, commit).
    stages: dict[str, float] = field(default_factory=dict)

    @property
    def bytes_per_second(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else 0.0


class WeightSyncError(Aborted):
    """A weight update failed and was aborted on every shard; they still serve the
    previous version."""

    def __init__(self, version: int, stage: str, detail: str) -> None:
        super().__init__(f"weight update to version {version} failed during {stage}: {detail}")
        self.version = version
        self.stage = stage
        self.detail = detail


class StageFailed(Exception):
    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def describe(exc: BaseException) -> str:
    if isinstance(exc, aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return "deadline exceeded"
    return f"{type(exc).__name__}: {exc}"
