"""Triton's extensions to the protocol, as far as a served MoE layer has them: the model's
configuration (model_config.proto), cumulative inference statistics, the repository index, and
the status of system shared-memory regions (the regions themselves: gateway.shared_memory).

tritonclient's `get_model_config`, `get_inference_statistics` and `get_model_repository_index`,
and perf_analyzer (which reads the config and the statistics), call them unmodified.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from gateway.converters import model_parameters
from gateway.model import GATING_OUTPUTS, INPUT_NAME, MODEL_VERSION, OUTPUT_NAME, PLATFORM, ServedModel
from gateway.shared_memory import SystemSharedMemoryRegion
from moe_serve.runtime import codec
from moe_serve_client.protos import grpc_predict_v2_pb2 as kserve_pb2
from moe_serve_client.protos import model_config_pb2 as config_pb2

BACKEND = "moe-serve"
NOT_READY_REASON = "the router is unreachable or an expert has no live replica"


def _triton_type(datatype: str) -> int:
    """Triton's DataType enum value of a KServe datatype name (FP32 -> TYPE_FP32)."""
    return config_pb2.DataType.Value(f"TYPE_{datatype}")


def model_config(model: ServedModel, policy: dict[str, str | float | int]) -> kserve_pb2.ModelConfigResponse:
    """The served layer as a Triton model configuration.

    max_batch_size is 0: shapes are complete, [-1, d] tokens by hidden size, exactly as
    ModelMetadata reports them (a [B, S, d] input is accepted too, as for every call).
    The layer places its experts itself across workers, which Triton calls KIND_MODEL.
    Cross-request batching concatenates tokens inside the gateway; it is not Triton's dynamic
    batcher (which needs max_batch_size > 0), so its settings are among the parameters.
    """
    compute = codec.datatype_name(model.compute_dtype)
    outputs = [config_pb2.ModelOutput(name=OUTPUT_NAME, data_type=_triton_type(compute), dims=[-1, model.hidden_size])]
    outputs += [
        config_pb2.ModelOutput(name=name, data_type=_triton_type(datatype), dims=[-1, model.output_width(name)])
        for name, datatype in GATING_OUTPUTS.items()
    ]
    config = config_pb2.ModelConfig(
        name=model.name,
        platform=PLATFORM,
        backend=BACKEND,
        version_policy=config_pb2.ModelVersionPolicy(
            specific=config_pb2.ModelVersionPolicy.Specific(versions=[int(MODEL_VERSION)])
        ),
        max_batch_size=0,
        input=[config_pb2.ModelInput(name=INPUT_NAME, data_type=_triton_type(compute), dims=[-1, model.hidden_size])],
        output=outputs,
        instance_group=[
            config_pb2.ModelInstanceGroup(name=model.name, kind=config_pb2.ModelInstanceGroup.Kind.KIND_MODEL, count=1)
        ],
        model_transaction_policy=config_pb2.ModelTransactionPolicy(decoupled=False),
    )
    for key, value in model_parameters(model, policy).items():
        config.parameters[key].string_value = str(value)
    return kserve_pb2.ModelConfigResponse(config=config)


def repository_index(model: ServedModel, ready: bool, ready_only: bool) -> kserve_pb2.RepositoryIndexResponse:
    """The one model this gateway serves, READY or UNAVAILABLE (with the reason)."""
    index = kserve_pb2.RepositoryIndexResponse
    if ready_only and not ready:
        return index()
    state, reason = ("READY", "") if ready else ("UNAVAILABLE", NOT_READY_REASON)
    return index(models=[index.ModelIndex(name=model.name, version=MODEL_VERSION, state=state, reason=reason)])


def shared_memory_status(regions: list[SystemSharedMemoryRegion]) -> kserve_pb2.SystemSharedMemoryStatusResponse:
    """SystemSharedMemoryStatus: the regions by name, each with its key, offset and byte size."""
    response = kserve_pb2.SystemSharedMemoryStatusResponse()
    for region in regions:
        response.regions[region.name].CopyFrom(
            response.RegionStatus(name=region.name, key=region.key, offset=region.offset, byte_size=region.byte_size)
        )
    return response


@dataclass
class _Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += max(0, round(seconds * 1e9))

    def to_proto(self) -> kserve_pb2.StatisticDuration:
        return kserve_pb2.StatisticDuration(count=self.count, ns=self.ns)


@dataclass
class InferenceStatistics:
    """Cumulative per-model statistics with Triton's meaning (all durations in the gateway):

    success / fail: requests and their whole time from arrival to answer;
    queue: from arrival to the moment its batch left for the router (admission, batch window);
    compute_input: decoding and validating the request; compute_infer: routing, expert compute
    and combine; compute_output: building the response.
    inference_count counts successful requests (max_batch_size 0: one inference each),
    execution_count the dispatch batches they rode (fewer with cross-request batching).
    """

    success: _Duration = field(default_factory=_Duration)
    fail: _Duration = field(default_factory=_Duration)
    queue: _Duration = field(default_factory=_Duration)
    compute_input: _Duration = field(default_factory=_Duration)
    compute_infer: _Duration = field(default_factory=_Duration)
    compute_output: _Duration = field(default_factory=_Duration)
    last_inference_ms: int = 0

    def record_success(
        self, arrived: float, decoded: float, dispatched: float, inferred: float, answered: float
    ) -> None:
        """Time points (time.monotonic) of one successful request."""
        self.success.add(answered - arrived)
        self.compute_input.add(decoded - arrived)
        self.queue.add(dispatched - decoded)
        self.compute_infer.add(inferred - dispatched)
        self.compute_output.add(answered - inferred)
        self.last_inference_ms = int(time.time() * 1000)

    def record_failure(self, seconds: float) -> None:
        self.fail.add(seconds)

    def to_proto(self, model: ServedModel, executions: int) -> kserve_pb2.ModelStatistics:
        return kserve_pb2.ModelStatistics(
            name=model.name,
            version=MODEL_VERSION,
            last_inference=self.last_inference_ms,
            inference_count=self.success.count,
            execution_count=executions,
            inference_stats=kserve_pb2.InferStatistics(
                success=self.success.to_proto(),
                fail=self.fail.to_proto(),
                queue=self.queue.to_proto(),
                compute_input=self.compute_input.to_proto(),
                compute_infer=self.compute_infer.to_proto(),
                compute_output=self.compute_output.to_proto(),
                cache_hit=kserve_pb2.StatisticDuration(),
                cache_miss=kserve_pb2.StatisticDuration(),
            ),
        )
