"""KServe v2 HTTP/REST on the gateway, called as curl would (urllib), against real stacks.

The answers are checked against transformers and against the gRPC transport of the same gateway
(bit for bit: one data plane behind both); the bad-input matrix of the gRPC tests comes back as HTTP
codes with a JSON `{"error": ...}`.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from moe_serve.cli.main import app
from moe_serve.cluster.launcher import gateway_settings
from moe_serve.config import GatewaySettings, UpSettings
from moe_serve.runtime import codec
from moe_serve_client.protos import grpc_predict_v2_pb2 as kserve_pb2
from tests.helpers import (
    REPOSITORY,
    ProcessStack,
    gateway_stats,
    infer_request,
    kserve_stub,
    reference_blocks,
    reference_forward,
    response_tensors,
    start_process_stack,
)

HEADER_LENGTH = "Inference-Header-Content-Length"


def call(
    url: str, body: bytes | None = None, headers: dict[str, str] | None = None, method: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one HTTP request; an error status is returned, not raised."""
    request = urllib.request.Request(url, body, headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as error:
        return error.code, {k.lower(): v for k, v in error.headers.items()}, error.read()


def post_json(url: str, document: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    status, _, body = call(url, json.dumps(document).encode(), {"Content-Type": "application/json"})
    return status, json.loads(body)


def json_input(hidden: torch.Tensor, datatype: str = "FP32", shape: list[int] | None = None) -> dict[str, Any]:
    return {
        "name": "hidden_states",
        "datatype": datatype,
        "shape": shape or list(hidden.shape),
        "data": hidden.tolist(),
    }


def binary_body(document: dict[str, Any], *tensors: bytes) -> tuple[bytes, dict[str, str]]:
    header = json.dumps(document).encode()
    return header + b"".join(tensors), {HEADER_LENGTH: str(len(header)), "Content-Type": "application/octet-stream"}


def binary_outputs(headers: dict[str, str], body: bytes) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The JSON part and the binary outputs (by name) of a binary response."""
    length = int(headers[HEADER_LENGTH.lower()])
    document, offset, tensors = json.loads(body[:length]), length, {}
    for output in document["outputs"]:
        size = output.get("parameters", {}).get("binary_data_size")
        if size is not None:
            raw = body[offset : offset + size]
            tensors[output["name"]] = codec.tensor_from_bytes(raw, output["datatype"], output["shape"]).clone()
            offset += size
    assert offset == len(body)
    return document, tensors


def json_output(output: dict[str, Any]) -> torch.Tensor:
    dtype = codec.torch_dtype(output["datatype"])
    return (
        torch.tensor(output["data"], dtype=torch.float64 if dtype.is_floating_point else None)
        .to(dtype)
        .reshape(output["shape"])
    )


def grpc_answer(stack: Any, hidden: torch.Tensor, layer: int, outputs: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The same request through the gateway's gRPC port."""
    channel, stub = kserve_stub(stack.address)
    with channel:
        return response_tensors(stub.ModelInfer(infer_request(stack.model_name, hidden, layer, outputs), timeout=60))


@pytest.fixture(scope="module")
def base(fp32_stack) -> str:
    assert fp32_stack.http_address, "the test stack's gateway serves no REST endpoint"
    return f"http://{fp32_stack.http_address}/v2"


def test_health_metadata_and_unknown_names(fp32_stack, base: str) -> None:
    model = fp32_stack.model_name
    assert call(f"{base}/health/live")[0] == 200
    status, _, body = call(f"{base}/health/ready")
    assert status == 200 and json.loads(body) == {"ready": True}
    server = json.loads(call(base)[2])
    assert server["name"] == "moe-serve" and "binary_tensor_data" in server["extensions"]
    for path in (f"models/{model}", f"models/{model}/versions/1"):
        status, _, body = call(f"{base}/{path}")
        metadata = json.loads(body)
        assert status == 200 and metadata["name"] == model and metadata["versions"] == ["1"]
        assert metadata["inputs"] == [{"name": "hidden_states", "datatype": "FP32", "shape": [-1, 64]}]
        assert [o["name"] for o in metadata["outputs"]][:3] == ["output", "router_logits", "expert_ids"]
        assert metadata["parameters"]["top_k"] == 2 and metadata["parameters"]["moe_layers"] == "0,1"
        assert call(f"{base}/{path}/ready")[0] == 200
    for path in ("models/no-such-model", "models/no-such-model/ready", f"models/{model}/versions/2", "nowhere"):
        status, headers, body = call(f"{base}/{path}")
        assert status == 404 and headers["content-type"] == "application/json", path
        assert json.loads(body)["error"], path
    assert "no-such-model" in json.loads(call(f"{base}/models/no-such-model")[2])["error"]
    status, headers, _ = call(f"{base}/models/{model}/infer")  # GET on the POST endpoint
    assert status == 405 and headers["allow"] == "POST"


@pytest.mark.parametrize("layer", [0, 1])
def test_json_data_equals_transformers(fp32_stack, checkpoints, base: str, layer: int) -> None:
    hidden = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(layer))
    document = {
        "id": "json-1",
        "inputs": [json_input(hidden)],
        "outputs": [{"name": "output"}, {"name": "router_logits"}, {"name": "expert_ids"}],
        "parameters": {"layer": layer},
    }
    status, answer = post_json(f"{base}/models/{fp32_stack.model_name}/versions/1/infer", document)
    assert status == 200, answer
    assert answer["id"] == "json-1" and answer["model_name"] == fp32_stack.model_name
    assert answer["parameters"] == {"dropped_slots": 0, "rerouted_slots": 0}
    outputs = {output["name"]: json_output(output) for output in answer["outputs"]}
    assert list(outputs) == ["output", "router_logits", "expert_ids"]  # in the order asked for
    block = reference_blocks(checkpoints(torch.float32), torch.float32)[layer]
    expected, logits, ids = reference_forward(block, hidden.reshape(-1, 64))
    assert outputs["output"].shape == (2, 5, 64)  # the input's [B, S, d] shape
    torch.testing.assert_close(outputs["output"].reshape(-1, 64), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs["router_logits"], logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(outputs["expert_ids"].long(), ids)
    # JSON numbers carry float32 exactly: the same bits as the gRPC answer of the same gateway
    grpc = grpc_answer(fp32_stack, hidden.reshape(-1, 64), layer, ("output", "router_logits", "expert_ids"))
    assert torch.equal(outputs["output"].reshape(-1, 64), grpc["output"])
    assert torch.equal(outputs["router_logits"], grpc["router_logits"])


def test_binary_tensor_data_is_bit_identical_to_grpc(fp32_stack, base: str) -> None:
    hidden = torch.randn(7, 64, generator=torch.Generator().manual_seed(3))
    document = {
        "inputs": [{"name": "hidden_states", "datatype": "FP32", "shape": [7, 64]}],
        "outputs": [
            {"name": "output"},
            {"name": "expert_weights", "parameters": {"binary_data": False}},  # this one as JSON data
            {"name": "dropped_mask"},
        ],
        "parameters": {"layer": 1, "binary_data_output": True},
    }
    document["inputs"][0]["parameters"] = {"binary_data_size": 7 * 64 * 4}
    body, headers = binary_body(document, codec.tensor_to_bytes(hidden))
    status, answer_headers, answer = call(f"{base}/models/{fp32_stack.model_name}/infer", body, headers)
    assert status == 200, answer[:500]
    assert answer_headers["content-type"] == "application/octet-stream"
    meta, tensors = binary_outputs(answer_headers, answer)
    assert set(tensors) == {"output", "dropped_mask"}
    (weights,) = [output for output in meta["outputs"] if output["name"] == "expert_weights"]
    grpc = grpc_answer(fp32_stack, hidden, 1, ("output", "expert_weights", "dropped_mask"))
    assert torch.equal(tensors["output"], grpc["output"])
    assert torch.equal(json_output(weights), grpc["expert_weights"])
    assert tensors["dropped_mask"].dtype == torch.bool and not tensors["dropped_mask"].any()


def test_half_precision_inputs_answer_in_their_datatype(fp32_stack, base: str) -> None:
    """FP16 as JSON data and BF16 as binary data: each answered in its own datatype, as on gRPC."""
    url = f"{base}/models/{fp32_stack.model_name}/infer"
    hidden = torch.randn(4, 64, generator=torch.Generator().manual_seed(9))
    half = hidden.to(torch.float16)
    status, answer = post_json(url, {"inputs": [json_input(half, "FP16")]})
    assert status == 200, answer
    (output,) = answer["outputs"]
    assert output["datatype"] == "FP16" and torch.equal(
        json_output(output), grpc_answer(fp32_stack, half, 0, ())["output"]
    )
    bf16 = hidden.to(torch.bfloat16)
    document = {"inputs": [{"name": "hidden_states", "datatype": "BF16", "shape": [4, 64]}]}
    document["inputs"][0]["parameters"] = {"binary_data_size": bf16.numel() * 2}
    document["parameters"] = {"binary_data_output": True}
    body, headers = binary_body(document, codec.tensor_to_bytes(bf16))
    status, answer_headers, answer_body = call(url, body, headers)
    assert status == 200
    _, tensors = binary_outputs(answer_headers, answer_body)
    assert tensors["output"].dtype == torch.bfloat16
    assert torch.equal(tensors["output"], grpc_answer(fp32_stack, bf16, 0, ())["output"])


def test_rest_requests_pass_the_gateways_admission_and_statistics(fp32_stack, base: str) -> None:
    """One data plane: REST requests count in the gateway's admission and in Triton's statistics (gRPC)."""
    delivery = fp32_stack.gateway.ready["delivery_address"]
    channel, stub = kserve_stub(fp32_stack.address)

    def successes() -> int:
        request = kserve_pb2.ModelStatisticsRequest(name=fp32_stack.model_name)
        return stub.ModelStatistics(request, timeout=10).model_stats[0].inference_stats.success.count

    with channel:
        requests, succeeded = gateway_stats(delivery).requests, successes()
        hidden = torch.randn(3, 64, generator=torch.Generator().manual_seed(4))
        for _ in range(3):
            assert post_json(f"{base}/models/{fp32_stack.model_name}/infer", {"inputs": [json_input(hidden)]})[0] == 200
        assert gateway_stats(delivery).requests - requests == 3
        assert successes() - succeeded == 3


ROW = torch.randn(2, 64, generator=torch.Generator().manual_seed(11)).tolist()


def with_input(**changes: Any) -> dict[str, Any]:
    """A valid JSON request of two tokens, with fields of its input changed."""
    tensor = {"name": "hidden_states", "datatype": "FP32", "shape": [2, 64], "data": ROW, **changes}
    return {"inputs": [{key: value for key, value in tensor.items() if value is not None}]}


BINARY_512 = with_input(data=None, parameters={"binary_data_size": 512})
# (case, body (a JSON document or raw bytes), headers, HTTP status, a fragment of the error message)
BAD_REQUESTS: list[tuple[str, dict[str, Any] | bytes, dict[str, str], int, str]] = [
    ("malformed JSON", b'{"inputs": [', {}, 400, "malformed"),
    ("no inputs", {"inputs": []}, {}, 400, "missing input"),
    ("extra input", {"inputs": [*with_input()["inputs"], *with_input(name="x")["inputs"]]}, {}, 400, "'x'"),
    ("input twice", {"inputs": with_input()["inputs"] * 2}, {}, 400, "sent 2 times"),
    ("wrong datatype", with_input(datatype="INT32"), {}, 400, "INT32"),
    ("rank 1", with_input(shape=[128]), {}, 400, "rank 1"),
    ("hidden size", with_input(shape=[4, 32]), {}, 400, "hidden_size is 64"),
    ("value count", with_input(shape=[3, 64]), {}, 400, "needs 192"),
    ("shape not integers", with_input(shape=["2", 64]), {}, 400, "list of integers"),
    ("non-numbers", with_input(data=[["a"] * 64] * 2), {}, 400, "numbers only"),
    ("no data", with_input(data=None), {}, 400, "no 'data'"),
    ("no tokens", with_input(shape=[0, 64], data=[]), {}, 400, "no tokens"),
    ("NaN", with_input(data=[[math.nan] * 64] * 2), {}, 400, "NaN or Inf"),
    ("layer out of range", {**with_input(), "parameters": {"layer": 7}}, {}, 400, "out of range"),
    ("layer not an integer", {**with_input(), "parameters": {"layer": "one"}}, {}, 400, "must be an integer"),
    ("parameter an object", {**with_input(), "parameters": {"layer": {}}}, {}, 400, "string, a number"),
    ("unknown output", {**with_input(), "outputs": [{"name": "logits"}]}, {}, 400, "unknown requested output"),
    ("output twice", {**with_input(), "outputs": [{"name": "output"}] * 2}, {}, 400, "more than once"),
    (
        "classification",
        {**with_input(), "outputs": [{"name": "output", "parameters": {"classification": 2}}]},
        {},
        400,
        "classification",
    ),
    ("header length beyond the body", b'{"inputs": []}', {HEADER_LENGTH: "99"}, 400, HEADER_LENGTH),
    ("header length not a number", json.dumps(with_input()).encode(), {HEADER_LENGTH: "x"}, 400, HEADER_LENGTH),
    ("binary size beyond the body", *binary_body(BINARY_512, b"\0" * 100), 400, "only 100 remain"),
    ("bytes no input accounts for", *binary_body(with_input(), b"\0" * 8), 400, "8 bytes follow"),
    ("data and binary", *binary_body(with_input(parameters={"binary_data_size": 8}), b"\0" * 8), 400, "one way"),
    ("timeout not an integer", {**with_input(), "parameters": {"timeout": "soon"}}, {}, 400, "microseconds"),
    ("unknown content encoding", json.dumps(with_input()).encode(), {"Content-Encoding": "br"}, 400, "'br'"),
    ("broken gzip", b"not gzip", {"Content-Encoding": "gzip"}, 400, "gzip"),
    ("body not an object", b"[1, 2]", {}, 400, "JSON object"),
    ("nested too deeply", b'{"inputs": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}", {}, 400, "too deeply"),
    ("deeply nested data counted", with_input(shape=[3, 64], data=[[[[[[ROW]]]]]]), {}, 400, "128 values"),
    ("deadline passed", {**with_input(), "parameters": {"timeout": 1}}, {}, 504, "deadline"),
]


@pytest.mark.parametrize("case", range(len(BAD_REQUESTS)), ids=[case[0] for case in BAD_REQUESTS])
def test_bad_input_gets_the_right_http_status(fp32_stack, base: str, case: int) -> None:
    name, body, headers, expected_status, fragment = BAD_REQUESTS[case]
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, answer_headers, answer = call(f"{base}/models/{fp32_stack.model_name}/infer", data, headers)
    assert status == expected_status, (name, answer)
    assert answer_headers["content-type"] == "application/json", name
    message = json.loads(answer)["error"]
    assert fragment in message, (name, message)
    assert "Traceback" not in message


def test_unknown_model_and_version_are_404(fp32_stack, base: str) -> None:
    hidden = torch.randn(1, 64)
    for path in ("models/other/infer", f"models/{fp32_stack.model_name}/versions/7/infer"):
        status, answer = post_json(f"{base}/{path}", {"inputs": [json_input(hidden)]})
        assert status == 404 and answer["error"], answer


def test_gzip_request_bodies_are_read(fp32_stack, base: str) -> None:
    import gzip

    hidden = torch.randn(2, 64, generator=torch.Generator().manual_seed(6))
    body = gzip.compress(json.dumps({"inputs": [json_input(hidden)]}).encode())
    status, _, answer = call(f"{base}/models/{fp32_stack.model_name}/infer", body, {"Content-Encoding": "gzip"})
    assert status == 200
    assert torch.equal(json_output(json.loads(answer)["outputs"][0]), grpc_answer(fp32_stack, hidden, 0, ())["output"])


def test_body_over_the_request_limit_is_413(limited_stack: ProcessStack) -> None:
    """The limit of the gRPC port (--max-message-bytes 65536 here) holds on REST too, before the body is read."""
    url = f"http://{limited_stack.http_address}/v2/models/{limited_stack.model}/infer"
    hidden = torch.zeros(300, 64)
    document = {"inputs": [{"name": "hidden_states", "datatype": "FP32", "shape": [300, 64]}]}
    document["inputs"][0]["parameters"] = {"binary_data_size": hidden.numel() * 4}
    status, _, answer = call(url, *binary_body(document, codec.tensor_to_bytes(hidden)))
    assert status == 413 and "limit of 65536" in json.loads(answer)["error"]
    small = torch.randn(4, 64)
    assert post_json(url, {"inputs": [json_input(small)]})[0] == 200


@pytest.fixture(scope="module")
def admission_stack(checkpoints) -> Iterator[ProcessStack]:
    """A gateway (router inside) admitting at most 4 tokens at once, requests of up to 8 tokens."""
    stack = start_process_stack(
        checkpoints(torch.float32),
        [[]],
        gateway_args=("--max-inflight-tokens", "4", "--max-request-tokens", "8"),
        router_mode="embedded",
    )
    yield stack
    stack.stop()


def test_overload_is_503_and_a_draining_gateway_closes_its_rest_port(admission_stack: ProcessStack) -> None:
    base = f"http://{admission_stack.http_address}/v2"
    url = f"{base}/models/{admission_stack.model}/infer"
    status, answer = post_json(url, {"inputs": [json_input(torch.randn(5, 64))]})
    assert status == 503 and "max_inflight_tokens=4" in answer["error"]  # as Triton answers a full queue
    status, answer = post_json(url, {"inputs": [json_input(torch.randn(9, 64))]})
    assert status == 400 and "max_request_tokens=8" in answer["error"]
    assert post_json(url, {"inputs": [json_input(torch.randn(4, 64))]})[0] == 200
    # SIGTERM: the gateway drains and stops both ports; the process exits cleanly
    admission_stack.gateway.process.send_signal(signal.SIGTERM)
    assert admission_stack.gateway.process.wait(30) == 0
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{base}/health/live", timeout=5)


def test_rest_settings_default_to_port_8000_and_reach_the_gateway(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton's and KServe's HTTP port by default; `up` hands --http-port or --no-http to its gateway."""
    monkeypatch.delenv("MOE_SERVE_HTTP_PORT", raising=False)
    assert GatewaySettings().http_port == UpSettings().http_port == 8000
    assert GatewaySettings().http and UpSettings().http
    gateway = gateway_settings(UpSettings(http_port=0), Path("."), "m", router_address="127.0.0.1:1")
    assert gateway.http_port == 0 and gateway.http
    assert not gateway_settings(UpSettings(http=False), Path("."), "m", router_address="127.0.0.1:1").http
    for command in ("gateway", "up"):
        output = CliRunner().invoke(app, [command, "--help"], terminal_width=200).output
        assert "--http-port" in output and "--no-http" in output


def test_the_curl_example_runs_against_a_stack(fp32_stack) -> None:
    """examples/rest_curl.sh, as a user runs it (curl and python3 from PATH), on the test model."""
    script = REPOSITORY / "examples" / "rest_curl.sh"
    env = {**os.environ, "URL": f"http://{fp32_stack.http_address}", "MODEL": fp32_stack.model_name, "HIDDEN": "64"}
    run = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "output FP32 [2, 64]" in run.stdout and "expert_ids INT32 [2, 2]" in run.stdout
    assert f"then {2 * 64 * 4} bytes of binary output" in run.stdout
    assert "hidden_size is 64" in run.stdout and "HTTP 400" in run.stdout
