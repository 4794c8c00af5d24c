from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.rpc import status_pb2 as _status_pb2
from seqserve.v1 import manifest_pb2 as _manifest_pb2
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
    FINISH_REASON_EOS: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_STOP_SEQUENCE: _ClassVar[FinishReason]
    FINISH_REASON_CANCELLED: _ClassVar[FinishReason]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_EOS: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_STOP_SEQUENCE: FinishReason
FINISH_REASON_CANCELLED: FinishReason

class DecodingOptions(_message.Message):
    __slots__ = ("strategy", "max_new_tokens", "min_new_tokens", "temperature", "top_k", "top_p", "seed", "beam_size", "length_penalty", "n_best", "early_stopping", "stop", "repetition_penalty", "no_repeat_ngram_size", "return_log_probs", "top_log_probs", "constraint")
    class Strategy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STRATEGY_UNSPECIFIED: _ClassVar[DecodingOptions.Strategy]
        STRATEGY_GREEDY: _ClassVar[DecodingOptions.Strategy]
        STRATEGY_SAMPLE: _ClassVar[DecodingOptions.Strategy]
        STRATEGY_BEAM: _ClassVar[DecodingOptions.Strategy]
    STRATEGY_UNSPECIFIED: DecodingOptions.Strategy
    STRATEGY_GREEDY: DecodingOptions.Strategy
    STRATEGY_SAMPLE: DecodingOptions.Strategy
    STRATEGY_BEAM: DecodingOptions.Strategy
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MIN_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    BEAM_SIZE_FIELD_NUMBER: _ClassVar[int]
    LENGTH_PENALTY_FIELD_NUMBER: _ClassVar[int]
    N_BEST_FIELD_NUMBER: _ClassVar[int]
    EARLY_STOPPING_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    NO_REPEAT_NGRAM_SIZE_FIELD_NUMBER: _ClassVar[int]
    RETURN_LOG_PROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOG_PROBS_FIELD_NUMBER: _ClassVar[int]
    CONSTRAINT_FIELD_NUMBER: _ClassVar[int]
    strategy: DecodingOptions.Strategy
    max_new_tokens: int
    min_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    beam_size: int
    length_penalty: float
    n_best: int
    early_stopping: bool
    stop: _containers.RepeatedScalarFieldContainer[str]
    repetition_penalty: float
    no_repeat_ngram_size: int
    return_log_probs: bool
    top_log_probs: int
    constraint: Constraint
    def __init__(self, strategy: _Optional[_Union[DecodingOptions.Strategy, str]] = ..., max_new_tokens: _Optional[int] = ..., min_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., beam_size: _Optional[int] = ..., length_penalty: _Optional[float] = ..., n_best: _Optional[int] = ..., early_stopping: bool = ..., stop: _Optional[_Iterable[str]] = ..., repetition_penalty: _Optional[float] = ..., no_repeat_ngram_size: _Optional[int] = ..., return_log_probs: bool = ..., top_log_probs: _Optional[int] = ..., constraint: _Optional[_Union[Constraint, _Mapping]] = ...) -> None: ...

class Constraint(_message.Message):
    __slots__ = ("regex", "choice", "json_schema", "grammar")
    REGEX_FIELD_NUMBER: _ClassVar[int]
    CHOICE_FIELD_NUMBER: _ClassVar[int]
    JSON_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_FIELD_NUMBER: _ClassVar[int]
    regex: str
    choice: ChoiceList
    json_schema: str
    grammar: str
    def __init__(self, regex: _Optional[str] = ..., choice: _Optional[_Union[ChoiceList, _Mapping]] = ..., json_schema: _Optional[str] = ..., grammar: _Optional[str] = ...) -> None: ...

class ChoiceList(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, values: _Optional[_Iterable[str]] = ...) -> None: ...

class TokenLogProb(_message.Message):
    __slots__ = ("token_id", "token", "log_prob")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOG_PROB_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    token: str
    log_prob: float
    def __init__(self, token_id: _Optional[int] = ..., token: _Optional[str] = ..., log_prob: _Optional[float] = ...) -> None: ...

