"""Several routers share the load of one gateway: the gateway's RouteStreams go over one channel with
client-side round_robin, so a target that resolves to two routers (what a Kubernetes headless Service's
DNS name does; here gRPC's `ipv4:a,b` form on the loopback) sends calls to both, and both answer exactly."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import pytest
import torch

from moe_serve.cluster.launcher import wait_until_ready
from moe_serve.cluster.processes import ServiceProcess, start_service_process
from tests.conftest import REDIS_URL
from tests.helpers import (
    infer_request,
    internal_credentials,
    kserve_stub,
    reference_blocks,
    reference_forward,
    response_tensors,
    save_tiny_mixtral,
)


def route_requests_received(metrics_address: str) -> float:
    """RouteRequests a router read from its streams, from its Prometheus endpoint."""
    port = metrics_address.rpartition(":")[2]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    pattern = r"^moe_serve_stream_messages_total\{([^}]*)\} (\S+)$"
    return sum(
        float(value)
        for labels, value in re.findall(pattern, text, re.M)
        if 'message="RouteRequest"' in labels and 'direction="received"' in labels
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_mixtral(tmp_path_factory.mktemp("ckpt") / "tiny-balanced")


def test_two_routers_behind_one_gateway_target_both_serve(checkpoint: Path, redis_prefix: str) -> None:
    registry = ["--redis-url", REDIS_URL, "--redis-prefix", redis_prefix]
    started: list[ServiceProcess] = []
    try:
        for index in range(2):  # routers share the worker registry in Redis
            router = ["router", "--checkpoint", str(checkpoint), "--port", "0", "--metrics-port", "0", *registry]
            started.append(start_service_process(f"router-{index}", router))
        routers = started[:2]
        worker = ["worker", "--checkpoint", str(checkpoint), "--port", "0", "--worker-id", "w0", *registry]
        started.append(start_service_process("worker", worker))
        for router in routers:
            wait_until_ready(router.address, internal_credentials())
        ports = [router.address.rpartition(":")[2] for router in routers]
        target = "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in ports)
        gateway_args = ["gateway", "--router-address", target, "--router-streams", "4", "--port", "0", *registry]
        gateway = start_service_process("gateway", gateway_args)
        started.append(gateway)

        block = reference_blocks(checkpoint, torch.float32)[0]
        channel, stub = kserve_stub(gateway.address)
        with channel:
            for seed in range(12):
                hidden = torch.randn(3, 64, generator=torch.Generator().manual_seed(seed))
                answer = response_tensors(
                    stub.ModelInfer(infer_request(str(gateway.ready["model"]), hidden), timeout=30)
                )
                expected = reference_forward(block, hidden)[0]
                torch.testing.assert_close(answer["output"], expected, rtol=1e-5, atol=1e-5)
        received = [route_requests_received(str(router.ready["metrics_address"])) for router in routers]
        assert sum(received) == 12 and min(received) >= 1, received  # both routers served a share
    finally:
        for process in reversed(started):
            process.stop()
