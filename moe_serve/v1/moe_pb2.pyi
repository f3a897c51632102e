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
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_FLOAT8_E4M3: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_BFLOAT16: DType
DTYPE_FLOAT16: DType
DTYPE_INT32: DType
DTYPE_INT64: DType
DTYPE_FLOAT8_E4M3: DType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "padding")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    PADDING_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    padding: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., padding: _Optional[bytes] = ...) -> None: ...

class InferRequest(_message.Message):
    __slots__ = ("layer", "hidden", "return_routing", "hidden_shared", "output_shared")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    RETURN_ROUTING_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SHARED_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SHARED_FIELD_NUMBER: _ClassVar[int]
    layer: int
    hidden: Tensor
    return_routing: bool
    hidden_shared: SharedTensor
    output_shared: SharedTensor
    def __init__(self, layer: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., return_routing: _Optional[bool] = ..., hidden_shared: _Optional[_Union[SharedTensor, _Mapping]] = ..., output_shared: _Optional[_Union[SharedTensor, _Mapping]] = ...) -> None: ...

class Routing(_message.Message):
    __slots__ = ("expert_ids", "weights", "scores", "dropped_pairs", "load_balance_loss", "importance_loss")
    EXPERT_IDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    DROPPED_PAIRS_FIELD_NUMBER: _ClassVar[int]
    LOAD_BALANCE_LOSS_FIELD_NUMBER: _ClassVar[int]
    IMPORTANCE_LOSS_FIELD_NUMBER: _ClassVar[int]
    expert_ids: Tensor
    weights: Tensor
    scores: Tensor
    dropped_pairs: int
    load_balance_loss: float
    importance_loss: float
    def __init__(self, expert_ids: _Optional[_Union[Tensor, _Mapping]] = ..., weights: _Optional[_Union[Tensor, _Mapping]] = ..., scores: _Optional[_Union[Tensor, _Mapping]] = ..., dropped_pairs: _Optional[int] = ..., load_balance_loss: _Optional[float] = ..., importance_loss: _Optional[float] = ...) -> None: ...

class InferResponse(_message.Message):
    __slots__ = ("output", "routing")
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ROUTING_FIELD_NUMBER: _ClassVar[int]
    output: Tensor
    routing: Routing
    def __init__(self, output: _Optional[_Union[Tensor, _Mapping]] = ..., routing: _Optional[_Union[Routing, _Mapping]] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LayerExperts(_message.Message):
    __slots__ = ("layer", "experts")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    experts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, layer: _Optional[int] = ..., experts: _Optional[_Iterable[int]] = ...) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("id", "address", "healthy", "placement", "devices")
    ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    id: str
    address: str
    healthy: bool
    placement: _containers.RepeatedCompositeFieldContainer[LayerExperts]
    devices: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., address: _Optional[str] = ..., healthy: _Optional[bool] = ..., placement: _Optional[_Iterable[_Union[LayerExperts, _Mapping]]] = ..., devices: _Optional[_Iterable[str]] = ...) -> None: ...

