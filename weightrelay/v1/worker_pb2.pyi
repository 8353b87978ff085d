from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT64: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    INT32: _ClassVar[DType]
    INT64: _ClassVar[DType]
    UINT8: _ClassVar[DType]
    INT8: _ClassVar[DType]
    BOOL: _ClassVar[DType]

class Activation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACTIVATION_NONE: _ClassVar[Activation]
    ACTIVATION_RELU: _ClassVar[Activation]
    ACTIVATION_TANH: _ClassVar[Activation]
    ACTIVATION_SIGMOID: _ClassVar[Activation]
    ACTIVATION_GELU: _ClassVar[Activation]
    ACTIVATION_GELU_TANH: _ClassVar[Activation]

class Padding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PADDING_VALID: _ClassVar[Padding]
    PADDING_SAME: _ClassVar[Padding]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT64: DType
FLOAT16: DType
BFLOAT16: DType
INT32: DType
INT64: DType
UINT8: DType
INT8: DType
BOOL: DType
ACTIVATION_NONE: Activation
ACTIVATION_RELU: Activation
ACTIVATION_TANH: Activation
ACTIVATION_SIGMOID: Activation
ACTIVATION_GELU: Activation
ACTIVATION_GELU_TANH: Activation
PADDING_VALID: Padding
PADDING_SAME: Padding

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape", "buffer")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    BUFFER_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    buffer: bool
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., buffer: _Optional[bool] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("name", "dtype", "shape", "data", "transposed")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TRANSPOSED_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    transposed: bool
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., transposed: _Optional[bool] = ...) -> None: ...

class WeightsChunk(_message.Message):
    __slots__ = ("piece", "digest", "pieces", "data_channel")
    PIECE_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    PIECES_FIELD_NUMBER: _ClassVar[int]
    DATA_CHANNEL_FIELD_NUMBER: _ClassVar[int]
    piece: TensorPiece
    digest: WeightsDigest
    pieces: _containers.RepeatedCompositeFieldContainer[TensorPiece]
    data_channel: DataChannelOffer
    def __init__(self, piece: _Optional[_Union[TensorPiece, _Mapping]] = ..., digest: _Optional[_Union[WeightsDigest, _Mapping]] = ..., pieces: _Optional[_Iterable[_Union[TensorPiece, _Mapping]]] = ..., data_channel: _Optional[_Union[DataChannelOffer, _Mapping]] = ...) -> None: ...

class DataChannelOffer(_message.Message):
    __slots__ = ("port", "ticket")
    PORT_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    port: int
    ticket: bytes
    def __init__(self, port: _Optional[int] = ..., ticket: _Optional[bytes] = ...) -> None: ...

class TensorPiece(_message.Message):
    __slots__ = ("tensor", "offset")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    tensor: Tensor
    offset: int
    def __init__(self, tensor: _Optional[_Union[Tensor, _Mapping]] = ..., offset: _Optional[int] = ...) -> None: ...

class WeightsDigest(_message.Message):
    __slots__ = ("tensor_count", "total_bytes", "sha256", "stream_sha256")
    TENSOR_COUNT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    STREAM_SHA256_FIELD_NUMBER: _ClassVar[int]
    tensor_count: int
    total_bytes: int
    sha256: str
    stream_sha256: str
    def __init__(self, tensor_count: _Optional[int] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., stream_sha256: _Optional[str] = ...) -> None: ...

class GetWeightsRequest(_message.Message):
    __slots__ = ("max_chunk_bytes", "pack_pieces", "transposed", "data_channel")
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    PACK_PIECES_FIELD_NUMBER: _ClassVar[int]
    TRANSPOSED_FIELD_NUMBER: _ClassVar[int]
    DATA_CHANNEL_FIELD_NUMBER: _ClassVar[int]
    max_chunk_bytes: int
    pack_pieces: bool
    transposed: _containers.RepeatedScalarFieldContainer[str]
    data_channel: bool
    def __init__(self, max_chunk_bytes: _Optional[int] = ..., pack_pieces: _Optional[bool] = ..., transposed: _Optional[_Iterable[str]] = ..., data_channel: _Optional[bool] = ...) -> None: ...

