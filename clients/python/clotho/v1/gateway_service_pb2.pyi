from clotho.v1 import inference_service_pb2 as _inference_service_pb2
from clotho.v1 import scored_data_pb2 as _scored_data_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterTrainerRequest(_message.Message):
    __slots__ = ("wandb_group", "wandb_project", "batch_size", "max_token_len", "checkpoint_dir", "save_checkpoint_interval", "starting_step", "num_steps")
    WANDB_GROUP_FIELD_NUMBER: _ClassVar[int]
    WANDB_PROJECT_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKEN_LEN_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_DIR_FIELD_NUMBER: _ClassVar[int]
    SAVE_CHECKPOINT_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    STARTING_STEP_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    wandb_group: str
    wandb_project: str
    batch_size: int
    max_token_len: int
    checkpoint_dir: str
    save_checkpoint_interval: int
    starting_step: int
    num_steps: int
    def __init__(self, wandb_group: _Optional[str] = ..., wandb_project: _Optional[str] = ..., batch_size: _Optional[int] = ..., max_token_len: _Optional[int] = ..., checkpoint_dir: _Optional[str] = ..., save_checkpoint_interval: _Optional[int] = ..., starting_step: _Optional[int] = ..., num_steps: _Optional[int] = ...) -> None: ...

class RegisterTrainerResponse(_message.Message):
    __slots__ = ("uuid",)
    UUID_FIELD_NUMBER: _ClassVar[int]
    uuid: str
    def __init__(self, uuid: _Optional[str] = ...) -> None: ...

class RegisterEnvRequest(_message.Message):
    __slots__ = ("max_token_length", "desired_name", "weight", "group_size", "min_batch_allocation")
    MAX_TOKEN_LENGTH_FIELD_NUMBER: _ClassVar[int]
    DESIRED_NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    MIN_BATCH_ALLOCATION_FIELD_NUMBER: _ClassVar[int]
    max_token_length: int
    desired_name: str
    weight: float
    group_size: int
    min_batch_allocation: float
    def __init__(self, max_token_length: _Optional[int] = ..., desired_name: _Optional[str] = ..., weight: _Optional[float] = ..., group_size: _Optional[int] = ..., min_batch_allocation: _Optional[float] = ...) -> None: ...

class RegisterEnvResponse(_message.Message):
    __slots__ = ("status", "env_id", "wandb_name", "checkpoint_dir", "starting_step", "checkpoint_interval", "num_steps")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ENV_ID_FIELD_NUMBER: _ClassVar[int]
    WANDB_NAME_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_DIR_FIELD_NUMBER: _ClassVar[int]
    STARTING_STEP_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    status: str
    env_id: int
    wandb_name: str
    checkpoint_dir: str
    starting_step: int
    checkpoint_interval: int
    num_steps: int
    def __init__(self, status: _Optional[str] = ..., env_id: _Optional[int] = ..., wandb_name: _Optional[str] = ..., checkpoint_dir: _Optional[str] = ..., starting_step: _Optional[int] = ..., checkpoint_interval: _Optional[int] = ..., num_steps: _Optional[int] = ...) -> None: ...

class DisconnectEnvRequest(_message.Message):
    __slots__ = ("env_id",)
    ENV_ID_FIELD_NUMBER: _ClassVar[int]
    env_id: int
    def __init__(self, env_id: _Optional[int] = ...) -> None: ...

class DisconnectEnvResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("current_step", "queue_size", "policy_version", "stale_dropped_groups", "stale_kept_groups", "max_staleness", "stored_groups", "max_stored_groups")
    CURRENT_STEP_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SIZE_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    STALE_DROPPED_GROUPS_FIELD_NUMBER: _ClassVar[int]
    STALE_KEPT_GROUPS_FIELD_NUMBER: _ClassVar[int]
    MAX_STALENESS_FIELD_NUMBER: _ClassVar[int]
    STORED_GROUPS_FIELD_NUMBER: _ClassVar[int]
    MAX_STORED_GROUPS_FIELD_NUMBER: _ClassVar[int]
    current_step: int
    queue_size: int
    policy_version: int
    stale_dropped_groups: int
    stale_kept_groups: int
    max_staleness: int
    stored_groups: int
    max_stored_groups: int
    def __init__(self, current_step: _Optional[int] = ..., queue_size: _Optional[int] = ..., policy_version: _Optional[int] = ..., stale_dropped_groups: _Optional[int] = ..., stale_kept_groups: _Optional[int] = ..., max_staleness: _Optional[int] = ..., stored_groups: _Optional[int] = ..., max_stored_groups: _Optional[int] = ...) -> None: ...

