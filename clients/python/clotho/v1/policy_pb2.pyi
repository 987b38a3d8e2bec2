from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class PolicyVersion(_message.Message):
    __slots__ = ("version", "committed_at", "step")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_AT_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    version: int
    committed_at: float
    step: int
    def __init__(self, version: _Optional[int] = ..., committed_at: _Optional[float] = ..., step: _Optional[int] = ...) -> None: ...

class VersionSpan(_message.Message):
    __slots__ = ("start_token", "version")
    START_TOKEN_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    start_token: int
    version: int
    def __init__(self, start_token: _Optional[int] = ..., version: _Optional[int] = ...) -> None: ...
