"""Failures on the data path: a worker killed mid-load, an expert with no replica left, admission limits."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import grpc
import pytest
import torch

from moe_serve.cluster.launcher import embedded_router_of, wait_until_ready
from moe_serve.cluster.processes import spawn_service_process, start_service_process
from tests.helpers import (
    ROUTER_MODES,
    ExactLoad,
    RouterMode,
    infer_request,
    internal_credentials,
    kserve_stub,
    reference_blocks,
    reference_forward,
    response_tensors,
)
from tests.integration.test_topology import start_all


@pytest.mark.parametrize("router_mode", ROUTER_MODES)
def test_killed_worker_rows_are_recomputed_on_another_replica(checkpoints, router_mode: RouterMode) -> None:
    """Workers: A holds all 8 experts, B holds 0-3, C holds 4-7, so every expert has two replicas.
    With the router in the gateway the rows come back on the compute stream the kill breaks."""
    checkpoint: Path = checkpoints(torch.float32)
    if router_mode == "embedded":
        embedded = ["--embedded-router", "--checkpoint", str(checkpoint), "--router-port", "0"]
        gateway = start_service_process("gateway", ["gateway", *embedded, "--port", "0"])
        router = embedded_router_of(gateway)
    else:
        router = start_service_process("router", ["router", "--checkpoint", str(checkpoint), "--port", "0"])
        # started beside the workers: it reports not ready until the router does
        gateway = spawn_service_process("gateway", ["gateway", "--router-address", router.address, "--port", "0"])
    processes = [router, gateway]
    try:
        workers = start_all(
            [
                (
                    name,
                    [
                        "worker",
                        "--checkpoint",
                        str(checkpoint),
                        "--experts",
                        experts,
                        "--worker-id",
                        name,
                        "--port",
                        "0",
                        "--router-address",
                        router.address,
                        "--registry-ttl",
                        "30",
                    ],
                )
                for name, experts in (("A", "0-7"), ("B", "0-3"), ("C", "4-7"))
            ]
        )
        processes.extend(workers)
        wait_until_ready(router.address, internal_credentials())
        model = gateway.wait_ready().ready["model"]
        block = reference_blocks(checkpoint, torch.float32)[0]
        channel, stub = kserve_stub(gateway.address)
        with ExactLoad(stub, model, block, tokens=8, timeout_s=20) as load:
            load.wait_for(10, 30, "load running")
            workers[0].process.send_signal(signal.SIGKILL)  # A dies with requests in flight
            # the request in flight at the kill, and then many more, answered (or failed) meanwhile
            load.wait_for(30, 30, "answers after A died")
        assert load.failures == []
        assert load.answered > 20

        # B gone too: experts 0-3 have no live replica left; the request fails fast, naming the expert
        workers[1].process.send_signal(signal.SIGKILL)
        workers[1].process.wait()
        hidden = torch.randn(64, 64, generator=torch.Generator().manual_seed(99))
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as raised:
            stub.ModelInfer(infer_request(model, hidden), timeout=20)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no live replica" in raised.value.details() and "expert" in raised.value.details()
        assert time.monotonic() - started < 5.0

        # a replica comes back: serving recovers by itself, nothing restarted
        processes.append(
            start_service_process(
                "B2",
                [
                    "worker",
                    "--checkpoint",
                    str(checkpoint),
                    "--experts",
                    "0-3",
                    "--worker-id",
                    "B2",
                    "--port",
                    "0",
                    "--router-address",
                    router.address,
                ],
            )
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                result = response_tensors(stub.ModelInfer(infer_request(model, hidden), timeout=20))
                break
            except grpc.RpcError as error:  # until the router drops the dead replicas from its choices
                assert error.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline
                time.sleep(0.2)
        torch.testing.assert_close(result["output"], reference_forward(block, hidden)[0], rtol=1e-5, atol=1e-5)
        channel.close()
    finally:
        for process in reversed(processes):
            process.stop()


def test_admission_refuses_work_beyond_the_token_bound(fp32_stack, checkpoints) -> None:
    gateway = start_service_process(
        "gateway-small",
        [
            "gateway",
            "--router-address",
            fp32_stack.router.address,
            "--port",
            "0",
            "--max-inflight-tokens",
            "64",
            "--max-request-tokens",
            "64",
            "--model-name",
            "bounded",
        ],
    )
    try:
        block = reference_blocks(checkpoints(torch.float32), torch.float32)[0]
        channel, stub = kserve_stub(gateway.address)
        hidden = [torch.randn(48, 64, generator=torch.Generator().manual_seed(i)) for i in range(12)]
        futures = [stub.ModelInfer.future(infer_request("bounded", h), timeout=30) for h in hidden]
        accepted, refused = 0, []
        for tensor, future in zip(hidden, futures, strict=True):
            try:
                result = response_tensors(future.result())
            except grpc.RpcError as error:
                refused.append(error)
                continue
            accepted += 1
            torch.testing.assert_close(result["output"], reference_forward(block, tensor)[0], rtol=1e-5, atol=1e-5)
        assert accepted >= 1 and refused
        for error in refused:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_inflight_tokens=64" in error.details()

        with pytest.raises(grpc.RpcError) as raised:
            stub.ModelInfer(infer_request("bounded", torch.randn(65, 64)), timeout=30)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_request_tokens=64" in raised.value.details()
        channel.close()
    finally:
        gateway.stop()


def test_client_deadline_is_deadline_exceeded_and_serving_continues(fp32_stack, fp32_client, checkpoints) -> None:
    hidden = torch.randn(300, 64)
    with pytest.raises(grpc.RpcError) as raised:
        fp32_client.ModelInfer(infer_request(fp32_stack.model_name, hidden), timeout=0.001)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    block = reference_blocks(checkpoints(torch.float32), torch.float32)[0]
    result = response_tensors(fp32_client.ModelInfer(infer_request(fp32_stack.model_name, hidden), timeout=30))
    torch.testing.assert_close(result["output"], reference_forward(block, hidden)[0], rtol=1e-5, atol=1e-5)
