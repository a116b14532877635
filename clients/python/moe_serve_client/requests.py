"""The one builder of a KServe v2 `ModelInferRequest` and the one decoder of its response.

Shared by the clients here, the `moe-serve infer` command, the benchmarks, the soak load and the
tests, as tritonclient shares `grpc/_utils._get_inference_request`. Pure functions over protobuf
messages; no I/O.

The request carries one input, `hidden_states`, as `raw_input_contents` (little-endian, row-major,
`moe_serve_client.codec`) or, with `input_shared_memory`, in a registered system shared-memory
region (Triton's parameters `shared_memory_region`, `shared_memory_offset`, `shared_memory_byte_size`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from moe_serve_client import codec
from moe_serve_client.codec import Array
from moe_serve_client.protos import grpc_predict_v2_pb2 as kserve_pb2

INPUT_NAME = "hidden_states"
LAYER_PARAMETER = "layer"
# Triton's system shared-memory extension: where a tensor lies, as parameters of the tensor
REGION_PARAMETER = "shared_memory_region"
OFFSET_PARAMETER = "shared_memory_offset"
BYTE_SIZE_PARAMETER = "shared_memory_byte_size"

ParameterValue = bool | int | str | float


@dataclass(frozen=True)
class SharedMemory:
    """A tensor's place in a registered system shared-memory region: `byte_size` bytes from `offset`
    (None: no offset parameter is sent, which the server reads as 0)."""

    region: str
    byte_size: int
    offset: int | None = None


@dataclass(frozen=True)
class RequestedOutput:
    """An output asked for by name, written to a shared-memory region when `shared_memory` is given
    (else returned in the message)."""

    name: str
    shared_memory: SharedMemory | None = None


def infer_request(
    model: str,
    hidden_states: Array,
    *,
    layer: int | None = None,
    outputs: Sequence[str | RequestedOutput] = (),
    request_id: str = "",
    model_version: str = "",
    parameters: Mapping[str, ParameterValue] | None = None,
    input_shared_memory: SharedMemory | None = None,
) -> kserve_pb2.ModelInferRequest:
    """A ModelInferRequest for `hidden_states` ([T, d] or [B, S, d]): a torch tensor (any device) or a
    numpy array of any KServe datatype (`codec.DATATYPE_ELEMENT_TYPES`; BF16 from torch only).

    `layer` (None: left out, the server serves layer 0) and `parameters` become request parameters;
    no `outputs` asks for the default (`output`). With `input_shared_memory` the input's bytes are
    not sent: the server reads them from that region (which the caller has filled).

    Raises TypeError when the tensor's dtype has no KServe datatype. The gateway's own checks (the
    datatypes and ranks it serves, the hidden size, finite values) are not made here.
    """
    try:
        datatype = codec.datatype_name(hidden_states)
    except (KeyError, AttributeError, TypeError):
        raise TypeError(
            f"hidden_states must be a torch tensor or numpy array of a KServe datatype "
            f"({', '.join(codec.DATATYPE_ELEMENT_TYPES)}), not {getattr(hidden_states, 'dtype', type(hidden_states))}"
        ) from None
    request = kserve_pb2.ModelInferRequest(
        model_name=model,
        model_version=model_version,
        id=request_id,
        inputs=[
            kserve_pb2.ModelInferRequest.InferInputTensor(
                name=INPUT_NAME, datatype=datatype, shape=list(hidden_states.shape)
            )
        ],
        outputs=[
            kserve_pb2.ModelInferRequest.InferRequestedOutputTensor(
                name=output if isinstance(output, str) else output.name
            )
            for output in outputs
        ],
    )
    if input_shared_memory is None:
        request.raw_input_contents.append(codec.to_bytes(hidden_states))
    else:
        _place_in_shared_memory(request.inputs[0], input_shared_memory)
    for tensor, output in zip(request.outputs, outputs, strict=True):
        if isinstance(output, RequestedOutput) and output.shared_memory is not None:
            _place_in_shared_memory(tensor, output.shared_memory)
    if layer is not None:
        request.parameters[LAYER_PARAMETER].int64_param = layer
    for name, value in (parameters or {}).items():
        set_parameter(request.parameters[name], value)
    return request


def set_parameter(parameter: kserve_pb2.InferParameter, value: ParameterValue) -> None:
    """Set the InferParameter oneof field that fits `value`'s type (bool before int: a bool is an int)."""
    if isinstance(value, bool):
        parameter.bool_param = value
    elif isinstance(value, int):
        parameter.int64_param = value
    elif isinstance(value, float):
        parameter.double_param = value
    elif isinstance(value, str):
        parameter.string_param = value
    else:
        raise TypeError(f"a request parameter is a bool, int, float or str, not {type(value).__name__}")


def _place_in_shared_memory(
    tensor: kserve_pb2.ModelInferRequest.InferInputTensor | kserve_pb2.ModelInferRequest.InferRequestedOutputTensor,
    place: SharedMemory,
) -> None:
    tensor.parameters[REGION_PARAMETER].string_param = place.region
    if place.offset is not None:
        tensor.parameters[OFFSET_PARAMETER].int64_param = place.offset
    tensor.parameters[BYTE_SIZE_PARAMETER].int64_param = place.byte_size


def response_tensors(response: kserve_pb2.ModelInferResponse, as_torch: bool = True) -> dict[str, Array]:
    """The response's output tensors by name (torch tensors, or numpy arrays unless as_torch): zero-copy,
    read-only views of the response bytes (clone or copy before writing).

    Raises codec.MalformedTensor when the outputs and their raw contents do not pair up, or an output's
    bytes do not match its datatype and shape (an output written to shared memory has none here).
    """
    if len(response.outputs) != len(response.raw_output_contents):
        raise codec.MalformedTensor(
            f"{len(response.outputs)} outputs but {len(response.raw_output_contents)} raw contents"
        )
    return {
        output.name: codec.from_bytes(raw, output.datatype, list(output.shape), as_torch, what=output.name)
        for output, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }
