from clotho.v1 import policy_pb2 as _policy_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_ABORT: _ClassVar[FinishReason]

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    D_TYPE_UNSPECIFIED: _ClassVar[DType]
    D_TYPE_FLOAT32: _ClassVar[DType]
    D_TYPE_BFLOAT16: _ClassVar[DType]
    D_TYPE_FLOAT16: _ClassVar[DType]

class CollectiveBackend(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COLLECTIVE_BACKEND_UNSPECIFIED: _ClassVar[CollectiveBackend]
    COLLECTIVE_BACKEND_GLOO: _ClassVar[CollectiveBackend]
    COLLECTIVE_BACKEND_NCCL: _ClassVar[CollectiveBackend]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_ABORT: FinishReason
D_TYPE_UNSPECIFIED: DType
D_TYPE_FLOAT32: DType
D_TYPE_BFLOAT16: DType
D_TYPE_FLOAT16: DType
COLLECTIVE_BACKEND_UNSPECIFIED: CollectiveBackend
COLLECTIVE_BACKEND_GLOO: CollectiveBackend
COLLECTIVE_BACKEND_NCCL: CollectiveBackend

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "max_new_tokens", "stop_token_ids", "stop", "n", "ignore_eos", "seed", "frequency_penalty", "presence_penalty", "repetition_penalty")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    stop: _containers.RepeatedScalarFieldContainer[str]
    n: int
    ignore_eos: bool
    seed: int
    frequency_penalty: float
    presence_penalty: float
    repetition_penalty: float
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., stop: _Optional[_Iterable[str]] = ..., n: _Optional[int] = ..., ignore_eos: _Optional[bool] = ..., seed: _Optional[int] = ..., frequency_penalty: _Optional[float] = ..., presence_penalty: _Optional[float] = ..., repetition_penalty: _Optional[float] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("input_ids", "sampling_params", "return_prompt_logprobs", "stream", "request_id", "top_logprobs", "prompt_top_logprobs")
    INPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_PARAMS_FIELD_NUMBER: _ClassVar[int]
    RETURN_PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    input_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling_params: SamplingParams
    return_prompt_logprobs: bool
    stream: bool
    request_id: str
    top_logprobs: int
    prompt_top_logprobs: int
    def __init__(self, input_ids: _Optional[_Iterable[int]] = ..., sampling_params: _Optional[_Union[SamplingParams, _Mapping]] = ..., return_prompt_logprobs: _Optional[bool] = ..., stream: _Optional[bool] = ..., request_id: _Optional[str] = ..., top_logprobs: _Optional[int] = ..., prompt_top_logprobs: _Optional[int] = ...) -> None: ...

class TopLogprobs(_message.Message):
    __slots__ = ("token_ids", "logprobs")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class TokenChunk(_message.Message):
    __slots__ = ("token_ids", "logprobs", "version", "top_logprobs")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    version: int
    top_logprobs: _containers.RepeatedCompositeFieldContainer[TopLogprobs]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ..., version: _Optional[int] = ..., top_logprobs: _Optional[_Iterable[_Union[TopLogprobs, _Mapping]]] = ...) -> None: ...

