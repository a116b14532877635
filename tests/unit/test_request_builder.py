"""The one ModelInferRequest builder (moe_serve_client.requests) against the KServe v2 / Open Inference
Protocol: datatype names, shape, `raw_input_contents` as little-endian row-major bytes, parameters, Triton's
shared-memory parameters; and the one response decoder."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from moe_serve_client import codec
from moe_serve_client.protos import grpc_predict_v2_pb2 as kserve_pb2
from moe_serve_client.requests import (
    BYTE_SIZE_PARAMETER,
    OFFSET_PARAMETER,
    REGION_PARAMETER,
    RequestedOutput,
    SharedMemory,
    infer_request,
    response_tensors,
)

# the protocol's datatype names and the little-endian struct format of one element
SPEC = {
    torch.bool: ("BOOL", "?"),
    torch.uint8: ("UINT8", "B"),
    torch.int8: ("INT8", "b"),
    torch.int16: ("INT16", "h"),
    torch.int32: ("INT32", "i"),
    torch.int64: ("INT64", "q"),
    torch.float16: ("FP16", "e"),
    torch.float32: ("FP32", "f"),
    torch.float64: ("FP64", "d"),
}


def little_endian_row_major(values: list, element: str) -> bytes:
    return struct.pack("<" + element * len(values), *values)


@pytest.mark.parametrize("dtype", list(SPEC))
def test_a_tensor_travels_as_its_datatype_shape_and_little_endian_row_major_bytes(dtype: torch.dtype) -> None:
    name, element = SPEC[dtype]
    hidden = (torch.arange(24) % 7 - 3).reshape(2, 3, 4).to(dtype)
    for tensor in (hidden, hidden.numpy()):
        request = infer_request("m", tensor)
        (declared,) = request.inputs
        assert (declared.name, declared.datatype, list(declared.shape)) == ("hidden_states", name, [2, 3, 4])
        values = hidden.reshape(-1).tolist()
        assert list(request.raw_input_contents) == [little_endian_row_major(values, element)]


def test_bf16_is_the_upper_half_of_each_fp32_in_little_endian_order() -> None:
    hidden = torch.tensor([[1.0, -2.5], [0.15625, 3.0e38]]).bfloat16()
    request = infer_request("m", hidden)
    assert request.inputs[0].datatype == "BF16" and list(request.inputs[0].shape) == [2, 2]
    words = [struct.unpack("<I", struct.pack("<f", value))[0] >> 16 for value in hidden.float().reshape(-1).tolist()]
    assert request.raw_input_contents[0] == struct.pack("<4H", *words)


def test_a_non_contiguous_tensor_goes_in_its_logical_row_major_order() -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    for tensor in (base.t(), base.numpy().T):
        request = infer_request("m", tensor)
        assert list(request.inputs[0].shape) == [4, 3]
        assert request.raw_input_contents[0] == little_endian_row_major(base.t().reshape(-1).tolist(), "f")


def test_request_fields_outputs_and_typed_parameters() -> None:
    request = infer_request(
        "mixtral-demo",
        np.zeros((1, 8), np.float32),
        layer=1,
        outputs=("output", "router_logits"),
        request_id="req-1",
        model_version="1",
        parameters={"sequence_id": 7, "priority": 2, "note": "x", "scale": 0.5, "flag": True},
    )
    assert (request.model_name, request.model_version, request.id) == ("mixtral-demo", "1", "req-1")
    assert [output.name for output in request.outputs] == ["output", "router_logits"]
    parameters = {name: (p.WhichOneof("parameter_choice"), p) for name, p in request.parameters.items()}
    assert {name: choice for name, (choice, _) in parameters.items()} == {
        "layer": "int64_param",
        "sequence_id": "int64_param",
        "priority": "int64_param",
        "note": "string_param",
        "scale": "double_param",
        "flag": "bool_param",
    }
    assert request.parameters["layer"].int64_param == 1 and request.parameters["flag"].bool_param is True


def test_defaults_leave_out_what_was_not_given() -> None:
    request = infer_request("m", np.ones((2, 4), np.float16))
    assert request.id == "" and request.model_version == "" and len(request.outputs) == 0
    assert dict(request.parameters) == {}  # no layer parameter: the server serves layer 0
    # proto3 leaves empty fields out: the message is model name, one input, one raw content
    expected = kserve_pb2.ModelInferRequest(
        model_name="m",
        inputs=[kserve_pb2.ModelInferRequest.InferInputTensor(name="hidden_states", datatype="FP16", shape=[2, 4])],
        raw_input_contents=[np.ones((2, 4), np.float16).tobytes()],
    )
    assert request.SerializeToString() == expected.SerializeToString()


def test_shared_memory_places_are_tritons_parameters_and_the_bytes_stay_out() -> None:
    hidden = torch.zeros(3, 4)
    request = infer_request(
        "m",
        hidden,
        outputs=[RequestedOutput("output", SharedMemory("out", 48, offset=1024)), "router_logits"],
        input_shared_memory=SharedMemory("in", 48),
    )
    assert len(request.raw_input_contents) == 0
    assert {k: v.WhichOneof("parameter_choice") for k, v in request.inputs[0].parameters.items()} == {
        REGION_PARAMETER: "string_param",
        BYTE_SIZE_PARAMETER: "int64_param",
    }
    assert request.inputs[0].parameters[REGION_PARAMETER].string_param == "in"
    assert request.inputs[0].parameters[BYTE_SIZE_PARAMETER].int64_param == 48
    placed, in_message = request.outputs
    assert placed.parameters[REGION_PARAMETER].string_param == "out"
    assert placed.parameters[OFFSET_PARAMETER].int64_param == 1024
    assert placed.parameters[BYTE_SIZE_PARAMETER].int64_param == 48
    assert in_message.name == "router_logits" and len(in_message.parameters) == 0


@pytest.mark.parametrize("bad", [np.zeros((1, 4), np.complex64), [[1.0, 2.0]], "text"])
def test_a_value_without_a_kserve_datatype_is_refused(bad: object) -> None:
    with pytest.raises(TypeError, match="KServe datatype"):
        infer_request("m", bad)
    with pytest.raises(TypeError, match="parameter"):
        infer_request("m", np.zeros((1, 4), np.float32), parameters={"x": [1]})


def test_responses_decode_by_name_and_malformed_ones_are_refused() -> None:
    ids = np.arange(6, dtype=np.int32).reshape(3, 2)
    output = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)
    response = kserve_pb2.ModelInferResponse(
        outputs=[
            kserve_pb2.ModelInferResponse.InferOutputTensor(name="expert_ids", datatype="INT32", shape=[3, 2]),
            kserve_pb2.ModelInferResponse.InferOutputTensor(name="output", datatype="FP32", shape=[2, 4]),
        ],
        raw_output_contents=[ids.tobytes(), output.tobytes()],
    )
    arrays = response_tensors(response, as_torch=False)
    assert list(arrays) == ["expert_ids", "output"]
    assert np.array_equal(arrays["expert_ids"], ids) and np.array_equal(arrays["output"], output)
    tensors = response_tensors(response)
    assert tensors["expert_ids"].dtype == torch.int32 and torch.equal(tensors["output"], torch.from_numpy(output))
    response.raw_output_contents[1] = b"\0" * 5
    with pytest.raises(codec.MalformedTensor, match="output: 5 bytes"):
        response_tensors(response)
    del response.raw_output_contents[1]
    with pytest.raises(codec.MalformedTensor, match="2 outputs but 1 raw contents"):
        response_tensors(response)
