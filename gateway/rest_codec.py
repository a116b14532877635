"""KServe v2 REST bodies <-> KServe protobuf messages (the only module that knows both).

A REST inference body is JSON, optionally followed by Triton's binary tensor data: the
`Inference-Header-Content-Length` header says where the JSON ends, and each input with a
`binary_data_size` parameter takes that many bytes of the rest, in input order. The body becomes
the same `ModelInferRequest` a gRPC client would send, so gateway/converters.py validates both
transports alike; only what is specific to HTTP (JSON shape, binary sizes, which outputs come back
as binary) is checked here, with a message naming the JSON field to change.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from moe_serve.runtime import codec
from moe_serve.runtime.errors import InvalidInput, quoted
from moe_serve_client.protos import grpc_predict_v2_pb2 as kserve_pb2
from moe_serve_client.requests import set_parameter

BINARY_DATA_SIZE = "binary_data_size"  # on an input or output: its bytes after the JSON header
BINARY_DATA = "binary_data"  # on a requested output: answer it as binary (true) or JSON data (false)
BINARY_DATA_OUTPUT = "binary_data_output"  # request parameter: the default of every output's binary_data
TIMEOUT_PARAMETER = "timeout"  # Triton's request parameter: the client's timeout, in microseconds
SHARED_MEMORY_REGION = "shared_memory_region"


@dataclass(frozen=True)
class RestRequest:
    """A REST inference request as the data plane takes it, plus what only HTTP needs to answer it."""

    message: kserve_pb2.ModelInferRequest
    binary_by_default: bool = False
    binary_outputs: dict[str, bool] = field(default_factory=dict)  # output name -> its binary_data
    timeout_s: float | None = None


def _json_object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _json_list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise InvalidInput(f"{what} must be a JSON array, got {type(value).__name__}")
    return value


def _set_parameter(parameter: kserve_pb2.InferParameter, value: Any, what: str) -> None:
    """One JSON parameter value into its InferParameter oneof field (the client's rule: bool, int, float, str)."""
    try:
        set_parameter(parameter, value)
    except TypeError:
        raise InvalidInput(f"{what} must be a string, a number or a boolean, got {type(value).__name__}") from None


def _copy_parameters(target: Any, parameters: dict[str, Any], what: str, http_only: tuple[str, ...]) -> None:
    for key, value in parameters.items():
        if key not in http_only:
            _set_parameter(target[key], value, f"{what} parameter {quoted(key)}")


def _flattened(values: list[Any]) -> Iterator[Any]:
    """The leaves of nested JSON arrays in row-major order (the protocol allows flat or nested data);
    iterative, so no nesting depth the JSON parser accepts can exhaust the call stack."""
    pending = [iter(values)]
    while pending:
        for value in pending[-1]:
            if isinstance(value, list):
                pending.append(iter(value))
                break
            yield value
        else:
            pending.pop()


def _shape(tensor: dict[str, Any], what: str) -> list[int]:
    shape = _json_list(tensor.get("shape"), f"{what} 'shape'")
    if not all(isinstance(dim, int) and not isinstance(dim, bool) for dim in shape):
        raise InvalidInput(f"{what} 'shape' must be a list of integers, got {shape[:8]}")
    return shape


def _json_data(data: Any, datatype: str, shape: list[int], what: str) -> bytes:
    """The little-endian bytes of JSON `data` in `datatype` (float types only; others are refused
    later by the datatype check, with the datatypes the model takes)."""
    values = list(_flattened(_json_list(data, f"{what} 'data'")))
    if datatype not in codec.FLOAT_DATATYPES:
        return b""
    if any(isinstance(value, bool) or not isinstance(value, int | float) for value in values):
        raise InvalidInput(f"{what} 'data' must hold numbers only (nested arrays allowed)")
    expected = math.prod(shape)
    if all(dim >= 0 for dim in shape) and len(values) != expected:
        raise InvalidInput(f"{what}: {len(values)} values in 'data', but shape {shape} needs {expected}")
    # one rounding, from the JSON number (a double) to the datatype, as a client's own cast would
    return codec.tensor_to_bytes(torch.tensor(values, dtype=torch.float64).to(codec.torch_dtype(datatype)))


def _binary_size(parameters: dict[str, Any], what: str) -> int | None:
    size = parameters.get(BINARY_DATA_SIZE)
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise InvalidInput(f"{what} parameter {BINARY_DATA_SIZE!r} must be a non-negative integer, got {size!r}")
    return size


def _header_and_binary(body: bytes, header_length: int | None) -> tuple[dict[str, Any], memoryview]:
    if header_length is None:
        header_length = len(body)
    elif not 0 <= header_length <= len(body):
        raise InvalidInput(
            f"Inference-Header-Content-Length is {header_length}, but the body has {len(body)} bytes; "
            "it must be the length of the JSON part"
        )
    try:
        header = json.loads(bytes(body[:header_length]))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidInput(
            f"the request's JSON is malformed ({error}); with binary tensor data, set "
            "Inference-Header-Content-Length to the JSON's length in bytes"
        ) from None
    except RecursionError:
        raise InvalidInput("the request's JSON nests arrays or objects too deeply; send tensor data flat") from None
    return _json_object(header, "the request body"), memoryview(body)[header_length:]


def _add_input(
    message: kserve_pb2.ModelInferRequest, tensor: dict[str, Any], binary: memoryview, offset: int, index: int
) -> int:
    """Append one input to `message`; returns the offset of the next input's binary data."""
    tensor = _json_object(tensor, f"inputs[{index}]")
    name = tensor.get("name")
    if not isinstance(name, str):
        raise InvalidInput(f"inputs[{index}] needs a string 'name'")
    what = f"input {quoted(name)}"
    datatype = tensor.get("datatype")
    if not isinstance(datatype, str):
        raise InvalidInput(f"{what} needs a string 'datatype' (FP32, FP16 or BF16)")
    shape = _shape(tensor, what)
    parameters = _json_object(tensor.get("parameters", {}), f"{what} 'parameters'")
    entry = message.inputs.add(name=name, datatype=datatype, shape=shape)
    _copy_parameters(entry.parameters, parameters, what, (BINARY_DATA_SIZE,))
    size = _binary_size(parameters, what)
    if size is not None:
        if "data" in tensor:
            raise InvalidInput(f"{what} has both 'data' and {BINARY_DATA_SIZE!r}; send it one way")
        if offset + size > len(binary):
            raise InvalidInput(
                f"{what} declares {size} bytes of binary data, but only {len(binary) - offset} remain after the JSON"
            )
        message.raw_input_contents.append(bytes(binary[offset : offset + size]))
        return offset + size
    if "data" in tensor:
        message.raw_input_contents.append(_json_data(tensor["data"], datatype, shape, what))
    elif SHARED_MEMORY_REGION not in parameters:
        raise InvalidInput(f"{what} has no 'data', no {BINARY_DATA_SIZE!r} parameter and no shared-memory region")
    return offset


def parse_rest_request(body: bytes, header_length: int | None, model_name: str, model_version: str) -> RestRequest:
    """The ModelInferRequest a REST body (JSON, then any binary tensor data) stands for."""
    header, binary = _header_and_binary(body, header_length)
    message = kserve_pb2.ModelInferRequest(model_name=model_name, model_version=model_version)
    request_id = header.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidInput(f"'id' must be a string, got {type(request_id).__name__}")
    message.id = request_id
    parameters = _json_object(header.get("parameters", {}), "'parameters'")
    _copy_parameters(message.parameters, parameters, "request", (BINARY_DATA_OUTPUT, TIMEOUT_PARAMETER))
    offset = 0
    for index, tensor in enumerate(_json_list(header.get("inputs", []), "'inputs'")):
        offset = _add_input(message, tensor, binary, offset, index)
    if offset != len(binary):
        raise InvalidInput(
            f"{len(binary) - offset} bytes follow the JSON that no input's {BINARY_DATA_SIZE!r} accounts for"
        )
    if message.raw_input_contents and len(message.raw_input_contents) != len(message.inputs):
        # the message's raw contents are positional: an input in shared memory beside one in the body
        raise InvalidInput("send every input in the body (JSON data or binary) or every one in shared memory")
    binary_outputs: dict[str, bool] = {}
    for index, tensor in enumerate(_json_list(header.get("outputs", []), "'outputs'")):
        tensor = _json_object(tensor, f"outputs[{index}]")
        name = tensor.get("name")
        if not isinstance(name, str):
            raise InvalidInput(f"outputs[{index}] needs a string 'name'")
        output_parameters = _json_object(tensor.get("parameters", {}), f"output {quoted(name)} 'parameters'")
        entry = message.outputs.add(name=name)
        _copy_parameters(entry.parameters, output_parameters, f"output {quoted(name)}", (BINARY_DATA,))
        if BINARY_DATA in output_parameters:
            binary_outputs[name] = bool(output_parameters[BINARY_DATA])
    return RestRequest(
        message=message,
        binary_by_default=bool(parameters.get(BINARY_DATA_OUTPUT, False)),
        binary_outputs=binary_outputs,
        timeout_s=_timeout_seconds(parameters.get(TIMEOUT_PARAMETER)),
    )


def _timeout_seconds(microseconds: Any) -> float | None:
    if microseconds is None:
        return None
    if isinstance(microseconds, bool) or not isinstance(microseconds, int) or microseconds <= 0:
        raise InvalidInput(f"parameter 'timeout' must be a positive integer of microseconds, got {microseconds!r}")
    return microseconds / 1e6


def parameter_value(parameter: kserve_pb2.InferParameter) -> Any:
    """The JSON value of a protobuf parameter."""
    kind = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, kind) if kind else None


