"""The light client (clients/python): numpy and torch tensors through its messages, its private
descriptor pool, and the server CLI's --version and missing-extra hints."""

from __future__ import annotations

import importlib.metadata
import importlib.util

import numpy as np
import pytest
import torch
from google.protobuf import descriptor_pool
from grpc_health.v1 import health
from typer.testing import CliRunner

from moe_serve.cli.main import app
from moe_serve.runtime.grpc_utils import reflection_pool
from moe_serve_client import GatewayError
from moe_serve_client.protocol import build_infer_request, decode_infer_response
from moe_serve_client.protos import _pool
from moe_serve_client.protos import grpc_predict_v2_pb2 as kserve_pb2


def echo_response(request: kserve_pb2.ModelInferRequest) -> kserve_pb2.ModelInferResponse:
    """A response whose `output` is the request's input, as a gateway would shape it."""
    tensor = request.inputs[0]
    return kserve_pb2.ModelInferResponse(
        outputs=[
            kserve_pb2.ModelInferResponse.InferOutputTensor(name="output", datatype=tensor.datatype, shape=tensor.shape)
        ],
        raw_output_contents=list(request.raw_input_contents),
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_numpy_in_numpy_out(dtype: type) -> None:
    hidden = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(dtype)
    request = build_infer_request("m", hidden, 2, ["output"])
    assert request.parameters["layer"].int64_param == 2 and request.inputs[0].datatype in ("FP32", "FP16")
    output = decode_infer_response(echo_response(request), ["output"], as_torch=False)["output"]
    assert isinstance(output, np.ndarray) and output.dtype == dtype
    np.testing.assert_array_equal(output, hidden)


def test_torch_bfloat16_round_trip() -> None:
    hidden = torch.randn(3, 8).to(torch.bfloat16)
    request = build_infer_request("m", hidden, 0, ["output"])
    assert request.inputs[0].datatype == "BF16"
    output = decode_infer_response(echo_response(request), ["output"])["output"]
    assert output.dtype == torch.bfloat16 and torch.equal(output, hidden)


def test_inputs_other_than_floats_are_refused() -> None:
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        build_infer_request("m", np.zeros((1, 4), np.int64), 0, ["output"])
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        build_infer_request("m", [[1.0, 2.0]], 0, ["output"])


def test_malformed_or_bf16_without_torch_is_a_gateway_error() -> None:
    request = build_infer_request("m", torch.zeros(2, 4, dtype=torch.bfloat16), 0, ["output"])
    with pytest.raises(GatewayError, match="BF16 needs torch"):
        decode_infer_response(echo_response(request), ["output"], as_torch=False)
    response = echo_response(build_infer_request("m", np.zeros((2, 4), np.float32), 0, ["output"]))
    response.raw_output_contents[0] = b"\x00" * 5
    with pytest.raises(GatewayError, match="needs 8 x 4 = 32 bytes"):
        decode_infer_response(response, ["output"], as_torch=False)


def test_kserve_messages_live_in_the_private_pool_only() -> None:
    # the default pool is where tritonclient and kserve register their own `inference.*`
    assert kserve_pb2.ServerLiveRequest.DESCRIPTOR.file.pool is _pool.POOL
    with pytest.raises(KeyError):
        descriptor_pool.Default().FindMessageTypeByName("inference.ServerLiveRequest")


def test_reflection_pool_describes_kserve_and_default_pool_services() -> None:
    pool = reflection_pool(["inference.GRPCInferenceService", health.SERVICE_NAME])
    method = pool.FindServiceByName("inference.GRPCInferenceService").methods_by_name["ModelInfer"]
    assert method.input_type.full_name == "inference.ModelInferRequest"
    assert pool.FindServiceByName(health.SERVICE_NAME).methods_by_name["Check"]


def test_version_prints_the_installed_distribution() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"moe-serve {importlib.metadata.version('moe-serve')}"


@pytest.mark.parametrize(
    ("argv", "missing", "extra"),
    [(["bench"], "matplotlib", "bench"), (["bench"], "transformers", "bench"), (["soak"], "transformers", "soak")],
)
def test_a_missing_extra_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], missing: str, extra: str
) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else real_find_spec(name))
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2
    assert f"moe-serve {argv[0]} needs the {extra} extra (missing: {missing}): pip install 'moe-serve[{extra}]'" in (
        result.output
    )
    assert "Traceback" not in result.output