class GetEnvStatusRequest(_message.Message):
    __slots__ = ("env_id",)
    ENV_ID_FIELD_NUMBER: _ClassVar[int]
    env_id: int
    def __init__(self, env_id: _Optional[int] = ...) -> None: ...

class GetEnvStatusResponse(_message.Message):
    __slots__ = ("current_step", "queue_size", "unallocated_fraction", "self_queue_size", "max_group_size", "env_weight")
    CURRENT_STEP_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SIZE_FIELD_NUMBER: _ClassVar[int]
    UNALLOCATED_FRACTION_FIELD_NUMBER: _ClassVar[int]
    SELF_QUEUE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    ENV_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    current_step: int
    queue_size: int
    unallocated_fraction: float
    self_queue_size: int
    max_group_size: int
    env_weight: float
    def __init__(self, current_step: _Optional[int] = ..., queue_size: _Optional[int] = ..., unallocated_fraction: _Optional[float] = ..., self_queue_size: _Optional[int] = ..., max_group_size: _Optional[int] = ..., env_weight: _Optional[float] = ...) -> None: ...

class SubmitScoredDataRequest(_message.Message):
    __slots__ = ("group",)
    GROUP_FIELD_NUMBER: _ClassVar[int]
    group: _scored_data_pb2.ScoredGroup
    def __init__(self, group: _Optional[_Union[_scored_data_pb2.ScoredGroup, _Mapping]] = ...) -> None: ...

class SubmitScoredDataResponse(_message.Message):
    __slots__ = ("received", "buffered")
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    BUFFERED_FIELD_NUMBER: _ClassVar[int]
    received: int
    buffered: int
    def __init__(self, received: _Optional[int] = ..., buffered: _Optional[int] = ...) -> None: ...

class StreamBatchesRequest(_message.Message):
    __slots__ = ("credits", "policy_version", "resume_step", "checkpointed_step")
    CREDITS_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    RESUME_STEP_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTED_STEP_FIELD_NUMBER: _ClassVar[int]
    credits: int
    policy_version: int
    resume_step: int
    checkpointed_step: int
    def __init__(self, credits: _Optional[int] = ..., policy_version: _Optional[int] = ..., resume_step: _Optional[int] = ..., checkpointed_step: _Optional[int] = ...) -> None: ...

class StreamBatchesResponse(_message.Message):
    __slots__ = ("groups", "step", "traceparent", "env_names")
    class EnvNamesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: str
        def __init__(self, key: _Optional[int] = ..., value: _Optional[str] = ...) -> None: ...
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    ENV_NAMES_FIELD_NUMBER: _ClassVar[int]
    groups: _containers.RepeatedCompositeFieldContainer[_scored_data_pb2.ScoredGroup]
    step: int
    traceparent: str
    env_names: _containers.ScalarMap[int, str]
    def __init__(self, groups: _Optional[_Iterable[_Union[_scored_data_pb2.ScoredGroup, _Mapping]]] = ..., step: _Optional[int] = ..., traceparent: _Optional[str] = ..., env_names: _Optional[_Mapping[int, str]] = ...) -> None: ...

class GatewayServiceGenerateRequest(_message.Message):
    __slots__ = ("request",)
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request: _inference_service_pb2.GenerateRequest
    def __init__(self, request: _Optional[_Union[_inference_service_pb2.GenerateRequest, _Mapping]] = ...) -> None: ...

class GatewayServiceGenerateResponse(_message.Message):
    __slots__ = ("response",)
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    response: _inference_service_pb2.GenerateResponse
    def __init__(self, response: _Optional[_Union[_inference_service_pb2.GenerateResponse, _Mapping]] = ...) -> None: ...

class GetLatestExampleRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetLatestExampleResponse(_message.Message):
    __slots__ = ("group",)
    GROUP_FIELD_NUMBER: _ClassVar[int]
    group: _scored_data_pb2.ScoredGroup
    def __init__(self, group: _Optional[_Union[_scored_data_pb2.ScoredGroup, _Mapping]] = ...) -> None: ...

class ResetDataRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResetDataResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetInfoResponse(_message.Message):
    __slots__ = ("batch_size", "max_token_len")
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKEN_LEN_FIELD_NUMBER: _ClassVar[int]
    batch_size: int
    max_token_len: int
    def __init__(self, batch_size: _Optional[int] = ..., max_token_len: _Optional[int] = ...) -> None: ...
