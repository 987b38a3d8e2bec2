"""A small hand-written async client over the generated clotho.v1 stubs."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Iterable, Sequence

import grpc
from grpc import aio

from clotho.v1 import (
    gateway_service_pb2 as gw,
    gateway_service_pb2_grpc as gw_grpc,
    inference_service_pb2 as inf,
    inference_service_pb2_grpc as inf_grpc,
    scored_data_pb2 as sd,
)

_OPTIONS = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)]


class GatewayClient:
    """Submit scored groups and stream batches with credit-based flow control."""

    def __init__(self, target: str, channel: aio.Channel | None = None) -> None:
        self.channel = channel or aio.insecure_channel(target, options=_OPTIONS)
        self.stub = gw_grpc.GatewayServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "GatewayClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def submit(self, groups: Iterable[sd.ScoredGroup]) -> gw.SubmitScoredDataResponse:
        async def requests() -> AsyncIterator[gw.SubmitScoredDataRequest]:
            for g in groups:
                yield gw.SubmitScoredDataRequest(group=g)

        return await self.stub.SubmitScoredData(requests())

    async def batches(self, ahead: int = 1) -> AsyncIterator[gw.StreamBatchesResponse]:
        """Yield batches forever, never holding more than `ahead` unconsumed ones: one new
        credit is granted each time a batch is handed to the caller."""
        credits: asyncio.Queue[int] = asyncio.Queue()
        credits.put_nowait(ahead)

        async def requests() -> AsyncIterator[gw.StreamBatchesRequest]:
            while True:
                yield gw.StreamBatchesRequest(credits=await credits.get())

        call = self.stub.StreamBatches(requests())
        try:
            async for batch in call:
                yield batch
                credits.put_nowait(1)
        finally:
            call.cancel()


class InferenceClient:
    """Generate from an InferenceService."""

    def __init__(self, target: str, channel: aio.Channel | None = None) -> None:
        self.channel = channel or aio.insecure_channel(target, options=_OPTIONS)
        self.stub = inf_grpc.InferenceServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def generate(
        self, input_ids: Sequence[int], *, return_prompt_logprobs: bool = False, **sampling: object
    ) -> list[inf.Completion]:
        """All samples' final results, ordered by sample index."""
        request = inf.GenerateRequest(
            input_ids=list(input_ids),
            sampling_params=inf.SamplingParams(**sampling),
            return_prompt_logprobs=return_prompt_logprobs,
        )
        done: dict[int, inf.Completion] = {}
        async for msg in self.stub.Generate(request):
            if msg.WhichOneof("payload") == "completion":
                done[msg.index] = msg.completion
        return [done[i] for i in sorted(done)]


__all__ = ["GatewayClient", "InferenceClient", "grpc"]
