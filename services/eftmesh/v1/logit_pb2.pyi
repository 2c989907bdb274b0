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
    __slots__ = ("model_id", "role", "vocab_size", "tokenizer_vocab_size", "tokenizer_fingerprint", "max_context", "dtype", "device", "max_sessions", "session_idle_timeout_s", "eos_token_id", "max_k", "kv_cache_tokens", "kv_block_size", "max_batch", "kv_bytes_per_token", "kv_bytes_per_token_theoretical", "chat_template", "execution", "cuda_graphs", "graph_capture_s", "prefix_cache", "compile_s", "graph_memory_bytes", "model_impl", "kv_cache_dtype", "batch_release", "release_many")
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
    MAX_K_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_PER_TOKEN_THEORETICAL_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_FIELD_NUMBER: _ClassVar[int]
    CUDA_GRAPHS_FIELD_NUMBER: _ClassVar[int]
    GRAPH_CAPTURE_S_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_FIELD_NUMBER: _ClassVar[int]
    COMPILE_S_FIELD_NUMBER: _ClassVar[int]
    GRAPH_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MODEL_IMPL_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    BATCH_RELEASE_FIELD_NUMBER: _ClassVar[int]
    RELEASE_MANY_FIELD_NUMBER: _ClassVar[int]
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
    max_k: int
    kv_cache_tokens: int
    kv_block_size: int
    max_batch: int
    kv_bytes_per_token: float
    kv_bytes_per_token_theoretical: float
    chat_template: str
    execution: str
    cuda_graphs: int
    graph_capture_s: float
    prefix_cache: bool
    compile_s: float
    graph_memory_bytes: int
    model_impl: str
    kv_cache_dtype: str
    batch_release: bool
    release_many: bool
    def __init__(self, model_id: _Optional[str] = ..., role: _Optional[str] = ..., vocab_size: _Optional[int] = ..., tokenizer_vocab_size: _Optional[int] = ..., tokenizer_fingerprint: _Optional[str] = ..., max_context: _Optional[int] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., max_sessions: _Optional[int] = ..., session_idle_timeout_s: _Optional[float] = ..., eos_token_id: _Optional[int] = ..., max_k: _Optional[int] = ..., kv_cache_tokens: _Optional[int] = ..., kv_block_size: _Optional[int] = ..., max_batch: _Optional[int] = ..., kv_bytes_per_token: _Optional[float] = ..., kv_bytes_per_token_theoretical: _Optional[float] = ..., chat_template: _Optional[str] = ..., execution: _Optional[str] = ..., cuda_graphs: _Optional[int] = ..., graph_capture_s: _Optional[float] = ..., prefix_cache: _Optional[bool] = ..., compile_s: _Optional[float] = ..., graph_memory_bytes: _Optional[int] = ..., model_impl: _Optional[str] = ..., kv_cache_dtype: _Optional[str] = ..., batch_release: _Optional[bool] = ..., release_many: _Optional[bool] = ...) -> None: ...

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
    __slots__ = ("session_id", "session_ids")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_IDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    session_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, session_id: _Optional[str] = ..., session_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...

class ScoreItem(_message.Message):
    __slots__ = ("session_id", "start", "tokens", "rows")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    start: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    rows: int
    def __init__(self, session_id: _Optional[str] = ..., start: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ..., rows: _Optional[int] = ...) -> None: ...

class ScoreBatchRequest(_message.Message):
    __slots__ = ("items", "release")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoreItem]
    release: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, items: _Optional[_Iterable[_Union[ScoreItem, _Mapping]]] = ..., release: _Optional[_Iterable[str]] = ...) -> None: ...

class ItemResult(_message.Message):
    __slots__ = ("code", "message", "rows", "cache_length", "drafts", "cached_tokens", "draft_probs", "draft_cut_z", "draft_cut_mass")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    CACHE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    DRAFTS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_PROBS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_CUT_Z_FIELD_NUMBER: _ClassVar[int]
    DRAFT_CUT_MASS_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    rows: int
    cache_length: int
    drafts: _containers.RepeatedScalarFieldContainer[int]
    cached_tokens: int
    draft_probs: _containers.RepeatedScalarFieldContainer[float]
    draft_cut_z: _containers.RepeatedScalarFieldContainer[float]
    draft_cut_mass: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., rows: _Optional[int] = ..., cache_length: _Optional[int] = ..., drafts: _Optional[_Iterable[int]] = ..., cached_tokens: _Optional[int] = ..., draft_probs: _Optional[_Iterable[float]] = ..., draft_cut_z: _Optional[_Iterable[float]] = ..., draft_cut_mass: _Optional[_Iterable[float]] = ...) -> None: ...

class ScoreBatchResponse(_message.Message):
    __slots__ = ("logits", "results", "floored")
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    FLOORED_FIELD_NUMBER: _ClassVar[int]
    logits: _tensor_pb2.Tensor
    results: _containers.RepeatedCompositeFieldContainer[ItemResult]
    floored: bool
    def __init__(self, logits: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., results: _Optional[_Iterable[_Union[ItemResult, _Mapping]]] = ..., floored: _Optional[bool] = ...) -> None: ...

class DraftItem(_message.Message):
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

class DraftBatchRequest(_message.Message):
    __slots__ = ("items", "release")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[DraftItem]
    release: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, items: _Optional[_Iterable[_Union[DraftItem, _Mapping]]] = ..., release: _Optional[_Iterable[str]] = ...) -> None: ...

class DraftBatchResponse(_message.Message):
    __slots__ = ("logits", "results", "floored")
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    FLOORED_FIELD_NUMBER: _ClassVar[int]
    logits: _tensor_pb2.Tensor
    results: _containers.RepeatedCompositeFieldContainer[ItemResult]
    floored: bool
    def __init__(self, logits: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., results: _Optional[_Iterable[_Union[ItemResult, _Mapping]]] = ..., floored: _Optional[bool] = ...) -> None: ...
