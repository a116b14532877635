"""Bodies far beyond any admissible request are refused before the gateway buffers them."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import torch

from moe_serve.cluster.launcher import Stack
from moe_serve_client.protos import grpc_predict_v2_pb2_grpc as kserve_grpc
from tests.helpers import infer_request, kserve_stub, response_tensors

OVERSIZED_BYTES = 500 << 20
BURST = 3


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (resident now) and VmHWM (the most it ever was) of a process, in KiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {name: int(fields[name].split()[0]) for name in ("VmRSS", "VmHWM")}


def test_oversized_bodies_are_refused_early_and_memory_stays_at_baseline(fp32_stack: Stack) -> None:
    pid, model = fp32_stack.gateway.process.pid, fp32_stack.model_name
    channel, stub = kserve_stub(fp32_stack.address)
    with channel:  # a warm gateway: its baseline includes a served request
        stub.ModelInfer(infer_request(model, torch.randn(4, 64)), timeout=30)
    before = memory_kib(pid)
    # each claims [T, 64] FP32 with a T far over max_request_tokens: what admission would refuse anyway
    request = infer_request(model, torch.randn(1, 64), shape=[OVERSIZED_BYTES // 256, 64])
    request.raw_input_contents[0] = bytes(OVERSIZED_BYTES)
    payload = request.SerializeToString()
    options = [("grpc.max_send_message_length", 1 << 30)]

    # "early" is asserted by memory, not by time (a loaded machine takes seconds to push the bytes)
    def send() -> tuple[grpc.StatusCode, str]:
        with grpc.insecure_channel(fp32_stack.address, options=options) as sender:
            try:
                sender.unary_unary("/inference.GRPCInferenceService/ModelInfer")(payload, timeout=60)
                return grpc.StatusCode.OK, ""
            except grpc.RpcError as error:
                return error.code(), error.details() or ""

    with ThreadPoolExecutor(BURST) as pool:
        outcomes = list(pool.map(lambda _: send(), range(BURST)))
    after = memory_kib(pid)
    for code, details in outcomes:
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
        assert "larger than max" in details, details
    # never buffered: neither the peak nor the resident size grew by anything near one body
    assert after["VmHWM"] - before["VmHWM"] < 64 << 10, (before, after)
    assert after["VmRSS"] - before["VmRSS"] < 64 << 10, (before, after)
    # and it keeps serving
    channel, stub = kserve_stub(fp32_stack.address)
    with channel:
        reply = stub.ModelInfer(infer_request(model, torch.randn(4, 64)), timeout=30)
        assert response_tensors(reply)["output"].shape == (4, 64)
    assert isinstance(stub, kserve_grpc.GRPCInferenceServiceStub)