class TopLogProbs(_message.Message):
    __slots__ = ("candidates",)
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    candidates: _containers.RepeatedCompositeFieldContainer[TokenLogProb]
    def __init__(self, candidates: _Optional[_Iterable[_Union[TokenLogProb, _Mapping]]] = ...) -> None: ...

class AttentionRow(_message.Message):
    __slots__ = ("weights",)
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    weights: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, weights: _Optional[_Iterable[float]] = ...) -> None: ...

class Hypothesis(_message.Message):
    __slots__ = ("text", "token_ids", "tokens", "score", "log_prob", "token_log_probs", "top_log_probs", "finish_reason", "attention")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    LOG_PROB_FIELD_NUMBER: _ClassVar[int]
    TOKEN_LOG_PROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOG_PROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    tokens: _containers.RepeatedScalarFieldContainer[str]
    score: float
    log_prob: float
    token_log_probs: _containers.RepeatedScalarFieldContainer[float]
    top_log_probs: _containers.RepeatedCompositeFieldContainer[TopLogProbs]
    finish_reason: FinishReason
    attention: _containers.RepeatedCompositeFieldContainer[AttentionRow]
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., tokens: _Optional[_Iterable[str]] = ..., score: _Optional[float] = ..., log_prob: _Optional[float] = ..., token_log_probs: _Optional[_Iterable[float]] = ..., top_log_probs: _Optional[_Iterable[_Union[TopLogProbs, _Mapping]]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., attention: _Optional[_Iterable[_Union[AttentionRow, _Mapping]]] = ...) -> None: ...

class TokenChunk(_message.Message):
    __slots__ = ("text", "token_ids", "tokens", "log_probs", "top_log_probs", "first_token_index")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOG_PROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOG_PROBS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_INDEX_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    tokens: _containers.RepeatedScalarFieldContainer[str]
    log_probs: _containers.RepeatedScalarFieldContainer[float]
    top_log_probs: _containers.RepeatedCompositeFieldContainer[TopLogProbs]
    first_token_index: int
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., tokens: _Optional[_Iterable[str]] = ..., log_probs: _Optional[_Iterable[float]] = ..., top_log_probs: _Optional[_Iterable[_Union[TopLogProbs, _Mapping]]] = ..., first_token_index: _Optional[int] = ...) -> None: ...

class TranslateRequest(_message.Message):
    __slots__ = ("model", "version", "sources", "options", "return_attention", "request_id", "priority")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    RETURN_ATTENTION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    sources: _containers.RepeatedScalarFieldContainer[str]
    options: DecodingOptions
    return_attention: bool
    request_id: str
    priority: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., sources: _Optional[_Iterable[str]] = ..., options: _Optional[_Union[DecodingOptions, _Mapping]] = ..., return_attention: bool = ..., request_id: _Optional[str] = ..., priority: _Optional[int] = ...) -> None: ...

class Translation(_message.Message):
    __slots__ = ("hypotheses", "source_tokens", "source_token_ids")
    HYPOTHESES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    hypotheses: _containers.RepeatedCompositeFieldContainer[Hypothesis]
    source_tokens: _containers.RepeatedScalarFieldContainer[str]
    source_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, hypotheses: _Optional[_Iterable[_Union[Hypothesis, _Mapping]]] = ..., source_tokens: _Optional[_Iterable[str]] = ..., source_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class TranslateResponse(_message.Message):
    __slots__ = ("model", "version", "translations")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TRANSLATIONS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    translations: _containers.RepeatedCompositeFieldContainer[Translation]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., translations: _Optional[_Iterable[_Union[Translation, _Mapping]]] = ...) -> None: ...

class TranslateStreamRequest(_message.Message):
    __slots__ = ("model", "version", "source", "options", "return_attention", "request_id", "priority")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    RETURN_ATTENTION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    source: str
    options: DecodingOptions
    return_attention: bool
    request_id: str
    priority: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., source: _Optional[str] = ..., options: _Optional[_Union[DecodingOptions, _Mapping]] = ..., return_attention: bool = ..., request_id: _Optional[str] = ..., priority: _Optional[int] = ...) -> None: ...

class TranslateStreamResponse(_message.Message):
    __slots__ = ("chunk", "done")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    chunk: TokenChunk
    done: TranslateStreamDone
    def __init__(self, chunk: _Optional[_Union[TokenChunk, _Mapping]] = ..., done: _Optional[_Union[TranslateStreamDone, _Mapping]] = ...) -> None: ...

