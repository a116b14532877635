"""Old against new: the bytes each place sent before `moe_serve_client.requests.infer_request` equal what
it sends now. The old builders are frozen copies of the code the builder replaced (temporary: this file
goes once every place uses the builder)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_serve import codec
from moe_serve_client import codec as client_codec
from moe_serve_client.protos import grpc_predict_v2_pb2 as kserve_pb2
from moe_serve_client.requests import RequestedOutput, SharedMemory, infer_request, response_tensors

HIDDEN = {
    "fp32 [T, d]": torch.randn(5, 64, generator=torch.Generator().manual_seed(1)),
    "fp16 [B, S, d]": torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(2)).half(),
    "bf16 [T, d]": torch.randn(4, 64, generator=torch.Generator().manual_seed(3)).bfloat16(),
    "fp32 one token": torch.randn(1, 64, generator=torch.Generator().manual_seed(4)),
    "fp32 no tokens": torch.zeros(0, 64),
    "fp64 (refused by the gateway)": torch.randn(2, 64, dtype=torch.float64),
    "int32 (refused by the gateway)": torch.arange(8, dtype=torch.int32).reshape(2, 4),
    "non-contiguous": torch.randn(64, 6, generator=torch.Generator().manual_seed(5)).t(),
}


def _input(hidden: torch.Tensor, shape: list[int] | None = None) -> kserve_pb2.ModelInferRequest.InferInputTensor:
    return kserve_pb2.ModelInferRequest.InferInputTensor(
        name="hidden_states", datatype=codec.datatype_name(hidden.dtype), shape=shape or list(hidden.shape)
    )


def old_client(model, hidden, layer, outputs):  # moe_serve_client.protocol.build_infer_request
    request = kserve_pb2.ModelInferRequest(
        model_name=model,
        inputs=[
            kserve_pb2.ModelInferRequest.InferInputTensor(
                name="hidden_states", datatype=client_codec.datatype_name(hidden), shape=list(hidden.shape)
            )
        ],
        outputs=[kserve_pb2.ModelInferRequest.InferRequestedOutputTensor(name=name) for name in outputs],
        raw_input_contents=[client_codec.to_bytes(hidden)],
    )
    request.parameters["layer"].int64_param = layer
    return request


def old_infer_command(model, hidden, layer):  # moe_serve/infer_command.py
    request = kserve_pb2.ModelInferRequest(
        model_name=model,
        id="moe-serve-infer",
        inputs=[_input(hidden)],
        outputs=[kserve_pb2.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in ("output", "expert_ids")],
        raw_input_contents=[codec.tensor_to_bytes(hidden)],
    )
    request.parameters["layer"].int64_param = layer
    return request


def old_bench(model, hidden):  # moe_serve/bench/runner.py make_request
    return kserve_pb2.ModelInferRequest(
        model_name=model, inputs=[_input(hidden)], raw_input_contents=[codec.tensor_to_bytes(hidden)]
    )


def old_soak(model, hidden, layer, outputs):  # moe_serve/bench/soak_load.py build_request
    request = kserve_pb2.ModelInferRequest(
        model_name=model,
        inputs=[_input(hidden)],
        outputs=[kserve_pb2.ModelInferRequest.InferRequestedOutputTensor(name=name) for name in outputs],
        raw_input_contents=[codec.tensor_to_bytes(hidden)],
    )
    request.parameters["layer"].int64_param = layer
    return request


def old_trace(model, hidden, layer):  # scripts/record_expert_trace.py layer_request
    request = old_bench(model, hidden)
    request.parameters["layer"].int64_param = layer
    return request


def old_tests(model, hidden, layer=0, outputs=(), shape=None):  # tests/helpers.py infer_request
    request = kserve_pb2.ModelInferRequest(
        model_name=model,
        id="test",
        inputs=[_input(hidden, shape)],
        outputs=[kserve_pb2.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in outputs],
        raw_input_contents=[codec.tensor_to_bytes(hidden)],
    )
    if layer is not None:
        request.parameters["layer"].int64_param = layer
    return request


def old_shm_serving(model, hidden, in_region, out_region):  # tests/integration/test_shared_memory_serving.py
    request = old_tests(model, hidden, outputs=("output",))
    del request.raw_input_contents[:]
    for tensor, region in ((request.inputs[0], in_region), (request.outputs[0], out_region)):
        tensor.parameters["shared_memory_region"].string_param = region
        tensor.parameters["shared_memory_byte_size"].int64_param = hidden.numel() * 4
    return request


def old_shm_unit(hidden, region, outputs):  # tests/unit/test_shared_memory.py _shm_request
    request = kserve_pb2.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="hidden_states", datatype="FP32", shape=list(hidden.shape))
    tensor.parameters["shared_memory_region"].string_param = region
    tensor.parameters["shared_memory_byte_size"].int64_param = hidden.numel() * 4
    for name, (out_region, offset, size) in outputs.items():
        output = request.outputs.add(name=name)
        if out_region:
            output.parameters["shared_memory_region"].string_param = out_region
            output.parameters["shared_memory_offset"].int64_param = offset
            output.parameters["shared_memory_byte_size"].int64_param = size
    return request


def old_response_tensors(response):  # tests/helpers.py, moe_serve/bench/soak_load.py check_answer
    return {
        output.name: codec.tensor_from_bytes(raw, output.datatype, list(output.shape))
        for output, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }


def same(old: kserve_pb2.ModelInferRequest, new: kserve_pb2.ModelInferRequest) -> None:
    assert new.SerializeToString(deterministic=True) == old.SerializeToString(deterministic=True)
    assert new.SerializeToString() == old.SerializeToString()
    assert new == old


@pytest.mark.parametrize("case", list(HIDDEN))
def test_every_place_sends_the_bytes_it_sent_before(case: str) -> None:
    from moe_serve_client.protocol import build_infer_request

    hidden = HIDDEN[case]
    if hidden.dtype in (torch.float32, torch.float16, torch.bfloat16):
        outputs = ["output", "router_logits"]
        same(old_client("m", hidden, 1, outputs), build_infer_request("m", hidden, 1, outputs))
        if hidden.dtype != torch.bfloat16:
            array = hidden.numpy()
            same(old_client("m", array, 0, ["output"]), build_infer_request("m", array, 0, ["output"]))
    same(
        old_infer_command("mixtral-demo", hidden, 1),
        infer_request("mixtral-demo", hidden, layer=1, outputs=("output", "expert_ids"), request_id="moe-serve-infer"),
    )
    same(old_bench("bench", hidden), infer_request("bench", hidden))
    offload_old, offload_new = old_bench("bench", hidden), infer_request("bench", hidden)
    for request in (offload_old, offload_new):  # moe_serve/bench/offload.py adds its parameters so
        request.parameters["layer"].int64_param = 3
        request.parameters["sequence_id"].int64_param = 7
    same(offload_old, offload_new)
    same(offload_old, infer_request("bench", hidden, layer=3, parameters={"sequence_id": 7}))
    same(old_soak("s", hidden, 2, ("output",)), infer_request("s", hidden, layer=2, outputs=("output",)))
    same(old_trace("t", hidden, 3), infer_request("t", hidden, layer=3))
    same(old_tests("x", hidden), infer_request("x", hidden, layer=0, request_id="test"))
    same(old_tests("x", hidden, layer=None), infer_request("x", hidden, request_id="test"))
    same(
        old_tests("x", hidden, layer=1, outputs=("output", "expert_ids")),
        infer_request("x", hidden, layer=1, outputs=("output", "expert_ids"), request_id="test"),
    )
    shaped = infer_request("x", hidden, layer=0, request_id="test")
    shaped.inputs[0].shape[:] = [1, 1, *hidden.shape]
    same(old_tests("x", hidden, shape=[1, 1, *hidden.shape]), shaped)


def test_shared_memory_requests_are_the_ones_built_by_hand() -> None:
    hidden = HIDDEN["fp32 [T, d]"]
    size = hidden.numel() * 4
    same(
        old_shm_serving("m", hidden, "in", "out"),
        infer_request(
            "m",
            hidden,
            layer=0,
            request_id="test",
            outputs=[RequestedOutput("output", SharedMemory("out", size))],
            input_shared_memory=SharedMemory("in", size),
        ),
    )
    outputs = {"output": ("region", 1024, 48), "router_logits": ("", 0, 0), "expert_ids": ("region", 0, 24)}
    same(
        old_shm_unit(hidden, "region", outputs),
        infer_request(
            "m",
            hidden,
            outputs=[
                RequestedOutput(name, SharedMemory(region, size, offset) if region else None)
                for name, (region, offset, size) in outputs.items()
            ],
            input_shared_memory=SharedMemory("region", size),
        ),
    )


@pytest.mark.parametrize("case", list(HIDDEN))
def test_responses_decode_as_before(case: str) -> None:
    hidden = HIDDEN[case]
    ids = torch.arange(6, dtype=torch.int32).reshape(3, 2)
    response = kserve_pb2.ModelInferResponse(
        outputs=[
            kserve_pb2.ModelInferResponse.InferOutputTensor(
                name="output", datatype=codec.datatype_name(hidden.dtype), shape=list(hidden.shape)
            ),
            kserve_pb2.ModelInferResponse.InferOutputTensor(name="expert_ids", datatype="INT32", shape=[3, 2]),
        ],
        raw_output_contents=[codec.tensor_to_bytes(hidden), codec.tensor_to_bytes(ids)],
    )
    old, new = old_response_tensors(response), response_tensors(response)
    assert list(old) == list(new)
    for name in old:
        assert old[name].dtype == new[name].dtype and torch.equal(old[name], new[name])
    if hidden.dtype != torch.bfloat16:
        arrays = response_tensors(response, as_torch=False)
        assert all(np.array_equal(arrays[name], old[name].numpy()) for name in old)


@pytest.mark.parametrize("case", list(HIDDEN))
def test_the_places_now_calling_the_builder_send_what_they_sent(case: str) -> None:
    from moe_serve.bench.runner import make_request
    from moe_serve.bench.soak_load import Target, build_request
    from tests.helpers import infer_request as tests_infer_request

    hidden = HIDDEN[case]
    same(old_bench("bench", hidden), make_request("bench", hidden))
    target = Target(address="", model_name="soak", hidden_size=64, dtype=torch.float32, references={})
    same(
        old_soak("soak", hidden, 1, ("output", "router_logits")),
        build_request(target, hidden, 1, ("output", "router_logits")),
    )
    same(old_tests("x", hidden), tests_infer_request("x", hidden))
    same(old_tests("x", hidden, None, ("output",)), tests_infer_request("x", hidden, None, ("output",)))
    same(old_tests("x", hidden, 2, shape=[9, 64]), tests_infer_request("x", hidden, 2, shape=[9, 64]))
    if hidden.dtype == torch.float32 and hidden.is_contiguous():
        from tests.integration.test_shared_memory_serving import shm_request
        from tests.unit.test_shared_memory import _shm_request

        same(old_shm_serving("m", hidden, "a", "b"), shm_request("m", hidden, "a", "b"))
        outputs = {"output": ("region", 0, 48), "router_logits": ("", 0, 0), "expert_ids": ("region", 2048, 24)}
        same(old_shm_unit(hidden, "r", outputs), _shm_request(hidden, "r", outputs))
