"""The trainer's published state: the policy version every shard serves, the step,
and the last step's metrics. The learner publishes; the servicer reads and watches.

Lives on the event loop (publish from the loop, not from a worker thread).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator

from clotho.v1 import policy_pb2


class PolicyState:
    """Latest published policy version plus one queue per watcher, so each watcher sees
    every version in order, however slowly it reads."""

    def __init__(self, version: int = 0, step: int = 0) -> None:
        self._policy = policy_pb2.PolicyVersion(version=version, committed_at=0.0, step=step)
        self.step = step
        self.metrics: dict[str, float] = {}
        self._watchers: set[asyncio.Queue[policy_pb2.PolicyVersion]] = set()

    @property
    def policy(self) -> policy_pb2.PolicyVersion:
        out = policy_pb2.PolicyVersion()
        out.CopyFrom(self._policy)
        return out

    @property
    def version(self) -> int:
        return self._policy.version

    def restore(self, version: int, step: int) -> None:
        """Start from a checkpoint's version (before anyone watches)."""
        self._policy = policy_pb2.PolicyVersion(version=version, committed_at=0.0, step=step)
        self.step = step

    def record_step(self, step: int, metrics: dict[str, float]) -> None:
        self.step = step
        self.metrics = dict(metrics)

    def publish(self, version: int, step: int, committed_at: float | None = None) -> policy_pb2.PolicyVersion:
        """Announce a version every shard has committed."""
        if version <= self._policy.version:
            raise ValueError(f"version {version} is not newer than {self._policy.version}")
        self._policy = policy_pb2.PolicyVersion(
            version=version, committed_at=time.time() if committed_at is None else committed_at, step=step
        )
        for queue in self._watchers:
            queue.put_nowait(self.policy)
        return self.policy

    async def watch(self) -> AsyncGenerator[policy_pb2.PolicyVersion, None]:
        """The current version, then every newly published one, until cancelled."""
        queue: asyncio.Queue[policy_pb2.PolicyVersion] = asyncio.Queue()
        self._watchers.add(queue)
        try:
            yield self.policy
            while True:
                yield await queue.get()
        finally:
            self._watchers.discard(queue)

    @property
    def watcher_count(self) -> int:
        return len(self._watchers)
