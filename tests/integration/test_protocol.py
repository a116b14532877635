"""KServe v2 protocol: metadata, readiness, health, and the status code of every kind of bad input.

Driven with a plain gRPC stub generated from the KServe v2 proto; after all the bad input the
gateway must still answer correctly.
"""

from __future__ import annotations

import math

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moe_serve_client.protos import grpc_predict_v2_pb2 as kserve_pb2
from moe_serve_client.requests import RequestedOutput, SharedMemory
from tests.helpers import infer_request, reference_blocks, reference_forward, response_tensors

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def test_server_and_model_metadata(fp32_stack, fp32_client) -> None:
    assert fp32_client.ServerLive(kserve_pb2.ServerLiveRequest()).live
    assert fp32_client.ServerReady(kserve_pb2.ServerReadyRequest()).ready
    assert fp32_client.ModelReady(kserve_pb2.ModelReadyRequest(name=fp32_stack.model_name)).ready
    assert fp32_client.ModelReady(kserve_pb2.ModelReadyRequest(name=fp32_stack.model_name, version="1")).ready
    server = fp32_client.ServerMetadata(kserve_pb2.ServerMetadataRequest())
    assert server.name == "moe-serve" and server.version

    metadata = fp32_client.ModelMetadata(kserve_pb2.ModelMetadataRequest(name=fp32_stack.model_name))
    assert metadata.name == fp32_stack.model_name == "tiny-mixtral-float32"
    assert list(metadata.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("hidden_states", "FP32", [-1, 64])]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
        ("output", "FP32", [-1, 64]),
        ("router_logits", "FP32", [-1, 8]),
        ("expert_ids", "INT32", [-1, 2]),
        ("expert_weights", "FP32", [-1, 2]),
        ("dropped_mask", "BOOL", [-1, 2]),
    ]
    parameters = metadata.parameters
    assert parameters["family"].string_param == "mixtral"
    assert parameters["overflow"].string_param == "dropless"
    assert parameters["moe_layers"].string_param == "0,1"
    assert parameters["num_experts"].int64_param == 8 and parameters["top_k"].int64_param == 2


