"""clotho.v1.InferenceService over a set of shards (torch engines or SGLang servers):
protobuf in and out, generation dispatched to the least-loaded shard, the weight-update
protocol fanned out to every shard."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from grpc import aio

from clotho.v1 import inference_service_pb2 as pb
from clotho.v1 import inference_service_pb2_grpc as pb_grpc
from clotho.v1 import policy_pb2
from services.common.weight_wire import shm
from services.inference.generation_types import (
    Completion,
    FinishReason,
    GenerationRequest,
    SamplingOptions,
    ServedPolicy,
    TokenChunk,
    TopLogprobs,
)
from services.inference.memory import MemoryReport
from services.inference.metrics import InferenceMetrics
from services.inference.shard_set import ShardSet
from services.inference.torch_engine.engine import GenerationEngine
from services.inference.torch_engine.loader import WeightReceiver
from services.inference.torch_engine.shard import TorchShard
from services.inference.weight_update import UpdateRequest

log = logging.getLogger(__name__)

_FINISH_REASONS = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
}


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    """Serves `shards`, or one torch engine with its weight receiver (a single shard).

    Nothing it answers names a local path: GetModelInfo's `model_path` carries the served
    model name (a Hugging Face id when the model is served under one)."""

    def __init__(
        self,
        shards: ShardSet | GenerationEngine,
        receiver: WeightReceiver | None = None,
        model_name: str = "",
        *,
        eos_token_id: int = -1,
    ) -> None:
        if isinstance(shards, GenerationEngine):
            engine = shards
            if receiver is None:
                raise ValueError("a torch engine needs its WeightReceiver")
            shards = ShardSet([TorchShard(engine, receiver)])
            model_name = model_name or engine.model_path.name
            eos_token_id = engine.eos_token_id if eos_token_id < 0 else eos_token_id
        self.shards = shards
        self.model_name = model_name
        self.eos_token_id = eos_token_id
        # Prometheus instruments (metrics.py); None counts nothing.
        self.metrics: InferenceMetrics | None = None

    async def start(self) -> None:
        """Get every shard ready (launch or attach SGLang servers)."""
        await self.shards.start()

    async def Generate(
        self, request: pb.GenerateRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        timer = self.metrics.request(request.stream) if self.metrics is not None else None
        stream = self.shards.submit(generation_request(request))
        log.debug("generate %s: %d prompt tokens", request.request_id or "-", len(request.input_ids))
        outcome = "cancelled"
        try:
            async for event in stream:
                if timer is not None:
                    if isinstance(event, TokenChunk):
                        timer.chunk(len(event.token_ids))
                    else:
                        timer.completion(event)
                if isinstance(event, TokenChunk):
                    yield pb.GenerateResponse(
                        index=event.index,
                        chunk=pb.TokenChunk(
                            token_ids=event.token_ids,
                            logprobs=event.logprobs,
                            version=event.version,
                            top_logprobs=top_logprobs_protos(event.top_logprobs),
                        ),
                    )
                else:
                    yield pb.GenerateResponse(index=event.index, completion=completion_proto(event))
            outcome = "ok"
        except Exception:
            outcome = "error"
            raise
        finally:
            # Reached when the client cancels too (the handler task is cancelled): its
            # samples leave the batch at the next step.
            stream.cancel()
            if timer is not None:
                timer.finished(outcome)

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        return pb.GetModelInfoResponse(
            model_name=self.model_name,
            model_path=self.model_name,
            max_context_len=self.shards.max_context_len,
            eos_token_id=self.eos_token_id,
            engine=self.shards.kind,
            shard_count=len(self.shards),
            vocab_size=self.shards.vocab_size,
            host_id=shm.host_id(),
            accepts_shared_memory=self.shards.accepts_shared_memory and shm.available(),
            device_uuid=self.shards.device_uuid,
        )

    async def GetServedPolicy(
        self, request: pb.GetServedPolicyRequest, context: aio.ServicerContext
    ) -> pb.GetServedPolicyResponse:
        return pb.GetServedPolicyResponse(policy=policy_proto(self.shards.policy))

    async def PrepareWeightUpdate(
        self, request: pb.PrepareWeightUpdateRequest, context: aio.ServicerContext
    ) -> pb.PrepareWeightUpdateResponse:
        joined = await self.shards.begin(UpdateRequest.from_proto(request))
        return pb.PrepareWeightUpdateResponse(joined_group=joined)

    async def AwaitWeightTransfer(
        self, request: pb.AwaitWeightTransferRequest, context: aio.ServicerContext
    ) -> pb.AwaitWeightTransferResponse:
        received, seconds = await self.shards.await_transfer(request.version, list(request.bucket_crc32s))
        return pb.AwaitWeightTransferResponse(bytes_received=received, seconds=seconds)

    async def CommitWeightUpdate(
        self, request: pb.CommitWeightUpdateRequest, context: aio.ServicerContext
    ) -> pb.CommitWeightUpdateResponse:
        policy = await self.shards.commit(request.version)
        if self.metrics is not None:
            self.metrics.weight_commits.inc()
        return pb.CommitWeightUpdateResponse(policy=policy_proto(policy))

    async def AbortWeightUpdate(
        self, request: pb.AbortWeightUpdateRequest, context: aio.ServicerContext
    ) -> pb.AbortWeightUpdateResponse:
        policy = await self.shards.abort(request.version, request.reason)
        return pb.AbortWeightUpdateResponse(policy=policy_proto(policy))

    async def ReleaseMemory(
        self, request: pb.ReleaseMemoryRequest, context: aio.ServicerContext
    ) -> pb.ReleaseMemoryResponse:
        reports = await self.shards.release_memory()
        return pb.ReleaseMemoryResponse(shards=memory_protos(self.shards, reports))

    async def ResumeMemory(
        self, request: pb.ResumeMemoryRequest, context: aio.ServicerContext
    ) -> pb.ResumeMemoryResponse:
        reports = await self.shards.resume_memory()
        return pb.ResumeMemoryResponse(shards=memory_protos(self.shards, reports))

    async def close(self) -> None:
        """Drop any update in flight and stop every shard."""
        await self.shards.close()


def generation_request(msg: pb.GenerateRequest) -> GenerationRequest:
    """The engine's request for a GenerateRequest; unset sampling fields keep defaults."""
    sp = msg.sampling_params
    defaults = SamplingOptions()
    options = SamplingOptions(
        temperature=sp.temperature if sp.HasField("temperature") else defaults.temperature,
        top_p=sp.top_p if sp.HasField("top_p") else defaults.top_p,
        top_k=sp.top_k if sp.HasField("top_k") else defaults.top_k,
        max_new_tokens=sp.max_new_tokens if sp.HasField("max_new_tokens") else None,
        stop_token_ids=tuple(sp.stop_token_ids),
        stop=tuple(sp.stop),
        n=sp.n if sp.HasField("n") else defaults.n,
        ignore_eos=sp.ignore_eos,
        seed=sp.seed if sp.HasField("seed") else None,
        frequency_penalty=sp.frequency_penalty if sp.HasField("frequency_penalty") else defaults.frequency_penalty,
        presence_penalty=sp.presence_penalty if sp.HasField("presence_penalty") else defaults.presence_penalty,
        repetition_penalty=sp.repetition_penalty if sp.HasField("repetition_penalty") else defaults.repetition_penalty,
    )
    return GenerationRequest(
        input_ids=list(msg.input_ids),
        sampling=options,
        return_prompt_logprobs=msg.return_prompt_logprobs,
        stream=msg.stream,
        request_id=msg.request_id,
        top_logprobs=msg.top_logprobs,
        prompt_top_logprobs=msg.prompt_top_logprobs,
    )


