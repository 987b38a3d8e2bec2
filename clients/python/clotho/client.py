"""A small hand-written async client over the generated clotho.v1 stubs.

A gateway started with a `trajectory_token` wants it on every GatewayService call as
metadata `authorization: Bearer <token>`: give it as `GatewayClient(target, token=...)`,
or put `bearer_interceptors(token)` on a channel of your own.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, TypedDict, TypeVar, Unpack

import grpc
from grpc import aio

from clotho.v1 import (
    gateway_service_pb2 as gw,
)
from clotho.v1 import (
    gateway_service_pb2_grpc as gw_grpc,
)
from clotho.v1 import (
    inference_service_pb2 as inf,
)
from clotho.v1 import (
    inference_service_pb2_grpc as inf_grpc,
)
from clotho.v1 import (
    scored_data_pb2 as sd,
)

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")

_OPTIONS = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)]


def plain_token(token: Any) -> str | None:
    """A str, a pydantic SecretStr or None; empty means none."""
    value = token.get_secret_value() if hasattr(token, "get_secret_value") else token
    return value or None


def bearer_metadata(token: Any) -> tuple[tuple[str, str], ...]:
    """Per-call metadata carrying `token` (empty when there is none)."""
    plain = plain_token(token)
    return (("authorization", f"Bearer {plain}"),) if plain else ()


class _BearerToken:
    """Adds `authorization: Bearer <token>` to the metadata of every call on a channel.

    Works on insecure channels, where call credentials are refused. grpc.aio files each
    interceptor under one kind of call only, so there is one subclass per kind."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: aio.ClientCallDetails) -> aio.ClientCallDetails:
        metadata = aio.Metadata(*[(k, v) for k, v in (details.metadata or ()) if k != "authorization"])
        metadata.add(*self._header)
        return aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


class _UnaryUnaryBearer(_BearerToken, aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self,
        continuation: Callable[[aio.ClientCallDetails, _Req], Awaitable[aio.UnaryUnaryCall[_Req, _Resp]]],
        client_call_details: aio.ClientCallDetails,
        request: _Req,
    ) -> aio.UnaryUnaryCall[_Req, _Resp]:
        return await continuation(self._details(client_call_details), request)


class _UnaryStreamBearer(_BearerToken, aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self,
        continuation: Callable[[aio.ClientCallDetails, _Req], Awaitable[aio.UnaryStreamCall[_Req, _Resp]]],
        client_call_details: aio.ClientCallDetails,
        request: _Req,
    ) -> aio.UnaryStreamCall[_Req, _Resp]:
        return await continuation(self._details(client_call_details), request)