class MasterInfo(_message.Message):
    __slots__ = ("hidden_size", "expert_ffn_size", "num_experts", "top_k", "expert_kind", "activation", "dtype", "layers", "workers", "scoring", "normalize_topk", "capacity_factor", "max_request_tokens")
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FFN_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    EXPERT_KIND_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    SCORING_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_TOPK_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FACTOR_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_TOKENS_FIELD_NUMBER: _ClassVar[int]
    hidden_size: int
    expert_ffn_size: int
    num_experts: int
    top_k: int
    expert_kind: str
    activation: str
    dtype: str
    layers: _containers.RepeatedScalarFieldContainer[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    scoring: str
    normalize_topk: bool
    capacity_factor: float
    max_request_tokens: int
    def __init__(self, hidden_size: _Optional[int] = ..., expert_ffn_size: _Optional[int] = ..., num_experts: _Optional[int] = ..., top_k: _Optional[int] = ..., expert_kind: _Optional[str] = ..., activation: _Optional[str] = ..., dtype: _Optional[str] = ..., layers: _Optional[_Iterable[int]] = ..., workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ..., scoring: _Optional[str] = ..., normalize_topk: _Optional[bool] = ..., capacity_factor: _Optional[float] = ..., max_request_tokens: _Optional[int] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("layer", "hidden", "pair_token", "pair_expert", "pair_weight", "hidden_shared", "output_shared", "hidden_scale", "pair_outputs")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    PAIR_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PAIR_EXPERT_FIELD_NUMBER: _ClassVar[int]
    PAIR_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SHARED_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SHARED_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SCALE_FIELD_NUMBER: _ClassVar[int]
    PAIR_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    hidden: Tensor
    pair_token: Tensor
    pair_expert: Tensor
    pair_weight: Tensor
    hidden_shared: SharedTensor
    output_shared: SharedTensor
    hidden_scale: Tensor
    pair_outputs: bool
    def __init__(self, layer: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., pair_token: _Optional[_Union[Tensor, _Mapping]] = ..., pair_expert: _Optional[_Union[Tensor, _Mapping]] = ..., pair_weight: _Optional[_Union[Tensor, _Mapping]] = ..., hidden_shared: _Optional[_Union[SharedTensor, _Mapping]] = ..., output_shared: _Optional[_Union[SharedTensor, _Mapping]] = ..., hidden_scale: _Optional[_Union[Tensor, _Mapping]] = ..., pair_outputs: _Optional[bool] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("output", "output_scale")
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SCALE_FIELD_NUMBER: _ClassVar[int]
    output: Tensor
    output_scale: Tensor
    def __init__(self, output: _Optional[_Union[Tensor, _Mapping]] = ..., output_scale: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class SharedTensor(_message.Message):
    __slots__ = ("region", "offset", "dtype", "shape")
    REGION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    region: str
    offset: int
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, region: _Optional[str] = ..., offset: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class HostRegion(_message.Message):
    __slots__ = ("pid", "fd")
    PID_FIELD_NUMBER: _ClassVar[int]
    FD_FIELD_NUMBER: _ClassVar[int]
    pid: int
    fd: int
    def __init__(self, pid: _Optional[int] = ..., fd: _Optional[int] = ...) -> None: ...

class CudaRegion(_message.Message):
    __slots__ = ("device_uuid", "handle", "offset", "anchor")
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    ANCHOR_FIELD_NUMBER: _ClassVar[int]
    device_uuid: str
    handle: bytes
    offset: int
    anchor: HostRegion
    def __init__(self, device_uuid: _Optional[str] = ..., handle: _Optional[bytes] = ..., offset: _Optional[int] = ..., anchor: _Optional[_Union[HostRegion, _Mapping]] = ...) -> None: ...

class AttachRegionRequest(_message.Message):
    __slots__ = ("id", "size", "nonce", "host", "cuda")
    ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    CUDA_FIELD_NUMBER: _ClassVar[int]
    id: str
    size: int
    nonce: bytes
    host: HostRegion
    cuda: CudaRegion
    def __init__(self, id: _Optional[str] = ..., size: _Optional[int] = ..., nonce: _Optional[bytes] = ..., host: _Optional[_Union[HostRegion, _Mapping]] = ..., cuda: _Optional[_Union[CudaRegion, _Mapping]] = ...) -> None: ...

class AttachRegionReply(_message.Message):
    __slots__ = ("attached", "reason")
    ATTACHED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    attached: bool
    reason: str
    def __init__(self, attached: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class ReloadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReloadReply(_message.Message):
    __slots__ = ("summary",)
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    summary: str
    def __init__(self, summary: _Optional[str] = ...) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("id", "devices", "placement", "hidden_size", "dtype", "retiring")
    ID_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    RETIRING_FIELD_NUMBER: _ClassVar[int]
    id: str
    devices: _containers.RepeatedScalarFieldContainer[str]
    placement: _containers.RepeatedCompositeFieldContainer[LayerExperts]
    hidden_size: int
    dtype: str
    retiring: _containers.RepeatedCompositeFieldContainer[LayerExperts]
    def __init__(self, id: _Optional[str] = ..., devices: _Optional[_Iterable[str]] = ..., placement: _Optional[_Iterable[_Union[LayerExperts, _Mapping]]] = ..., hidden_size: _Optional[int] = ..., dtype: _Optional[str] = ..., retiring: _Optional[_Iterable[_Union[LayerExperts, _Mapping]]] = ...) -> None: ...
