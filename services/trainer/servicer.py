"""TrainerService: the published policy version and the trainer's progress."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from grpc import aio

from clotho.v1 import trainer_service_pb2 as pb
from clotho.v1 import trainer_service_pb2_grpc as pb_grpc
from services.trainer.policy_state import PolicyState


class TrainerServicer(pb_grpc.TrainerServiceServicer):
    """Reads the PolicyState the learner publishes into."""

    def __init__(self, state: PolicyState) -> None:
        self.state = state

    async def GetPolicy(self, request: pb.GetPolicyRequest, context: aio.ServicerContext) -> pb.GetPolicyResponse:
        return pb.GetPolicyResponse(policy=self.state.policy)

    async def WatchPolicy(
        self, request: pb.WatchPolicyRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.WatchPolicyResponse]:
        # aclosing: a cancelled stream drops its watcher now, not when GC finalises it.
        async with contextlib.aclosing(self.state.watch()) as versions:
            async for policy in versions:
                yield pb.WatchPolicyResponse(policy=policy)

    async def GetTrainerStatus(
        self, request: pb.GetTrainerStatusRequest, context: aio.ServicerContext
    ) -> pb.GetTrainerStatusResponse:
        return pb.GetTrainerStatusResponse(step=self.state.step, policy=self.state.policy, metrics=self.state.metrics)