class _StreamUnaryBearer(_BearerToken, aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(
        self,
        continuation: Callable[
            [aio.ClientCallDetails, AsyncIterable[_Req] | Iterable[_Req]],
            Awaitable[aio.StreamUnaryCall[_Req, _Resp]],
        ],
        client_call_details: aio.ClientCallDetails,
        request_iterator: AsyncIterable[_Req] | Iterable[_Req],
    ) -> aio.StreamUnaryCall[_Req, _Resp]:
        return await continuation(self._details(client_call_details), request_iterator)


class _StreamStreamBearer(_BearerToken, aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self,
        continuation: Callable[
            [aio.ClientCallDetails, AsyncIterable[_Req] | Iterable[_Req]],
            Awaitable[aio.StreamStreamCall[_Req, _Resp]],
        ],
        client_call_details: aio.ClientCallDetails,
        request_iterator: AsyncIterable[_Req] | Iterable[_Req],
    ) -> aio.StreamStreamCall[_Req, _Resp]:
        return await continuation(self._details(client_call_details), request_iterator)


def bearer_interceptors(token: Any) -> list[aio.ClientInterceptor]:
    """Channel interceptors that send `token` (a str or SecretStr) on every call, for
    `aio.insecure_channel(..., interceptors=...)`; none when there is no token."""
    plain = plain_token(token)
    if not plain:
        return []
    return [cls(plain) for cls in (_UnaryUnaryBearer, _UnaryStreamBearer, _StreamUnaryBearer, _StreamStreamBearer)]


class GatewayClient:
    """Submit scored groups and stream batches with credit-based flow control.

    `token`: the gateway's trajectory_token. On the channel the client opens it rides
    on every call (`client.stub` included); with a `channel` of your own only the
    client's methods send it (or give that channel `bearer_interceptors(token)`)."""

    def __init__(self, target: str, channel: aio.Channel | None = None, token: Any = None) -> None:
        if channel is None:
            self.channel = aio.insecure_channel(target, options=_OPTIONS, interceptors=bearer_interceptors(token))
            self._metadata: tuple[tuple[str, str], ...] = ()
        else:
            self.channel = channel
            self._metadata = bearer_metadata(token)
        self.stub = gw_grpc.GatewayServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> GatewayClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def submit(self, groups: Iterable[sd.ScoredGroup]) -> gw.SubmitScoredDataResponse:
        async def requests() -> AsyncIterator[gw.SubmitScoredDataRequest]:
            for g in groups:
                yield gw.SubmitScoredDataRequest(group=g)

        response: gw.SubmitScoredDataResponse = await self.stub.SubmitScoredData(
            requests(), metadata=self._metadata or None
        )
        return response

    async def batches(self, ahead: int = 1) -> AsyncIterator[gw.StreamBatchesResponse]:
        """Yield batches forever, never holding more than `ahead` unconsumed ones: one new
        credit is granted each time a batch is handed to the caller."""
        credits: asyncio.Queue[int] = asyncio.Queue()
        credits.put_nowait(ahead)

        async def requests() -> AsyncIterator[gw.StreamBatchesRequest]:
            while True:
                yield gw.StreamBatchesRequest(credits=await credits.get())

        call = self.stub.StreamBatches(requests(), metadata=self._metadata or None)
        try:
            async for batch in call:
                yield batch
                credits.put_nowait(1)
        finally:
            call.cancel()


class SamplingFields(TypedDict, total=False):
    """The fields of inf.SamplingParams, as keyword arguments of InferenceClient.generate."""

    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    stop_token_ids: Iterable[int]
    stop: Iterable[str]
    n: int
    ignore_eos: bool
    seed: int
    frequency_penalty: float
    presence_penalty: float
    repetition_penalty: float


class InferenceClient:
    """Generate from an InferenceService."""

    def __init__(self, target: str, channel: aio.Channel | None = None) -> None:
        self.channel = channel or aio.insecure_channel(target, options=_OPTIONS)
        self.stub = inf_grpc.InferenceServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def generate(
        self,
        input_ids: Sequence[int],
        *,
        return_prompt_logprobs: bool = False,
        top_logprobs: int = 0,
        prompt_top_logprobs: int = 0,
        **sampling: Unpack[SamplingFields],
    ) -> list[inf.Completion]:
        """All samples' final results, ordered by sample index. `top_logprobs` /
        `prompt_top_logprobs` (at most 20) also return that many most likely tokens per
        generated token / prompt position (Completion.output_top_logprobs,
        prompt_top_logprobs)."""
        request = inf.GenerateRequest(
            input_ids=list(input_ids),
            sampling_params=inf.SamplingParams(**sampling),
            return_prompt_logprobs=return_prompt_logprobs,
            top_logprobs=top_logprobs,
            prompt_top_logprobs=prompt_top_logprobs,
        )
        done: dict[int, inf.Completion] = {}
        async for msg in self.stub.Generate(request):
            if msg.WhichOneof("payload") == "completion":
                done[msg.index] = msg.completion
        return [done[i] for i in sorted(done)]


__all__ = ["GatewayClient", "InferenceClient", "bearer_interceptors", "bearer_metadata", "grpc"]