def test_health_service_reports_serving(fp32_stack) -> None:
    with grpc.insecure_channel(fp32_stack.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_unknown_model_and_version_are_not_found(fp32_stack, fp32_client) -> None:
    hidden = torch.zeros(1, 64)
    for name, version in (("no-such-model", ""), (fp32_stack.model_name, "7")):
        request = infer_request(name, hidden)
        request.model_version = version
        with pytest.raises(grpc.RpcError) as raised:
            fp32_client.ModelInfer(request, timeout=10)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as raised:
        fp32_client.ModelMetadata(kserve_pb2.ModelMetadataRequest(name="no-such-model"))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-model" in raised.value.details() and fp32_stack.model_name in raised.value.details()
    with pytest.raises(grpc.RpcError) as raised:
        fp32_client.ModelReady(kserve_pb2.ModelReadyRequest(name="no-such-model"))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


def _bad_requests(model: str) -> dict[str, tuple[kserve_pb2.ModelInferRequest, str]]:
    """name -> (request, a phrase the error message must contain)."""
    good = torch.randn(4, 64)
    cases: dict[str, tuple[kserve_pb2.ModelInferRequest, str]] = {}

    request = infer_request(model, good)
    request.inputs[0].name = "x"
    cases["missing input"] = (request, "missing input 'hidden_states'")

    request = infer_request(model, good)
    request.inputs.add(name="extra", datatype="FP32", shape=[1])
    request.raw_input_contents.append(b"\0\0\0\0")
    cases["extra input"] = (request, "unexpected input(s) ['extra']")

    cases["wrong datatype"] = (infer_request(model, good.double()), "datatype 'FP64'")
    cases["integer datatype"] = (infer_request(model, good.int()), "datatype 'INT32'")
    cases["rank 1"] = (infer_request(model, good.reshape(-1)), "rank 1")
    cases["rank 4"] = (infer_request(model, good.reshape(1, 1, 4, 64)), "rank 4")
    cases["d mismatch"] = (infer_request(model, torch.randn(4, 32)), "hidden size 32")

    request = infer_request(model, good)
    request.raw_input_contents[0] = request.raw_input_contents[0][:-4]
    cases["raw length"] = (request, "1020 bytes")

    cases["zero tokens"] = (infer_request(model, torch.zeros(0, 64)), "no tokens")
    cases["zero batch"] = (infer_request(model, torch.zeros(0, 5, 64)), "no tokens")

    for label, value in (("nan", math.nan), ("inf", math.inf), ("-inf", -math.inf)):
        bad = good.clone()
        bad[2, 5] = value
        cases[label] = (infer_request(model, bad), "token 2, feature 5")
    bad = good.clone()
    bad[3, 7], bad[1, 60] = -math.inf, math.nan  # several: counted, the first in row-major order named
    cases["nan and -inf"] = (infer_request(model, bad), "2 NaN or Inf value(s), the first at token 1, feature 60")

    cases["layer out of range"] = (infer_request(model, good, layer=2), "layer 2 is out of range")
    cases["negative layer"] = (infer_request(model, good, layer=-1), "layer -1 is out of range")
    request = infer_request(model, good, layer=None)
    request.parameters["layer"].bool_param = True
    cases["layer not an integer"] = (request, "must be an integer")

    cases["unknown output"] = (infer_request(model, good, outputs=("logits",)), "unknown requested output")

    request = infer_request(model, good)
    request.inputs[0].contents.fp32_contents.extend([0.0] * 256)
    cases["raw and typed"] = (request, "not both")

    request = infer_request(model, good)
    del request.raw_input_contents[:]
    request.inputs[0].contents.fp32_contents.extend([0.0] * 10)
    cases["typed length"] = (request, "10 fp32_contents values")

    request = infer_request(model, good.half())
    del request.raw_input_contents[:]
    cases["fp16 typed"] = (request, "raw_input_contents")

    # Triton shared memory (what tritonclient's set_shared_memory sends) is off unless the gateway
    # runs with --allow-client-shm (tests/integration/test_shared_memory_serving.py): refused, naming the flag
    request = infer_request(model, good, input_shared_memory=SharedMemory("input_region", good.numel() * 4))
    cases["input in shared memory"] = (request, "--allow-client-shm")
    output = RequestedOutput("output", SharedMemory("output_region", good.numel() * 4))
    cases["output to shared memory"] = (infer_request(model, good, outputs=(output,)), "--allow-client-shm")
    request = infer_request(model, good, outputs=("output",))
    request.outputs[0].parameters["classification"].int64_param = 3
    cases["classification"] = (request, "classification")
    return cases


@pytest.mark.parametrize("case", list(_bad_requests("m")))
def test_bad_input_is_invalid_argument_with_an_actionable_message(fp32_stack, fp32_client, case: str) -> None:
    request, phrase = _bad_requests(fp32_stack.model_name)[case]
    with pytest.raises(grpc.RpcError) as raised:
        fp32_client.ModelInfer(request, timeout=10)
    assert raised.value.code() == INVALID, raised.value.details()
    assert phrase in raised.value.details()
    assert "Traceback" not in raised.value.details() and 'File "' not in raised.value.details()


def _requests_with_many_offenders(model: str) -> dict[str, tuple[kserve_pb2.ModelInferRequest, grpc.StatusCode, str]]:
    """name -> (request, status code, a phrase the message must contain): 1,000 of one mistake each."""
    good = torch.randn(4, 64)
    cases: dict[str, tuple[kserve_pb2.ModelInferRequest, grpc.StatusCode, str]] = {}
    outputs = ("output",) * 1000
    cases["one output named 1,000 times"] = (infer_request(model, good, outputs=outputs), INVALID, "['output']")
    outputs = tuple(f"unknown-{i}" for i in range(1000))
    cases["1,000 unknown outputs"] = (infer_request(model, good, outputs=outputs), INVALID, "... and 995 more")
    request = infer_request(model, good)
    for i in range(1000):
        request.inputs.add(name=f"extra-{i}", datatype="FP32", shape=[1])
    cases["1,000 unknown inputs"] = (request, INVALID, "['extra-0', 'extra-1'")
    request = infer_request(model, good)
    request.inputs.extend([request.inputs[0]] * 999)
    cases["the input sent 1,000 times"] = (request, INVALID, "sent 1000 times")
    cases["rank 1,000"] = (infer_request(model, good, shape=[1] * 998 + [4, 64]), INVALID, "rank 1000")
    request = infer_request(model, good, outputs=("x" * 10_000,))
    cases["a 10,000-character output name"] = (request, INVALID, "(10000 characters)")
    cases["a 10,000-character model name"] = (infer_request("m" * 10_000, good), grpc.StatusCode.NOT_FOUND, "mmm")
    return cases


@pytest.mark.parametrize("case", list(_requests_with_many_offenders("m")))
def test_error_messages_stay_short_however_many_offenders(fp32_stack, fp32_client, case: str) -> None:
    # stock clients reject a status message over their metadata limit (8 KiB): a long one would
    # reach the caller as a transport error instead of the reason
    request, code, phrase = _requests_with_many_offenders(fp32_stack.model_name)[case]
    with pytest.raises(grpc.RpcError) as raised:
        fp32_client.ModelInfer(request, timeout=10)
    assert raised.value.code() == code, raised.value.details()
    assert phrase in raised.value.details()
    assert len(raised.value.details().encode()) < 1024, raised.value.details()


def test_undecodable_request_bytes_are_invalid_argument(fp32_stack) -> None:
    with grpc.insecure_channel(fp32_stack.address) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as raised:
            call(b"\xff\xff\xff\xff not a protobuf", timeout=10)
    assert raised.value.code() == INVALID
    assert "not a valid" in raised.value.details()


def test_gateway_keeps_serving_correct_answers_after_bad_input(fp32_stack, fp32_client, checkpoints) -> None:
    for request, _ in _bad_requests(fp32_stack.model_name).values():
        with pytest.raises(grpc.RpcError):
            fp32_client.ModelInfer(request, timeout=10)
    block = reference_blocks(checkpoints(torch.float32), torch.float32)[0]
    hidden = torch.randn(9, 64, generator=torch.Generator().manual_seed(3))
    result = response_tensors(fp32_client.ModelInfer(infer_request(fp32_stack.model_name, hidden), timeout=30))
    torch.testing.assert_close(result["output"], reference_forward(block, hidden)[0], rtol=1e-5, atol=1e-5)


def test_response_echoes_id_and_returns_only_requested_outputs(fp32_stack, fp32_client) -> None:
    request = infer_request(fp32_stack.model_name, torch.randn(2, 64), outputs=("expert_ids", "output"))
    request.id = "request-42"
    response = fp32_client.ModelInfer(request, timeout=30)
    assert response.id == "request-42"
    assert response.model_name == fp32_stack.model_name and response.model_version == "1"
    assert [o.name for o in response.outputs] == ["expert_ids", "output"]
    assert [o.datatype for o in response.outputs] == ["INT32", "FP32"]
    assert len(response.raw_output_contents) == 2
