"""KServe v2 messages of the gateway, shared by the sync and asyncio clients: requests, responses, metadata.

Pure functions over protobuf messages; no I/O. Tensors travel as `raw_input_contents` /
`raw_output_contents` (little-endian, row-major) via `moe_serve_client.codec`: torch tensors when
the caller passes torch tensors, numpy arrays otherwise (torch is optional).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import grpc

from moe_serve_client import codec
from moe_serve_client.codec import Array
from moe_serve_client.protos import grpc_predict_v2_pb2 as kserve_pb2
from moe_serve_client.requests import INPUT_NAME, ParameterValue, infer_request, response_tensors

# what the gateway can return, by name (see the README's API table)
OUTPUT_NAMES = ("output", "router_logits", "expert_ids", "expert_weights", "dropped_mask")


class GatewayError(Exception):
    """A call to the gateway failed; carries the gRPC status code and the gateway's message.

    Attributes:
        status_code: the grpc.StatusCode (e.g. INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, UNAVAILABLE).
        message: what the gateway (or gRPC, for a transport failure) said.
    """

    def __init__(self, status_code: grpc.StatusCode, message: str, method: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.method = method

    def __str__(self) -> str:
        where = f" in {self.method}" if self.method else ""
        return f"{self.status_code.name}{where}: {self.message}"

    @property
    def code(self) -> grpc.StatusCode:
        return self.status_code

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError, method: str) -> GatewayError:
        # both grpc._channel._InactiveRpcError and grpc.aio.AioRpcError implement code() and details()
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        return cls(code or grpc.StatusCode.UNKNOWN, details or "(no message)", method)


@dataclass(frozen=True)
class ServedModelMetadata:
    """ModelMetadata of a served model, with moe-serve's `parameters` extension decoded.

    Fields that only moe-serve reports (family, num_experts, top_k, shared_experts, moe_layers) are
    None when the server does not report them.
    """

    name: str
    versions: tuple[str, ...]
    platform: str
    hidden_size: int
    compute_datatype: str
    output_names: tuple[str, ...]
    family: str | None = None
    num_experts: int | None = None
    top_k: int | None = None
    shared_experts: int | None = None
    moe_layers: tuple[int, ...] | None = None
    parameters: Mapping[str, ParameterValue] = field(default_factory=dict)

    @classmethod
    def from_response(cls, response: kserve_pb2.ModelMetadataResponse) -> ServedModelMetadata:
        inputs = {tensor.name: tensor for tensor in response.inputs}
        if INPUT_NAME not in inputs or not inputs[INPUT_NAME].shape:
            raise GatewayError(
                grpc.StatusCode.INTERNAL,
                f"model {response.name!r} declares no {INPUT_NAME!r} input with a shape; is this a moe-serve gateway?",
                "ModelMetadata",
            )
        parameters = {key: parameter_value(value) for key, value in response.parameters.items()}
        moe_layers = parameters.get("moe_layers")

        def optional_int(key: str) -> int | None:
            value = parameters.get(key)
            return None if value is None else int(value)

        return cls(
            name=response.name,
            versions=tuple(response.versions),
            platform=response.platform,
            hidden_size=int(inputs[INPUT_NAME].shape[-1]),
            compute_datatype=inputs[INPUT_NAME].datatype,
            output_names=tuple(tensor.name for tensor in response.outputs),
            family=None if parameters.get("family") is None else str(parameters["family"]),
            num_experts=optional_int("num_experts"),
            top_k=optional_int("top_k"),
            shared_experts=optional_int("shared_experts"),
            moe_layers=None if moe_layers is None else tuple(int(x) for x in str(moe_layers).split(",") if x),
            parameters=parameters,
        )


def parameter_value(parameter: kserve_pb2.InferParameter) -> ParameterValue:
    """The Python value of whichever field of the InferParameter oneof is set."""
    choice = parameter.WhichOneof("parameter_choice")
    return "" if choice is None else getattr(parameter, choice)


def requested_outputs(outputs: Sequence[str] | str) -> tuple[str, ...]:
    """Output names as a tuple; a bare string names one output (it would otherwise be asked for letter by letter)."""
    return (outputs,) if isinstance(outputs, str) else tuple(outputs)


def metadata_request(model: str) -> kserve_pb2.ModelMetadataRequest:
    return kserve_pb2.ModelMetadataRequest(name=model)


def build_infer_request(
    model: str, hidden_states: Array, layer: int, outputs: Sequence[str]
) -> kserve_pb2.ModelInferRequest:
    """A ModelInferRequest for hidden_states [T, d] or [B, S, d] of one MoE layer: a torch tensor
    (FP32/FP16/BF16, any device) or a numpy array (float32/float16). `requests.infer_request` builds
    it; this checks first that the datatype is one the gateway serves."""
    try:
        datatype = codec.datatype_name(hidden_states)
    except (KeyError, AttributeError, TypeError):
        datatype = None
    if datatype not in codec.INPUT_DATATYPES:
        raise TypeError(
            f"hidden_states must be float32, float16 or bfloat16, not {getattr(hidden_states, 'dtype', hidden_states)}"
        )
    return infer_request(model, hidden_states, layer=layer, outputs=outputs)


def decode_infer_response(
    response: kserve_pb2.ModelInferResponse, requested: Sequence[str], as_torch: bool = True
) -> dict[str, Array]:
    """Output tensors by name (torch tensors, or numpy arrays unless as_torch), zero-copy views of the
    response bytes (read-only: clone or copy before writing).

    Raises GatewayError (INTERNAL) when the response lacks a requested output or its bytes do not match
    the declared shape.
    """
    try:
        tensors = response_tensors(response, as_torch)
    except codec.MalformedTensor as error:
        raise GatewayError(grpc.StatusCode.INTERNAL, f"malformed response: {error}", "ModelInfer") from None
    missing = [name for name in requested if name not in tensors]
    if missing:
        raise GatewayError(
            grpc.StatusCode.INTERNAL, f"response lacks requested outputs {missing}; got {list(tensors)}", "ModelInfer"
        )
    return tensors
