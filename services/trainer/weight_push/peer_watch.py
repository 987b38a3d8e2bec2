"""Whether the inference services of a weight update are still alive (`PeerWatch`).

During an update the sender's collective calls and RPCs cannot tell a slow peer from a
dead one: a broadcast to a killed rank blocks until the group's timeout, and the update
would then report "deadline exceeded". The watch probes each service with
GetServedPolicy (cheap, answered without the engine) every `probe_seconds`:

- UNAVAILABLE (connection refused or reset: the process died) names the peer at once;
- no answer within `probe_timeout_seconds`, twice in a row, names it as not answering
  (a frozen process keeps its connection but answers nothing);
- any other answer, an error included, means the process is alive.

`watch(stage)` runs until it finds a dead peer and raises StageFailed naming it;
`blame(stage, cause)` probes once, for a stage that failed some other way, and names a
dead peer in place of the symptom when there is one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc
from grpc import aio

from clotho.v1 import inference_service_pb2 as pb
from clotho.v1 import inference_service_pb2_grpc as pb_grpc
from services.trainer.weight_push.report import StageFailed, describe

# Consecutive probe deadlines that make a live connection count as a dead peer.
MISSES_TO_FAIL = 2


class PeerWatch:
    def __init__(
        self,
        names: Sequence[str],
        stubs: Sequence[pb_grpc.InferenceServiceStub],
        probe_seconds: float = 1.0,
        probe_timeout_seconds: float = 5.0,
    ) -> None:
        self._names = list(names)
        self._stubs = list(stubs)
        self.probe_seconds = probe_seconds
        self.probe_timeout_seconds = probe_timeout_seconds

    def _label(self, index: int) -> str:
        return f"shard {index} ({self._names[index]})"

    async def _probe(self, index: int) -> str | None:
        """None if the service answered; else what went wrong ("" for a missed deadline)."""
        try:
            await self._stubs[index].GetServedPolicy(pb.GetServedPolicyRequest(), timeout=self.probe_timeout_seconds)
        except aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                return describe(exc)
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return ""
        return None

    async def watch(self, stage: str) -> None:
        """Probe every service until one is dead; raise StageFailed naming it."""
        misses = [0] * len(self._stubs)
        while True:
            results = await asyncio.gather(*(self._probe(i) for i in range(len(self._stubs))))
            for i, result in enumerate(results):
                if result:
                    raise StageFailed(f"{self._label(i)} died during {stage}: {result}")
                misses[i] = misses[i] + 1 if result == "" else 0
                if misses[i] >= MISSES_TO_FAIL:
                    raise StageFailed(
                        f"{self._label(i)} stopped answering during {stage} "
                        f"(no answer within {self.probe_timeout_seconds:g}s, {misses[i]} times)"
                    )
            await asyncio.sleep(self.probe_seconds)

    async def blame(self, stage: str, cause: str) -> str:
        """`cause`, or, if a service is dead now, a message naming it (with the cause)."""
        results = await asyncio.gather(*(self._probe(i) for i in range(len(self._stubs))))
        dead = [f"{self._label(i)} died during {stage}: {r}" for i, r in enumerate(results) if r]
        if dead:
            return f"{'; '.join(dead)} (then: {cause})"
        return cause