class TranslateStreamDone(_message.Message):
    __slots__ = ("model", "version", "finish_reason", "translation")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TRANSLATION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    finish_reason: FinishReason
    translation: Translation
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., translation: _Optional[_Union[Translation, _Mapping]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("model", "version", "prompt", "options", "request_id", "priority")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    prompt: str
    options: DecodingOptions
    request_id: str
    priority: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., prompt: _Optional[str] = ..., options: _Optional[_Union[DecodingOptions, _Mapping]] = ..., request_id: _Optional[str] = ..., priority: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("chunk", "done")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    chunk: TokenChunk
    done: GenerationDone
    def __init__(self, chunk: _Optional[_Union[TokenChunk, _Mapping]] = ..., done: _Optional[_Union[GenerationDone, _Mapping]] = ...) -> None: ...

class GenerationDone(_message.Message):
    __slots__ = ("finish_reason", "prompt_tokens", "generated_tokens", "text", "matched_stop", "log_prob", "model", "version", "session_tokens_consumed", "seed")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MATCHED_STOP_FIELD_NUMBER: _ClassVar[int]
    LOG_PROB_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKENS_CONSUMED_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    finish_reason: FinishReason
    prompt_tokens: int
    generated_tokens: int
    text: str
    matched_stop: str
    log_prob: float
    model: str
    version: int
    session_tokens_consumed: int
    seed: int
    def __init__(self, finish_reason: _Optional[_Union[FinishReason, str]] = ..., prompt_tokens: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., text: _Optional[str] = ..., matched_stop: _Optional[str] = ..., log_prob: _Optional[float] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., session_tokens_consumed: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("model", "version", "prefix", "ttl_seconds")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    prefix: str
    ttl_seconds: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., prefix: _Optional[str] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class Session(_message.Message):
    __slots__ = ("session_id", "model", "version", "tokens_consumed", "created_at", "last_used_at", "expires_at", "age_seconds", "idle_seconds", "ttl_seconds", "state_bytes", "generating")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_CONSUMED_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    IDLE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    GENERATING_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    model: str
    version: int
    tokens_consumed: int
    created_at: _timestamp_pb2.Timestamp
    last_used_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    age_seconds: float
    idle_seconds: float
    ttl_seconds: int
    state_bytes: int
    generating: bool
    def __init__(self, session_id: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., tokens_consumed: _Optional[int] = ..., created_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., last_used_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., age_seconds: _Optional[float] = ..., idle_seconds: _Optional[float] = ..., ttl_seconds: _Optional[int] = ..., state_bytes: _Optional[int] = ..., generating: bool = ...) -> None: ...

class FeedRequest(_message.Message):
    __slots__ = ("session_id", "text", "return_log_probs", "request_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    RETURN_LOG_PROBS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    text: str
    return_log_probs: bool
    request_id: str
    def __init__(self, session_id: _Optional[str] = ..., text: _Optional[str] = ..., return_log_probs: bool = ..., request_id: _Optional[str] = ...) -> None: ...

class FeedResponse(_message.Message):
    __slots__ = ("tokens_fed", "tokens_consumed", "token_log_probs")
    TOKENS_FED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_CONSUMED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_LOG_PROBS_FIELD_NUMBER: _ClassVar[int]
    tokens_fed: int
    tokens_consumed: int
    token_log_probs: _containers.RepeatedCompositeFieldContainer[TokenLogProb]
    def __init__(self, tokens_fed: _Optional[int] = ..., tokens_consumed: _Optional[int] = ..., token_log_probs: _Optional[_Iterable[_Union[TokenLogProb, _Mapping]]] = ...) -> None: ...

class GenerateInSessionRequest(_message.Message):
    __slots__ = ("session_id", "options", "leave_session_unchanged", "request_id", "priority")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    LEAVE_SESSION_UNCHANGED_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    options: DecodingOptions
    leave_session_unchanged: bool
    request_id: str
    priority: int
    def __init__(self, session_id: _Optional[str] = ..., options: _Optional[_Union[DecodingOptions, _Mapping]] = ..., leave_session_unchanged: bool = ..., request_id: _Optional[str] = ..., priority: _Optional[int] = ...) -> None: ...

class ForkSessionRequest(_message.Message):
    __slots__ = ("session_id", "ttl_seconds")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    ttl_seconds: int
    def __init__(self, session_id: _Optional[str] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: Session
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class ExportSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ExportSessionResponse(_message.Message):
    __slots__ = ("data", "session")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    session: Session
    def __init__(self, data: _Optional[bytes] = ..., session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class ImportSessionRequest(_message.Message):
    __slots__ = ("data", "ttl_seconds")
    DATA_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    ttl_seconds: int
    def __init__(self, data: _Optional[bytes] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class ConverseRequest(_message.Message):
    __slots__ = ("request_tag", "create_session", "feed", "generate", "fork", "get", "close")
    REQUEST_TAG_FIELD_NUMBER: _ClassVar[int]
    CREATE_SESSION_FIELD_NUMBER: _ClassVar[int]
    FEED_FIELD_NUMBER: _ClassVar[int]
    GENERATE_FIELD_NUMBER: _ClassVar[int]
    FORK_FIELD_NUMBER: _ClassVar[int]
    GET_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    request_tag: str
    create_session: CreateSessionRequest
    feed: FeedRequest
    generate: GenerateInSessionRequest
    fork: ForkSessionRequest
    get: GetSessionRequest
    close: CloseSessionRequest
    def __init__(self, request_tag: _Optional[str] = ..., create_session: _Optional[_Union[CreateSessionRequest, _Mapping]] = ..., feed: _Optional[_Union[FeedRequest, _Mapping]] = ..., generate: _Optional[_Union[GenerateInSessionRequest, _Mapping]] = ..., fork: _Optional[_Union[ForkSessionRequest, _Mapping]] = ..., get: _Optional[_Union[GetSessionRequest, _Mapping]] = ..., close: _Optional[_Union[CloseSessionRequest, _Mapping]] = ...) -> None: ...

class ConverseResponse(_message.Message):
    __slots__ = ("request_tag", "create_session", "feed", "generate", "fork", "get", "close", "error")
    REQUEST_TAG_FIELD_NUMBER: _ClassVar[int]
    CREATE_SESSION_FIELD_NUMBER: _ClassVar[int]
    FEED_FIELD_NUMBER: _ClassVar[int]
    GENERATE_FIELD_NUMBER: _ClassVar[int]
    FORK_FIELD_NUMBER: _ClassVar[int]
    GET_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_tag: str
    create_session: Session
    feed: FeedResponse
    generate: GenerateResponse
    fork: Session
    get: Session
    close: CloseSessionResponse
    error: _status_pb2.Status
    def __init__(self, request_tag: _Optional[str] = ..., create_session: _Optional[_Union[Session, _Mapping]] = ..., feed: _Optional[_Union[FeedResponse, _Mapping]] = ..., generate: _Optional[_Union[GenerateResponse, _Mapping]] = ..., fork: _Optional[_Union[Session, _Mapping]] = ..., get: _Optional[_Union[Session, _Mapping]] = ..., close: _Optional[_Union[CloseSessionResponse, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelSummary(_message.Message):
    __slots__ = ("name", "versions", "latest_version", "kind", "ready")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    LATEST_VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    name: str
    versions: _containers.RepeatedScalarFieldContainer[int]
    latest_version: int
    kind: _manifest_pb2.ModelKind
    ready: bool
    def __init__(self, name: _Optional[str] = ..., versions: _Optional[_Iterable[int]] = ..., latest_version: _Optional[int] = ..., kind: _Optional[_Union[_manifest_pb2.ModelKind, str]] = ..., ready: bool = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelSummary]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelSummary, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "manifest", "providers", "requested_providers", "variant", "ready")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    manifest: _manifest_pb2.Manifest
    providers: _containers.RepeatedScalarFieldContainer[str]
    requested_providers: _containers.RepeatedScalarFieldContainer[str]
    variant: str
    ready: bool
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., manifest: _Optional[_Union[_manifest_pb2.Manifest, _Mapping]] = ..., providers: _Optional[_Iterable[str]] = ..., requested_providers: _Optional[_Iterable[str]] = ..., variant: _Optional[str] = ..., ready: bool = ...) -> None: ...