class PullWeightsRequest(_message.Message):
    __slots__ = ("address", "max_chunk_bytes", "expected_sha256")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_SHA256_FIELD_NUMBER: _ClassVar[int]
    address: str
    max_chunk_bytes: int
    expected_sha256: str
    def __init__(self, address: _Optional[str] = ..., max_chunk_bytes: _Optional[int] = ..., expected_sha256: _Optional[str] = ...) -> None: ...

class SetWeightsReply(_message.Message):
    __slots__ = ("tensor_count", "total_bytes", "sha256")
    TENSOR_COUNT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    tensor_count: int
    total_bytes: int
    sha256: str
    def __init__(self, tensor_count: _Optional[int] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class DenseLayer(_message.Message):
    __slots__ = ("units", "activation")
    UNITS_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    units: int
    activation: Activation
    def __init__(self, units: _Optional[int] = ..., activation: _Optional[_Union[Activation, str]] = ...) -> None: ...

class Conv2DLayer(_message.Message):
    __slots__ = ("filters", "kernel", "stride", "padding", "activation")
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    KERNEL_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    PADDING_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    filters: int
    kernel: int
    stride: int
    padding: Padding
    activation: Activation
    def __init__(self, filters: _Optional[int] = ..., kernel: _Optional[int] = ..., stride: _Optional[int] = ..., padding: _Optional[_Union[Padding, str]] = ..., activation: _Optional[_Union[Activation, str]] = ...) -> None: ...

class MaxPool2DLayer(_message.Message):
    __slots__ = ("size", "stride")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    size: int
    stride: int
    def __init__(self, size: _Optional[int] = ..., stride: _Optional[int] = ...) -> None: ...

class FlattenLayer(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BatchNormLayer(_message.Message):
    __slots__ = ("eps", "momentum", "activation")
    EPS_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    eps: float
    momentum: float
    activation: Activation
    def __init__(self, eps: _Optional[float] = ..., momentum: _Optional[float] = ..., activation: _Optional[_Union[Activation, str]] = ...) -> None: ...

class DropoutLayer(_message.Message):
    __slots__ = ("rate",)
    RATE_FIELD_NUMBER: _ClassVar[int]
    rate: float
    def __init__(self, rate: _Optional[float] = ...) -> None: ...

class AddLayer(_message.Message):
    __slots__ = ("activation",)
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    activation: Activation
    def __init__(self, activation: _Optional[_Union[Activation, str]] = ...) -> None: ...

class AvgPool2DLayer(_message.Message):
    __slots__ = ("size", "stride")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    size: int
    stride: int
    def __init__(self, size: _Optional[int] = ..., stride: _Optional[int] = ...) -> None: ...

class GlobalAvgPool2DLayer(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LayerNormLayer(_message.Message):
    __slots__ = ("eps",)
    EPS_FIELD_NUMBER: _ClassVar[int]
    eps: float
    def __init__(self, eps: _Optional[float] = ...) -> None: ...

class TokensLayer(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PositionEmbeddingLayer(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MultiHeadAttentionLayer(_message.Message):
    __slots__ = ("heads",)
    HEADS_FIELD_NUMBER: _ClassVar[int]
    heads: int
    def __init__(self, heads: _Optional[int] = ...) -> None: ...

class TokenMeanLayer(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LayerSpec(_message.Message):
    __slots__ = ("name", "dense", "conv2d", "maxpool2d", "flatten", "batchnorm", "dropout", "add", "avgpool2d", "global_avgpool2d", "layernorm", "tokens", "position_embedding", "multihead_attention", "token_mean", "inputs")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DENSE_FIELD_NUMBER: _ClassVar[int]
    CONV2D_FIELD_NUMBER: _ClassVar[int]
    MAXPOOL2D_FIELD_NUMBER: _ClassVar[int]
    FLATTEN_FIELD_NUMBER: _ClassVar[int]
    BATCHNORM_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_FIELD_NUMBER: _ClassVar[int]
    ADD_FIELD_NUMBER: _ClassVar[int]
    AVGPOOL2D_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_AVGPOOL2D_FIELD_NUMBER: _ClassVar[int]
    LAYERNORM_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    POSITION_EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    MULTIHEAD_ATTENTION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_MEAN_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    dense: DenseLayer
    conv2d: Conv2DLayer
    maxpool2d: MaxPool2DLayer
    flatten: FlattenLayer
    batchnorm: BatchNormLayer
    dropout: DropoutLayer
    add: AddLayer
    avgpool2d: AvgPool2DLayer
    global_avgpool2d: GlobalAvgPool2DLayer
    layernorm: LayerNormLayer
    tokens: TokensLayer
    position_embedding: PositionEmbeddingLayer
    multihead_attention: MultiHeadAttentionLayer
    token_mean: TokenMeanLayer
    inputs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., dense: _Optional[_Union[DenseLayer, _Mapping]] = ..., conv2d: _Optional[_Union[Conv2DLayer, _Mapping]] = ..., maxpool2d: _Optional[_Union[MaxPool2DLayer, _Mapping]] = ..., flatten: _Optional[_Union[FlattenLayer, _Mapping]] = ..., batchnorm: _Optional[_Union[BatchNormLayer, _Mapping]] = ..., dropout: _Optional[_Union[DropoutLayer, _Mapping]] = ..., add: _Optional[_Union[AddLayer, _Mapping]] = ..., avgpool2d: _Optional[_Union[AvgPool2DLayer, _Mapping]] = ..., global_avgpool2d: _Optional[_Union[GlobalAvgPool2DLayer, _Mapping]] = ..., layernorm: _Optional[_Union[LayerNormLayer, _Mapping]] = ..., tokens: _Optional[_Union[TokensLayer, _Mapping]] = ..., position_embedding: _Optional[_Union[PositionEmbeddingLayer, _Mapping]] = ..., multihead_attention: _Optional[_Union[MultiHeadAttentionLayer, _Mapping]] = ..., token_mean: _Optional[_Union[TokenMeanLayer, _Mapping]] = ..., inputs: _Optional[_Iterable[str]] = ...) -> None: ...

class ModelSpec(_message.Message):
    __slots__ = ("name", "layers")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    layers: _containers.RepeatedCompositeFieldContainer[LayerSpec]
    def __init__(self, name: _Optional[str] = ..., layers: _Optional[_Iterable[_Union[LayerSpec, _Mapping]]] = ...) -> None: ...

class InitializeRequest(_message.Message):
    __slots__ = ("model", "seed", "dataset", "objective", "lease")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    model: ModelSpec
    seed: int
    dataset: str
    objective: str
    lease: LeaseRequest
    def __init__(self, model: _Optional[_Union[ModelSpec, _Mapping]] = ..., seed: _Optional[int] = ..., dataset: _Optional[str] = ..., objective: _Optional[str] = ..., lease: _Optional[_Union[LeaseRequest, _Mapping]] = ...) -> None: ...

class LeaseRequest(_message.Message):
    __slots__ = ("run_id", "holder", "seconds")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    holder: str
    seconds: int
    def __init__(self, run_id: _Optional[str] = ..., holder: _Optional[str] = ..., seconds: _Optional[int] = ...) -> None: ...

class Lease(_message.Message):
    __slots__ = ("lease_id", "run_id", "holder", "seconds", "expires_unix")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    run_id: str
    holder: str
    seconds: int
    expires_unix: float
    def __init__(self, lease_id: _Optional[str] = ..., run_id: _Optional[str] = ..., holder: _Optional[str] = ..., seconds: _Optional[int] = ..., expires_unix: _Optional[float] = ...) -> None: ...

class RenewLeaseRequest(_message.Message):
    __slots__ = ("lease_id", "seconds")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    seconds: int
    def __init__(self, lease_id: _Optional[str] = ..., seconds: _Optional[int] = ...) -> None: ...

class ReleaseLeaseRequest(_message.Message):
    __slots__ = ("lease_id", "force")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    force: bool
    def __init__(self, lease_id: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class ReleaseLeaseReply(_message.Message):
    __slots__ = ("released", "lease")
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    released: bool
    lease: Lease
    def __init__(self, released: _Optional[bool] = ..., lease: _Optional[_Union[Lease, _Mapping]] = ...) -> None: ...

class InitializeReply(_message.Message):
    __slots__ = ("parameters", "weights_sha256", "model", "architecture", "dataset", "parameter_count", "objective", "lease")
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_COUNT_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    parameters: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    weights_sha256: str
    model: ModelSpec
    architecture: str
    dataset: DatasetInfo
    parameter_count: int
    objective: str
    lease: Lease
    def __init__(self, parameters: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., weights_sha256: _Optional[str] = ..., model: _Optional[_Union[ModelSpec, _Mapping]] = ..., architecture: _Optional[str] = ..., dataset: _Optional[_Union[DatasetInfo, _Mapping]] = ..., parameter_count: _Optional[int] = ..., objective: _Optional[str] = ..., lease: _Optional[_Union[Lease, _Mapping]] = ...) -> None: ...

class TrainRequest(_message.Message):
    __slots__ = ("epochs", "batch_size", "learning_rate", "momentum", "seed", "objective", "max_samples", "progress_every_batches", "start_step", "max_steps", "keep_optimizer")
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    MAX_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_EVERY_BATCHES_FIELD_NUMBER: _ClassVar[int]
    START_STEP_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    KEEP_OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    epochs: int
    batch_size: int
    learning_rate: float
    momentum: float
    seed: int
    objective: str
    max_samples: int
    progress_every_batches: int
    start_step: int
    max_steps: int
    keep_optimizer: bool
    def __init__(self, epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., learning_rate: _Optional[float] = ..., momentum: _Optional[float] = ..., seed: _Optional[int] = ..., objective: _Optional[str] = ..., max_samples: _Optional[int] = ..., progress_every_batches: _Optional[int] = ..., start_step: _Optional[int] = ..., max_steps: _Optional[int] = ..., keep_optimizer: _Optional[bool] = ...) -> None: ...

class TrainProgress(_message.Message):
    __slots__ = ("epoch", "epochs", "batch", "batches", "loss", "accuracy", "samples_per_second", "epoch_end")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    EPOCH_END_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    epochs: int
    batch: int
    batches: int
    loss: float
    accuracy: float
    samples_per_second: float
    epoch_end: bool
    def __init__(self, epoch: _Optional[int] = ..., epochs: _Optional[int] = ..., batch: _Optional[int] = ..., batches: _Optional[int] = ..., loss: _Optional[float] = ..., accuracy: _Optional[float] = ..., samples_per_second: _Optional[float] = ..., epoch_end: _Optional[bool] = ...) -> None: ...

class TrainSummary(_message.Message):
    __slots__ = ("epochs", "samples_seen", "loss", "accuracy", "seconds", "objective", "weights_sha256")
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_SEEN_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    epochs: int
    samples_seen: int
    loss: float
    accuracy: float
    seconds: float
    objective: str
    weights_sha256: str
    def __init__(self, epochs: _Optional[int] = ..., samples_seen: _Optional[int] = ..., loss: _Optional[float] = ..., accuracy: _Optional[float] = ..., seconds: _Optional[float] = ..., objective: _Optional[str] = ..., weights_sha256: _Optional[str] = ...) -> None: ...

class TrainEvent(_message.Message):
    __slots__ = ("progress", "summary")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    progress: TrainProgress
    summary: TrainSummary
    def __init__(self, progress: _Optional[_Union[TrainProgress, _Mapping]] = ..., summary: _Optional[_Union[TrainSummary, _Mapping]] = ...) -> None: ...

class EvaluateRequest(_message.Message):
    __slots__ = ("include_predictions", "include_probabilities", "batch_size")
    INCLUDE_PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    include_predictions: bool
    include_probabilities: bool
    batch_size: int
    def __init__(self, include_predictions: _Optional[bool] = ..., include_probabilities: _Optional[bool] = ..., batch_size: _Optional[int] = ...) -> None: ...

class ConfusionRow(_message.Message):
    __slots__ = ("counts",)
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, counts: _Optional[_Iterable[int]] = ...) -> None: ...

class ClassMetrics(_message.Message):
    __slots__ = ("label", "precision", "recall", "f1", "support")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    RECALL_FIELD_NUMBER: _ClassVar[int]
    F1_FIELD_NUMBER: _ClassVar[int]
    SUPPORT_FIELD_NUMBER: _ClassVar[int]
    label: int
    precision: float
    recall: float
    f1: float
    support: int
    def __init__(self, label: _Optional[int] = ..., precision: _Optional[float] = ..., recall: _Optional[float] = ..., f1: _Optional[float] = ..., support: _Optional[int] = ...) -> None: ...

class EvaluateReply(_message.Message):
    __slots__ = ("loss", "accuracy", "samples", "confusion_matrix", "per_class", "predictions", "probabilities", "seconds", "weights_sha256")
    LOSS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    CONFUSION_MATRIX_FIELD_NUMBER: _ClassVar[int]
    PER_CLASS_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    loss: float
    accuracy: float
    samples: int
    confusion_matrix: _containers.RepeatedCompositeFieldContainer[ConfusionRow]
    per_class: _containers.RepeatedCompositeFieldContainer[ClassMetrics]
    predictions: _containers.RepeatedScalarFieldContainer[int]
    probabilities: Tensor
    seconds: float
    weights_sha256: str
    def __init__(self, loss: _Optional[float] = ..., accuracy: _Optional[float] = ..., samples: _Optional[int] = ..., confusion_matrix: _Optional[_Iterable[_Union[ConfusionRow, _Mapping]]] = ..., per_class: _Optional[_Iterable[_Union[ClassMetrics, _Mapping]]] = ..., predictions: _Optional[_Iterable[int]] = ..., probabilities: _Optional[_Union[Tensor, _Mapping]] = ..., seconds: _Optional[float] = ..., weights_sha256: _Optional[str] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DatasetInfo(_message.Message):
    __slots__ = ("name", "fingerprint", "train_samples", "test_samples", "data_dir", "class_names", "input_shape", "mean", "std")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TEST_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    DATA_DIR_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    name: str
    fingerprint: str
    train_samples: int
    test_samples: int
    data_dir: str
    class_names: _containers.RepeatedScalarFieldContainer[str]
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, name: _Optional[str] = ..., fingerprint: _Optional[str] = ..., train_samples: _Optional[int] = ..., test_samples: _Optional[int] = ..., data_dir: _Optional[str] = ..., class_names: _Optional[_Iterable[str]] = ..., input_shape: _Optional[_Iterable[int]] = ..., mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ...) -> None: ...

class DescribeReply(_message.Message):
    __slots__ = ("framework", "framework_version", "backend", "device", "architecture", "parameters", "dataset", "objective", "weights_sha256", "worker_version", "python_version", "model", "accepts_packed_pieces", "lease", "receives_transposed", "accepts_data_channel")
    FRAMEWORK_FIELD_NUMBER: _ClassVar[int]
    FRAMEWORK_VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    WORKER_VERSION_FIELD_NUMBER: _ClassVar[int]
    PYTHON_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ACCEPTS_PACKED_PIECES_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    RECEIVES_TRANSPOSED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTS_DATA_CHANNEL_FIELD_NUMBER: _ClassVar[int]
    framework: str
    framework_version: str
    backend: str
    device: str
    architecture: str
    parameters: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    dataset: DatasetInfo
    objective: str
    weights_sha256: str
    worker_version: str
    python_version: str
    model: ModelSpec
    accepts_packed_pieces: bool
    lease: Lease
    receives_transposed: _containers.RepeatedScalarFieldContainer[str]
    accepts_data_channel: bool
    def __init__(self, framework: _Optional[str] = ..., framework_version: _Optional[str] = ..., backend: _Optional[str] = ..., device: _Optional[str] = ..., architecture: _Optional[str] = ..., parameters: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., dataset: _Optional[_Union[DatasetInfo, _Mapping]] = ..., objective: _Optional[str] = ..., weights_sha256: _Optional[str] = ..., worker_version: _Optional[str] = ..., python_version: _Optional[str] = ..., model: _Optional[_Union[ModelSpec, _Mapping]] = ..., accepts_packed_pieces: _Optional[bool] = ..., lease: _Optional[_Union[Lease, _Mapping]] = ..., receives_transposed: _Optional[_Iterable[str]] = ..., accepts_data_channel: _Optional[bool] = ...) -> None: ...