def completion_proto(c: Completion) -> pb.Completion:
    return pb.Completion(
        output_ids=c.output_ids,
        output_logprobs=c.output_logprobs,
        finish_reason=_FINISH_REASONS[c.finish_reason],
        matched_stop=c.matched_stop,
        version_spans=[policy_pb2.VersionSpan(start_token=s.start_token, version=s.version) for s in c.version_spans],
        prompt_logprobs=c.prompt_logprobs,
        prompt_tokens=c.prompt_tokens,
        output_top_logprobs=top_logprobs_protos(c.output_top_logprobs),
        prompt_top_logprobs=top_logprobs_protos(c.prompt_top_logprobs),
    )


def memory_protos(shards: ShardSet, reports: list[MemoryReport]) -> list[pb.ShardMemory]:
    return [
        pb.ShardMemory(
            shard=s.name,
            phase=r.phase,
            kv_cache_bytes=r.kv_cache_bytes,
            freed_bytes=r.freed_bytes,
            allocated_bytes=r.allocated_bytes,
            peak_allocated_bytes=r.peak_allocated_bytes,
            device_used_bytes=r.device_used_bytes,
            device_total_bytes=r.device_total_bytes,
            rss_bytes=r.rss_bytes,
        )
        for s, r in zip(shards.shards, reports)
    ]


def top_logprobs_protos(tops: tuple[TopLogprobs, ...]) -> list[pb.TopLogprobs]:
    return [pb.TopLogprobs(token_ids=t.token_ids, logprobs=t.logprobs) for t in tops]


def policy_proto(p: ServedPolicy) -> policy_pb2.PolicyVersion:
    return policy_pb2.PolicyVersion(version=p.version, committed_at=p.committed_at, step=p.step)
