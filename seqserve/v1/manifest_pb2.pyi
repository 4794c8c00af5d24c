from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_KIND_UNSPECIFIED: _ClassVar[ModelKind]
    MODEL_KIND_LM: _ClassVar[ModelKind]
    MODEL_KIND_SEQ2SEQ: _ClassVar[ModelKind]
MODEL_KIND_UNSPECIFIED: ModelKind
MODEL_KIND_LM: ModelKind
MODEL_KIND_SEQ2SEQ: ModelKind

class Manifest(_message.Message):
    __slots__ = ("schema_version", "name", "version", "kind", "cell", "sizes", "special_tokens", "tokenizers", "graphs", "opset", "onnxruntime_version", "torch_version", "parity", "metrics", "sha256", "created_at", "training")
    class TokenizersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class Sha256Entry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class TrainingEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CELL_FIELD_NUMBER: _ClassVar[int]
    SIZES_FIELD_NUMBER: _ClassVar[int]
    SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZERS_FIELD_NUMBER: _ClassVar[int]
    GRAPHS_FIELD_NUMBER: _ClassVar[int]
    OPSET_FIELD_NUMBER: _ClassVar[int]
    ONNXRUNTIME_VERSION_FIELD_NUMBER: _ClassVar[int]
    TORCH_VERSION_FIELD_NUMBER: _ClassVar[int]
    PARITY_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    name: str
    version: int
    kind: ModelKind
    cell: str
    sizes: ModelSizes
    special_tokens: SpecialTokens
    tokenizers: _containers.ScalarMap[str, str]
    graphs: _containers.RepeatedCompositeFieldContainer[Graph]
    opset: int
    onnxruntime_version: str
    torch_version: str
    parity: _containers.RepeatedCompositeFieldContainer[ParityReport]
    metrics: _containers.ScalarMap[str, float]
    sha256: _containers.ScalarMap[str, str]
    created_at: _timestamp_pb2.Timestamp
    training: _containers.ScalarMap[str, str]
    def __init__(self, schema_version: _Optional[int] = ..., name: _Optional[str] = ..., version: _Optional[int] = ..., kind: _Optional[_Union[ModelKind, str]] = ..., cell: _Optional[str] = ..., sizes: _Optional[_Union[ModelSizes, _Mapping]] = ..., special_tokens: _Optional[_Union[SpecialTokens, _Mapping]] = ..., tokenizers: _Optional[_Mapping[str, str]] = ..., graphs: _Optional[_Iterable[_Union[Graph, _Mapping]]] = ..., opset: _Optional[int] = ..., onnxruntime_version: _Optional[str] = ..., torch_version: _Optional[str] = ..., parity: _Optional[_Iterable[_Union[ParityReport, _Mapping]]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., sha256: _Optional[_Mapping[str, str]] = ..., created_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., training: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ModelSizes(_message.Message):
    __slots__ = ("embedding_size", "hidden_size", "num_layers", "vocab_size", "source_vocab_size", "encoder_hidden_size", "encoder_layers", "bidirectional_encoder", "attention", "input_feeding", "tie_weights")
    EMBEDDING_SIZE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    ENCODER_HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    ENCODER_LAYERS_FIELD_NUMBER: _ClassVar[int]
    BIDIRECTIONAL_ENCODER_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    INPUT_FEEDING_FIELD_NUMBER: _ClassVar[int]
    TIE_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    embedding_size: int
    hidden_size: int
    num_layers: int
    vocab_size: int
    source_vocab_size: int
    encoder_hidden_size: int
    encoder_layers: int
    bidirectional_encoder: bool
    attention: str
    input_feeding: bool
    tie_weights: bool
    def __init__(self, embedding_size: _Optional[int] = ..., hidden_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., vocab_size: _Optional[int] = ..., source_vocab_size: _Optional[int] = ..., encoder_hidden_size: _Optional[int] = ..., encoder_layers: _Optional[int] = ..., bidirectional_encoder: bool = ..., attention: _Optional[str] = ..., input_feeding: bool = ..., tie_weights: bool = ...) -> None: ...

class SpecialTokens(_message.Message):
    __slots__ = ("pad_id", "bos_id", "eos_id", "unk_id")
    PAD_ID_FIELD_NUMBER: _ClassVar[int]
    BOS_ID_FIELD_NUMBER: _ClassVar[int]
    EOS_ID_FIELD_NUMBER: _ClassVar[int]
    UNK_ID_FIELD_NUMBER: _ClassVar[int]
    pad_id: int
    bos_id: int
    eos_id: int
    unk_id: int
    def __init__(self, pad_id: _Optional[int] = ..., bos_id: _Optional[int] = ..., eos_id: _Optional[int] = ..., unk_id: _Optional[int] = ...) -> None: ...

class Graph(_message.Message):
    __slots__ = ("role", "variant", "file", "inputs", "outputs", "state_inputs", "state_outputs")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    STATE_INPUTS_FIELD_NUMBER: _ClassVar[int]
    STATE_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    role: str
    variant: str
    file: str
    inputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    outputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    state_inputs: _containers.RepeatedScalarFieldContainer[str]
    state_outputs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, role: _Optional[str] = ..., variant: _Optional[str] = ..., file: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., state_inputs: _Optional[_Iterable[str]] = ..., state_outputs: _Optional[_Iterable[str]] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[str]] = ...) -> None: ...

class ParityReport(_message.Message):
    __slots__ = ("variant", "max_abs_diff_log_probs", "max_abs_diff_state", "cases", "greedy_checked", "greedy_matched", "beam_checked", "beam_matched", "providers", "passed", "quality_delta", "thresholds")
    class QualityDeltaEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class ThresholdsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_DIFF_LOG_PROBS_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_DIFF_STATE_FIELD_NUMBER: _ClassVar[int]
    CASES_FIELD_NUMBER: _ClassVar[int]
    GREEDY_CHECKED_FIELD_NUMBER: _ClassVar[int]
    GREEDY_MATCHED_FIELD_NUMBER: _ClassVar[int]
    BEAM_CHECKED_FIELD_NUMBER: _ClassVar[int]
    BEAM_MATCHED_FIELD_NUMBER: _ClassVar[int]
    PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    QUALITY_DELTA_FIELD_NUMBER: _ClassVar[int]
    THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    variant: str
    max_abs_diff_log_probs: float
    max_abs_diff_state: float
    cases: _containers.RepeatedScalarFieldContainer[str]
    greedy_checked: int
    greedy_matched: int
    beam_checked: int
    beam_matched: int
    providers: _containers.RepeatedScalarFieldContainer[str]
    passed: bool
    quality_delta: _containers.ScalarMap[str, float]
    thresholds: _containers.ScalarMap[str, float]
    def __init__(self, variant: _Optional[str] = ..., max_abs_diff_log_probs: _Optional[float] = ..., max_abs_diff_state: _Optional[float] = ..., cases: _Optional[_Iterable[str]] = ..., greedy_checked: _Optional[int] = ..., greedy_matched: _Optional[int] = ..., beam_checked: _Optional[int] = ..., beam_matched: _Optional[int] = ..., providers: _Optional[_Iterable[str]] = ..., passed: bool = ..., quality_delta: _Optional[_Mapping[str, float]] = ..., thresholds: _Optional[_Mapping[str, float]] = ...) -> None: ...
