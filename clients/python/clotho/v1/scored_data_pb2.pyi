from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DistillPosition(_message.Message):
    __slots__ = ("token_ids", "logprobs")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class ScoredSequence(_message.Message):
    __slots__ = ("tokens", "masks", "score", "advantages", "ref_logprobs", "inference_logprobs", "messages", "overrides", "policy_version", "distill", "present_fields")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    MASKS_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    ADVANTAGES_FIELD_NUMBER: _ClassVar[int]
    REF_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    DISTILL_FIELD_NUMBER: _ClassVar[int]
    PRESENT_FIELDS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    masks: _containers.RepeatedScalarFieldContainer[int]
    score: float
    advantages: _containers.RepeatedScalarFieldContainer[float]
    ref_logprobs: _containers.RepeatedScalarFieldContainer[float]
    inference_logprobs: _containers.RepeatedScalarFieldContainer[float]
    messages: _containers.RepeatedCompositeFieldContainer[_struct_pb2.Struct]
    overrides: _struct_pb2.Struct
    policy_version: int
    distill: _containers.RepeatedCompositeFieldContainer[DistillPosition]
    present_fields: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, tokens: _Optional[_Iterable[int]] = ..., masks: _Optional[_Iterable[int]] = ..., score: _Optional[float] = ..., advantages: _Optional[_Iterable[float]] = ..., ref_logprobs: _Optional[_Iterable[float]] = ..., inference_logprobs: _Optional[_Iterable[float]] = ..., messages: _Optional[_Iterable[_Union[_struct_pb2.Struct, _Mapping]]] = ..., overrides: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., policy_version: _Optional[int] = ..., distill: _Optional[_Iterable[_Union[DistillPosition, _Mapping]]] = ..., present_fields: _Optional[_Iterable[str]] = ...) -> None: ...

class ScoredGroup(_message.Message):
    __slots__ = ("sequences", "env_id", "generation_params", "group_overrides", "images")
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    ENV_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_PARAMS_FIELD_NUMBER: _ClassVar[int]
    GROUP_OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    sequences: _containers.RepeatedCompositeFieldContainer[ScoredSequence]
    env_id: int
    generation_params: _struct_pb2.Struct
    group_overrides: _struct_pb2.Struct
    images: _struct_pb2.Value
    def __init__(self, sequences: _Optional[_Iterable[_Union[ScoredSequence, _Mapping]]] = ..., env_id: _Optional[int] = ..., generation_params: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., group_overrides: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., images: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ...) -> None: ...