class Completion(_message.Message):
    __slots__ = ("output_ids", "output_logprobs", "finish_reason", "matched_stop", "version_spans", "prompt_logprobs", "prompt_tokens", "output_top_logprobs", "prompt_top_logprobs")
    OUTPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    MATCHED_STOP_FIELD_NUMBER: _ClassVar[int]
    VERSION_SPANS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    output_ids: _containers.RepeatedScalarFieldContainer[int]
    output_logprobs: _containers.RepeatedScalarFieldContainer[float]
    finish_reason: FinishReason
    matched_stop: str
    version_spans: _containers.RepeatedCompositeFieldContainer[_policy_pb2.VersionSpan]
    prompt_logprobs: _containers.RepeatedScalarFieldContainer[float]
    prompt_tokens: int
    output_top_logprobs: _containers.RepeatedCompositeFieldContainer[TopLogprobs]
    prompt_top_logprobs: _containers.RepeatedCompositeFieldContainer[TopLogprobs]
    def __init__(self, output_ids: _Optional[_Iterable[int]] = ..., output_logprobs: _Optional[_Iterable[float]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., matched_stop: _Optional[str] = ..., version_spans: _Optional[_Iterable[_Union[_policy_pb2.VersionSpan, _Mapping]]] = ..., prompt_logprobs: _Optional[_Iterable[float]] = ..., prompt_tokens: _Optional[int] = ..., output_top_logprobs: _Optional[_Iterable[_Union[TopLogprobs, _Mapping]]] = ..., prompt_top_logprobs: _Optional[_Iterable[_Union[TopLogprobs, _Mapping]]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("index", "chunk", "completion")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_FIELD_NUMBER: _ClassVar[int]
    index: int
    chunk: TokenChunk
    completion: Completion
    def __init__(self, index: _Optional[int] = ..., chunk: _Optional[_Union[TokenChunk, _Mapping]] = ..., completion: _Optional[_Union[Completion, _Mapping]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("model_name", "model_path", "max_context_len", "eos_token_id", "engine", "shard_count", "vocab_size", "host_id", "accepts_shared_memory", "device_uuid")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_LEN_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    SHARD_COUNT_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    ACCEPTS_SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_path: str
    max_context_len: int
    eos_token_id: int
    engine: str
    shard_count: int
    vocab_size: int
    host_id: str
    accepts_shared_memory: bool
    device_uuid: str
    def __init__(self, model_name: _Optional[str] = ..., model_path: _Optional[str] = ..., max_context_len: _Optional[int] = ..., eos_token_id: _Optional[int] = ..., engine: _Optional[str] = ..., shard_count: _Optional[int] = ..., vocab_size: _Optional[int] = ..., host_id: _Optional[str] = ..., accepts_shared_memory: _Optional[bool] = ..., device_uuid: _Optional[str] = ...) -> None: ...

class GetServedPolicyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetServedPolicyResponse(_message.Message):
    __slots__ = ("policy",)
    POLICY_FIELD_NUMBER: _ClassVar[int]
    policy: _policy_pb2.PolicyVersion
    def __init__(self, policy: _Optional[_Union[_policy_pb2.PolicyVersion, _Mapping]] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "shape", "dtype", "bucket", "offset")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    bucket: int
    offset: int
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., bucket: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class BucketSpec(_message.Message):
    __slots__ = ("dtype", "numel")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    numel: int
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., numel: _Optional[int] = ...) -> None: ...

class WeightManifest(_message.Message):
    __slots__ = ("tensors", "buckets")
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    buckets: _containers.RepeatedCompositeFieldContainer[BucketSpec]
    def __init__(self, tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., buckets: _Optional[_Iterable[_Union[BucketSpec, _Mapping]]] = ...) -> None: ...

class Rendezvous(_message.Message):
    __slots__ = ("backend", "address", "port", "world_size", "rank_offset", "group_name", "shared_memory")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    RANK_OFFSET_FIELD_NUMBER: _ClassVar[int]
    GROUP_NAME_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    backend: CollectiveBackend
    address: str
    port: int
    world_size: int
    rank_offset: int
    group_name: str
    shared_memory: SharedMemoryTransport
    def __init__(self, backend: _Optional[_Union[CollectiveBackend, str]] = ..., address: _Optional[str] = ..., port: _Optional[int] = ..., world_size: _Optional[int] = ..., rank_offset: _Optional[int] = ..., group_name: _Optional[str] = ..., shared_memory: _Optional[_Union[SharedMemoryTransport, _Mapping]] = ...) -> None: ...

class SharedMemoryTransport(_message.Message):
    __slots__ = ("segment", "segment_bytes", "buffer_set", "update_id", "cuda_sets")
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    BUFFER_SET_FIELD_NUMBER: _ClassVar[int]
    UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    CUDA_SETS_FIELD_NUMBER: _ClassVar[int]
    segment: str
    segment_bytes: int
    buffer_set: int
    update_id: int
    cuda_sets: _containers.RepeatedCompositeFieldContainer[CudaIpcHandle]
    def __init__(self, segment: _Optional[str] = ..., segment_bytes: _Optional[int] = ..., buffer_set: _Optional[int] = ..., update_id: _Optional[int] = ..., cuda_sets: _Optional[_Iterable[_Union[CudaIpcHandle, _Mapping]]] = ...) -> None: ...

class CudaIpcHandle(_message.Message):
    __slots__ = ("device", "handle", "size_bytes", "offset_bytes", "ref_counter_handle", "ref_counter_offset", "event_handle", "event_sync_required")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    OFFSET_BYTES_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_HANDLE_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_OFFSET_FIELD_NUMBER: _ClassVar[int]
    EVENT_HANDLE_FIELD_NUMBER: _ClassVar[int]
    EVENT_SYNC_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    device: int
    handle: bytes
    size_bytes: int
    offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool
    def __init__(self, device: _Optional[int] = ..., handle: _Optional[bytes] = ..., size_bytes: _Optional[int] = ..., offset_bytes: _Optional[int] = ..., ref_counter_handle: _Optional[bytes] = ..., ref_counter_offset: _Optional[int] = ..., event_handle: _Optional[bytes] = ..., event_sync_required: _Optional[bool] = ...) -> None: ...

class PrepareWeightUpdateRequest(_message.Message):
    __slots__ = ("version", "manifest", "rendezvous", "deadline_seconds", "step", "resync")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    RENDEZVOUS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    RESYNC_FIELD_NUMBER: _ClassVar[int]
    version: int
    manifest: WeightManifest
    rendezvous: Rendezvous
    deadline_seconds: float
    step: int
    resync: bool
    def __init__(self, version: _Optional[int] = ..., manifest: _Optional[_Union[WeightManifest, _Mapping]] = ..., rendezvous: _Optional[_Union[Rendezvous, _Mapping]] = ..., deadline_seconds: _Optional[float] = ..., step: _Optional[int] = ..., resync: _Optional[bool] = ...) -> None: ...

class PrepareWeightUpdateResponse(_message.Message):
    __slots__ = ("joined_group",)
    JOINED_GROUP_FIELD_NUMBER: _ClassVar[int]
    joined_group: bool
    def __init__(self, joined_group: _Optional[bool] = ...) -> None: ...

class AwaitWeightTransferRequest(_message.Message):
    __slots__ = ("version", "bucket_crc32s")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BUCKET_CRC32S_FIELD_NUMBER: _ClassVar[int]
    version: int
    bucket_crc32s: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, version: _Optional[int] = ..., bucket_crc32s: _Optional[_Iterable[int]] = ...) -> None: ...

class AwaitWeightTransferResponse(_message.Message):
    __slots__ = ("bytes_received", "seconds")
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    bytes_received: int
    seconds: float
    def __init__(self, bytes_received: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class CommitWeightUpdateRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class CommitWeightUpdateResponse(_message.Message):
    __slots__ = ("policy",)
    POLICY_FIELD_NUMBER: _ClassVar[int]
    policy: _policy_pb2.PolicyVersion
    def __init__(self, policy: _Optional[_Union[_policy_pb2.PolicyVersion, _Mapping]] = ...) -> None: ...

class AbortWeightUpdateRequest(_message.Message):
    __slots__ = ("version", "reason")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    version: int
    reason: str
    def __init__(self, version: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class AbortWeightUpdateResponse(_message.Message):
    __slots__ = ("policy",)
    POLICY_FIELD_NUMBER: _ClassVar[int]
    policy: _policy_pb2.PolicyVersion
    def __init__(self, policy: _Optional[_Union[_policy_pb2.PolicyVersion, _Mapping]] = ...) -> None: ...

class ReleaseMemoryRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReleaseMemoryResponse(_message.Message):
    __slots__ = ("shards",)
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    shards: _containers.RepeatedCompositeFieldContainer[ShardMemory]
    def __init__(self, shards: _Optional[_Iterable[_Union[ShardMemory, _Mapping]]] = ...) -> None: ...

class ResumeMemoryRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResumeMemoryResponse(_message.Message):
    __slots__ = ("shards",)
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    shards: _containers.RepeatedCompositeFieldContainer[ShardMemory]
    def __init__(self, shards: _Optional[_Iterable[_Union[ShardMemory, _Mapping]]] = ...) -> None: ...

class ShardMemory(_message.Message):
    __slots__ = ("shard", "phase", "kv_cache_bytes", "freed_bytes", "allocated_bytes", "peak_allocated_bytes", "device_used_bytes", "device_total_bytes", "rss_bytes")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREED_BYTES_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    PEAK_ALLOCATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    shard: str
    phase: str
    kv_cache_bytes: int
    freed_bytes: int
    allocated_bytes: int
    peak_allocated_bytes: int
    device_used_bytes: int
    device_total_bytes: int
    rss_bytes: int
    def __init__(self, shard: _Optional[str] = ..., phase: _Optional[str] = ..., kv_cache_bytes: _Optional[int] = ..., freed_bytes: _Optional[int] = ..., allocated_bytes: _Optional[int] = ..., peak_allocated_bytes: _Optional[int] = ..., device_used_bytes: _Optional[int] = ..., device_total_bytes: _Optional[int] = ..., rss_bytes: _Optional[int] = ...) -> None: ...