def encode_rest_response(request: RestRequest, response: kserve_pb2.ModelInferResponse) -> tuple[bytes, int | None]:
    """The REST body of `response` and, when binary tensor data follows the JSON, the JSON's length.

    An output is binary when its request asked (`binary_data`), else when the request's
    `binary_data_output` did; JSON data otherwise (flat, row-major, as Triton answers)."""
    outputs, tail = [], []
    for output, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        parameters = {key: parameter_value(value) for key, value in output.parameters.items()}
        entry: dict[str, Any] = {"name": output.name, "datatype": output.datatype, "shape": list(output.shape)}
        if SHARED_MEMORY_REGION in parameters:
            pass  # written to the client's region: its parameters say where
        elif request.binary_outputs.get(output.name, request.binary_by_default):
            parameters[BINARY_DATA_SIZE] = len(raw)
            tail.append(raw)
        else:
            entry["data"] = codec.tensor_from_bytes(raw, output.datatype, list(output.shape)).flatten().tolist()
        if parameters:
            entry["parameters"] = parameters
        outputs.append(entry)
    document = {
        "model_name": response.model_name,
        "model_version": response.model_version,
        **({"id": response.id} if response.id else {}),
        "parameters": {key: parameter_value(value) for key, value in response.parameters.items()},
        "outputs": outputs,
    }
    header = json.dumps(document, separators=(",", ":")).encode()
    if not tail:
        return header, None
    return b"".join([header, *tail]), len(header)
