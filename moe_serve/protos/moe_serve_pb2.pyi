from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("datatype", "shape", "data")
    DATATYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    datatype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, datatype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ExpertKey(_message.Message):
    __slots__ = ("layer", "expert")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert: int
    def __init__(self, layer: _Optional[int] = ..., expert: _Optional[int] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_name", "family", "hidden_size", "num_experts", "top_k", "moe_layers", "num_layers", "compute_datatype", "ready", "num_shared_slots", "weights_in_activation_dtype", "default_expert_capacity")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MOE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_DATATYPE_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARED_SLOTS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_IN_ACTIVATION_DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_EXPERT_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    family: str
    hidden_size: int
    num_experts: int
    top_k: int
    moe_layers: _containers.RepeatedScalarFieldContainer[int]
    num_layers: int
    compute_datatype: str
    ready: bool
    num_shared_slots: int
    weights_in_activation_dtype: bool
    default_expert_capacity: int
    def __init__(self, model_name: _Optional[str] = ..., family: _Optional[str] = ..., hidden_size: _Optional[int] = ..., num_experts: _Optional[int] = ..., top_k: _Optional[int] = ..., moe_layers: _Optional[_Iterable[int]] = ..., num_layers: _Optional[int] = ..., compute_datatype: _Optional[str] = ..., ready: bool = ..., num_shared_slots: _Optional[int] = ..., weights_in_activation_dtype: bool = ..., default_expert_capacity: _Optional[int] = ...) -> None: ...

class RouteRequest(_message.Message):
    __slots__ = ("call_id", "timeout_s", "request_id", "layer", "hidden_states", "expert_capacity", "delivery_address", "return_router_logits", "overflow", "max_inflight_rows_per_replica", "trace_context", "sequence_id")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    EXPERT_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    RETURN_ROUTER_LOGITS_FIELD_NUMBER: _ClassVar[int]
    OVERFLOW_FIELD_NUMBER: _ClassVar[int]
    MAX_INFLIGHT_ROWS_PER_REPLICA_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    call_id: int
    timeout_s: float
    request_id: str
    layer: int
    hidden_states: Tensor
    expert_capacity: int
    delivery_address: str
    return_router_logits: bool
    overflow: str
    max_inflight_rows_per_replica: int
    trace_context: _containers.ScalarMap[str, str]
    sequence_id: str
    def __init__(self, call_id: _Optional[int] = ..., timeout_s: _Optional[float] = ..., request_id: _Optional[str] = ..., layer: _Optional[int] = ..., hidden_states: _Optional[_Union[Tensor, _Mapping]] = ..., expert_capacity: _Optional[int] = ..., delivery_address: _Optional[str] = ..., return_router_logits: bool = ..., overflow: _Optional[str] = ..., max_inflight_rows_per_replica: _Optional[int] = ..., trace_context: _Optional[_Mapping[str, str]] = ..., sequence_id: _Optional[str] = ...) -> None: ...

class RoutePlan(_message.Message):
    __slots__ = ("call_id", "failure", "expert_ids", "expert_weights", "dropped", "router_logits", "expected_rows", "shared_weights", "rerouted", "dropped_per_expert", "rerouted_per_expert")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    EXPERT_IDS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    ROUTER_LOGITS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_ROWS_FIELD_NUMBER: _ClassVar[int]
    SHARED_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    REROUTED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_PER_EXPERT_FIELD_NUMBER: _ClassVar[int]
    REROUTED_PER_EXPERT_FIELD_NUMBER: _ClassVar[int]
    call_id: int
    failure: Failure
    expert_ids: Tensor
    expert_weights: Tensor
    dropped: Tensor
    router_logits: Tensor
    expected_rows: int
    shared_weights: Tensor
    rerouted: Tensor
    dropped_per_expert: Tensor
    rerouted_per_expert: Tensor
    def __init__(self, call_id: _Optional[int] = ..., failure: _Optional[_Union[Failure, _Mapping]] = ..., expert_ids: _Optional[_Union[Tensor, _Mapping]] = ..., expert_weights: _Optional[_Union[Tensor, _Mapping]] = ..., dropped: _Optional[_Union[Tensor, _Mapping]] = ..., router_logits: _Optional[_Union[Tensor, _Mapping]] = ..., expected_rows: _Optional[int] = ..., shared_weights: _Optional[_Union[Tensor, _Mapping]] = ..., rerouted: _Optional[_Union[Tensor, _Mapping]] = ..., dropped_per_expert: _Optional[_Union[Tensor, _Mapping]] = ..., rerouted_per_expert: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListWorkersReply(_message.Message):
    __slots__ = ("workers",)
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ...) -> None: ...

class ExpertLoadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExpertLoad(_message.Message):
    __slots__ = ("layer", "expert", "rows", "replicas")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert: int
    rows: int
    replicas: int
    def __init__(self, layer: _Optional[int] = ..., expert: _Optional[int] = ..., rows: _Optional[int] = ..., replicas: _Optional[int] = ...) -> None: ...

class ExpertLoadReply(_message.Message):
    __slots__ = ("experts", "worker_rows", "cross_node_rows")
    class WorkerRowsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class CrossNodeRowsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    WORKER_ROWS_FIELD_NUMBER: _ClassVar[int]
    CROSS_NODE_ROWS_FIELD_NUMBER: _ClassVar[int]
    experts: _containers.RepeatedCompositeFieldContainer[ExpertLoad]
    worker_rows: _containers.ScalarMap[str, int]
    cross_node_rows: _containers.ScalarMap[int, int]
    def __init__(self, experts: _Optional[_Iterable[_Union[ExpertLoad, _Mapping]]] = ..., worker_rows: _Optional[_Mapping[str, int]] = ..., cross_node_rows: _Optional[_Mapping[int, int]] = ...) -> None: ...

class ReplicaShare(_message.Message):
    __slots__ = ("expert", "worker_id", "share")
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    expert: ExpertKey
    worker_id: str
    share: float
    def __init__(self, expert: _Optional[_Union[ExpertKey, _Mapping]] = ..., worker_id: _Optional[str] = ..., share: _Optional[float] = ...) -> None: ...

class ReplicaShares(_message.Message):
    __slots__ = ("shares",)
    SHARES_FIELD_NUMBER: _ClassVar[int]
    shares: _containers.RepeatedCompositeFieldContainer[ReplicaShare]
    def __init__(self, shares: _Optional[_Iterable[_Union[ReplicaShare, _Mapping]]] = ...) -> None: ...

class ReplicaSharesAck(_message.Message):
    __slots__ = ("experts",)
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    experts: int
    def __init__(self, experts: _Optional[int] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("worker", "ttl_s")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    worker: WorkerInfo
    ttl_s: float
    def __init__(self, worker: _Optional[_Union[WorkerInfo, _Mapping]] = ..., ttl_s: _Optional[float] = ...) -> None: ...

class DeregisterRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class RegistryAck(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DescribeWorkerRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerLoad(_message.Message):
    __slots__ = ("inflight_rows", "queued_rows", "rows_per_s", "compute_p50_ms")
    INFLIGHT_ROWS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_ROWS_FIELD_NUMBER: _ClassVar[int]
    ROWS_PER_S_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_P50_MS_FIELD_NUMBER: _ClassVar[int]
    inflight_rows: int
    queued_rows: int
    rows_per_s: float
    compute_p50_ms: float
    def __init__(self, inflight_rows: _Optional[int] = ..., queued_rows: _Optional[int] = ..., rows_per_s: _Optional[float] = ..., compute_p50_ms: _Optional[float] = ...) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("worker_id", "address", "node_id", "gpu_id", "experts", "weights_version", "compute_datatype", "load", "metrics_address", "offload")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    GPU_ID_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_VERSION_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_DATATYPE_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    METRICS_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    OFFLOAD_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    address: str
    node_id: str
    gpu_id: int
    experts: _containers.RepeatedCompositeFieldContainer[ExpertKey]
    weights_version: str
    compute_datatype: str
    load: WorkerLoad
    metrics_address: str
    offload: OffloadState
    def __init__(self, worker_id: _Optional[str] = ..., address: _Optional[str] = ..., node_id: _Optional[str] = ..., gpu_id: _Optional[int] = ..., experts: _Optional[_Iterable[_Union[ExpertKey, _Mapping]]] = ..., weights_version: _Optional[str] = ..., compute_datatype: _Optional[str] = ..., load: _Optional[_Union[WorkerLoad, _Mapping]] = ..., metrics_address: _Optional[str] = ..., offload: _Optional[_Union[OffloadState, _Mapping]] = ...) -> None: ...

class OffloadState(_message.Message):
    __slots__ = ("budget_bytes", "resident_bytes", "resident", "hits", "misses", "bytes_moved", "load_seconds", "evictions", "prefetched", "unused_prefetches", "peak_bytes")
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    BYTES_MOVED_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    PREFETCHED_FIELD_NUMBER: _ClassVar[int]
    UNUSED_PREFETCHES_FIELD_NUMBER: _ClassVar[int]
    PEAK_BYTES_FIELD_NUMBER: _ClassVar[int]
    budget_bytes: int
    resident_bytes: int
    resident: _containers.RepeatedCompositeFieldContainer[ExpertKey]
    hits: int
    misses: int
    bytes_moved: int
    load_seconds: float
    evictions: int
    prefetched: int
    unused_prefetches: int
    peak_bytes: int
    def __init__(self, budget_bytes: _Optional[int] = ..., resident_bytes: _Optional[int] = ..., resident: _Optional[_Iterable[_Union[ExpertKey, _Mapping]]] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., bytes_moved: _Optional[int] = ..., load_seconds: _Optional[float] = ..., evictions: _Optional[int] = ..., prefetched: _Optional[int] = ..., unused_prefetches: _Optional[int] = ..., peak_bytes: _Optional[int] = ...) -> None: ...

class ExpertSet(_message.Message):
    __slots__ = ("experts",)
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    experts: _containers.RepeatedCompositeFieldContainer[ExpertKey]
    def __init__(self, experts: _Optional[_Iterable[_Union[ExpertKey, _Mapping]]] = ...) -> None: ...

class SharedRegion(_message.Message):
    __slots__ = ("arena", "offset", "byte_size")
    ARENA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    BYTE_SIZE_FIELD_NUMBER: _ClassVar[int]
    arena: int
    offset: int
    byte_size: int
    def __init__(self, arena: _Optional[int] = ..., offset: _Optional[int] = ..., byte_size: _Optional[int] = ...) -> None: ...

class ExpertSegment(_message.Message):
    __slots__ = ("expert", "num_rows")
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    NUM_ROWS_FIELD_NUMBER: _ClassVar[int]
    expert: int
    num_rows: int
    def __init__(self, expert: _Optional[int] = ..., num_rows: _Optional[int] = ...) -> None: ...

class ComputeRequest(_message.Message):
    __slots__ = ("call_id", "timeout_s", "request_id", "layer", "segments", "rows", "positions", "delivery_address", "trace_context", "reply_with_rows", "rows_region", "output_region")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    REPLY_WITH_ROWS_FIELD_NUMBER: _ClassVar[int]
    ROWS_REGION_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_REGION_FIELD_NUMBER: _ClassVar[int]
    call_id: int
    timeout_s: float
    request_id: str
    layer: int
    segments: _containers.RepeatedCompositeFieldContainer[ExpertSegment]
    rows: Tensor
    positions: Tensor
    delivery_address: str
    trace_context: _containers.ScalarMap[str, str]
    reply_with_rows: bool
    rows_region: SharedRegion
    output_region: SharedRegion
    def __init__(self, call_id: _Optional[int] = ..., timeout_s: _Optional[float] = ..., request_id: _Optional[str] = ..., layer: _Optional[int] = ..., segments: _Optional[_Iterable[_Union[ExpertSegment, _Mapping]]] = ..., rows: _Optional[_Union[Tensor, _Mapping]] = ..., positions: _Optional[_Union[Tensor, _Mapping]] = ..., delivery_address: _Optional[str] = ..., trace_context: _Optional[_Mapping[str, str]] = ..., reply_with_rows: bool = ..., rows_region: _Optional[_Union[SharedRegion, _Mapping]] = ..., output_region: _Optional[_Union[SharedRegion, _Mapping]] = ...) -> None: ...

class ComputeResult(_message.Message):
    __slots__ = ("call_id", "rows_delivered", "failure", "resident_experts", "rows", "positions", "rows_in_region")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    ROWS_DELIVERED_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    ROWS_IN_REGION_FIELD_NUMBER: _ClassVar[int]
    call_id: int
    rows_delivered: int
    failure: Failure
    resident_experts: _containers.RepeatedScalarFieldContainer[int]
    rows: Tensor
    positions: Tensor
    rows_in_region: bool
    def __init__(self, call_id: _Optional[int] = ..., rows_delivered: _Optional[int] = ..., failure: _Optional[_Union[Failure, _Mapping]] = ..., resident_experts: _Optional[_Iterable[int]] = ..., rows: _Optional[_Union[Tensor, _Mapping]] = ..., positions: _Optional[_Union[Tensor, _Mapping]] = ..., rows_in_region: bool = ...) -> None: ...

class PrefetchReply(_message.Message):
    __slots__ = ("loads_started",)
    LOADS_STARTED_FIELD_NUMBER: _ClassVar[int]
    loads_started: int
    def __init__(self, loads_started: _Optional[int] = ...) -> None: ...

class Failure(_message.Message):
    __slots__ = ("code", "message", "reason")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    reason: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class Delivery(_message.Message):
    __slots__ = ("call_id", "timeout_s", "request_id", "positions", "rows", "worker_id", "failure", "trace_context", "rows_region")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    ROWS_REGION_FIELD_NUMBER: _ClassVar[int]
    call_id: int
    timeout_s: float
    request_id: str
    positions: Tensor
    rows: Tensor
    worker_id: str
    failure: Failure
    trace_context: _containers.ScalarMap[str, str]
    rows_region: SharedRegion
    def __init__(self, call_id: _Optional[int] = ..., timeout_s: _Optional[float] = ..., request_id: _Optional[str] = ..., positions: _Optional[_Union[Tensor, _Mapping]] = ..., rows: _Optional[_Union[Tensor, _Mapping]] = ..., worker_id: _Optional[str] = ..., failure: _Optional[_Union[Failure, _Mapping]] = ..., trace_context: _Optional[_Mapping[str, str]] = ..., rows_region: _Optional[_Union[SharedRegion, _Mapping]] = ...) -> None: ...

class DeliveryAck(_message.Message):
    __slots__ = ("call_id", "rows_accepted", "failure")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    ROWS_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    call_id: int
    rows_accepted: int
    failure: Failure
    def __init__(self, call_id: _Optional[int] = ..., rows_accepted: _Optional[int] = ..., failure: _Optional[_Union[Failure, _Mapping]] = ...) -> None: ...

class GatewayStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExpertCounters(_message.Message):
    __slots__ = ("layer", "expert", "routed_rows", "dropped_slots", "rerouted_slots")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    ROUTED_ROWS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_SLOTS_FIELD_NUMBER: _ClassVar[int]
    REROUTED_SLOTS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert: int
    routed_rows: int
    dropped_slots: int
    rerouted_slots: int
    def __init__(self, layer: _Optional[int] = ..., expert: _Optional[int] = ..., routed_rows: _Optional[int] = ..., dropped_slots: _Optional[int] = ..., rerouted_slots: _Optional[int] = ...) -> None: ...

class GatewayStats(_message.Message):
    __slots__ = ("experts", "requests", "rejected_requests", "inflight_tokens", "dispatches", "inflight_requests", "pending_dispatches", "batched_requests", "running_batches")
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DISPATCHES_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PENDING_DISPATCHES_FIELD_NUMBER: _ClassVar[int]
    BATCHED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_BATCHES_FIELD_NUMBER: _ClassVar[int]
    experts: _containers.RepeatedCompositeFieldContainer[ExpertCounters]
    requests: int
    rejected_requests: int
    inflight_tokens: int
    dispatches: int
    inflight_requests: int
    pending_dispatches: int
    batched_requests: int
    running_batches: int
    def __init__(self, experts: _Optional[_Iterable[_Union[ExpertCounters, _Mapping]]] = ..., requests: _Optional[int] = ..., rejected_requests: _Optional[int] = ..., inflight_tokens: _Optional[int] = ..., dispatches: _Optional[int] = ..., inflight_requests: _Optional[int] = ..., pending_dispatches: _Optional[int] = ..., batched_requests: _Optional[int] = ..., running_batches: _Optional[int] = ...) -> None: ...

class LiveStateRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LiveState(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...
