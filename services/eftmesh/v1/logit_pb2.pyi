from eftmesh.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LogitServiceInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LogitServiceInfoResponse(_message.Message):
    __slots__ = ("model_id", "role", "vocab_size", "tokenizer_vocab_size", "tokenizer_fingerprint", "max_context", "dtype", "device", "max_sessions", "session_idle_timeout_s", "eos_token_id", "max_draft")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    SESSION_IDLE_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_DRAFT_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    role: str
    vocab_size: int
    tokenizer_vocab_size: int
    tokenizer_fingerprint: str
    max_context: int
    dtype: str
    device: str
    max_sessions: int
    session_idle_timeout_s: float
    eos_token_id: int
    max_draft: int
    def __init__(self, model_id: _Optional[str] = ..., role: _Optional[str] = ..., vocab_size: _Optional[int] = ..., tokenizer_vocab_size: _Optional[int] = ..., tokenizer_fingerprint: _Optional[str] = ..., max_context: _Optional[int] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., max_sessions: _Optional[int] = ..., session_idle_timeout_s: _Optional[float] = ..., eos_token_id: _Optional[int] = ..., max_draft: _Optional[int] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("session_id", "start", "tokens", "rows", "dtype")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    start: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    rows: int
    dtype: _tensor_pb2.DType
    def __init__(self, session_id: _Optional[str] = ..., start: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ..., rows: _Optional[int] = ..., dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("logprobs", "cache_length")
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    CACHE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    logprobs: _tensor_pb2.Tensor
    cache_length: int
    def __init__(self, logprobs: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., cache_length: _Optional[int] = ...) -> None: ...

class DraftRequest(_message.Message):
    __slots__ = ("session_id", "start", "tokens", "k", "sampling", "seed", "vocab_limit")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    VOCAB_LIMIT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    start: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    k: int
    sampling: _tensor_pb2.SamplingParams
    seed: int
    vocab_limit: int
    def __init__(self, session_id: _Optional[str] = ..., start: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ..., k: _Optional[int] = ..., sampling: _Optional[_Union[_tensor_pb2.SamplingParams, _Mapping]] = ..., seed: _Optional[int] = ..., vocab_limit: _Optional[int] = ...) -> None: ...

class DraftResponse(_message.Message):
    __slots__ = ("tokens", "logprobs", "cache_length")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    CACHE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _tensor_pb2.Tensor
    cache_length: int
    def __init__(self, tokens: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., cache_length: _Optional[int] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...
