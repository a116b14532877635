"""Health tells the truth: readiness follows the router and the expert replicas, liveness the process.

A process stack (router on a fixed port, one worker holding every expert, a gateway) loses its only
worker, then its router; the gateway's readiness (grpc.health.v1 "" and the KServe service, KServe
ServerReady) goes NOT_SERVING within a probe of each, liveness stays SERVING, and both come back
when what died is back.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.readiness import LIVENESS_SERVICE
from gateway.server import PUBLIC_SERVICE
from moe_serve.cluster.launcher import wait_until_ready
from moe_serve.cluster.processes import start_service_process
from moe_serve_client.protos import grpc_predict_v2_pb2 as kserve_pb2
from moe_serve_client.protos import grpc_predict_v2_pb2_grpc as kserve_grpc
from tests.helpers import ProcessStack, infer_request, internal_credentials, wait_until

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
TTL_S = 1.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def router_args(checkpoint: Path, port: int) -> list[str]:
    return ["router", "--checkpoint", str(checkpoint), "--port", str(port), "--registry-ttl", str(TTL_S)]


@pytest.fixture
def stack(checkpoints) -> Iterator[ProcessStack]:
    checkpoint = checkpoints(torch.float32)
    router = start_service_process("router", router_args(checkpoint, free_port()))
    stack = ProcessStack(checkpoint, router, [], None, ["--registry-ttl", str(TTL_S)])  # type: ignore[arg-type]
    try:
        stack.workers.append(stack.start_worker("worker-0"))
        wait_until_ready(router.address, internal_credentials())
        stack.gateway = start_service_process("gateway", ["gateway", "--router-address", router.address, "--port", "0"])
        yield stack
    finally:
        for process in (stack.gateway, *stack.workers, stack.router):
            if process is not None:
                process.stop(grace_s=5)


def probe(address: str) -> dict[str, object]:
    """What orchestrators see: grpc.health.v1 for the server, the KServe service and liveness; KServe's own."""
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        kserve = kserve_grpc.GRPCInferenceServiceStub(channel)

        def status(service: str) -> int:
            return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

        return {
            "server": status(""),
            "kserve": status(PUBLIC_SERVICE),
            "liveness": status(LIVENESS_SERVICE),
            "ServerReady": kserve.ServerReady(kserve_pb2.ServerReadyRequest(), timeout=5).ready,
            "ServerLive": kserve.ServerLive(kserve_pb2.ServerLiveRequest(), timeout=5).live,
        }


READY = {"server": SERVING, "kserve": SERVING, "liveness": SERVING, "ServerReady": True, "ServerLive": True}
NOT_READY = {
    "server": NOT_SERVING,
    "kserve": NOT_SERVING,
    "liveness": SERVING,
    "ServerReady": False,
    "ServerLive": True,
}


def test_readiness_follows_router_and_worker_death(stack: ProcessStack) -> None:
    address = stack.gateway.address
    # at once: a probe right after start gets a fresh answer, not the one from before the workers came
    assert probe(address) == READY

    # the only worker dies: its registration expires (TTL 1 s), and readiness follows
    stack.workers.pop().process.kill()
    waited = wait_until(lambda: probe(address) == NOT_READY, 5, "gateway NOT_SERVING after its last worker died")
    assert waited < TTL_S + 2
    with grpc.insecure_channel(stack.router.address) as channel:  # the router says the same about itself
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == NOT_SERVING
    stack.workers.append(stack.start_worker("worker-1"))
    wait_until(lambda: probe(address) == READY, 5, "gateway SERVING once a worker is back")

    # the router dies: the very next probe says so
    stack.router.process.kill()
    stack.router.process.wait()
    assert probe(address) == NOT_READY
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as refused:
        kserve_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            infer_request(stack.gateway.ready["model"], torch.randn(2, 64)), timeout=10
        )
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

    # a router again at the same address: the worker re-registers on its heartbeat, the gateway is ready again
    port = stack.router.address.rpartition(":")[2]
    stack.router = start_service_process("router", router_args(stack.checkpoint, int(port)))
    wait_until(lambda: probe(address) == READY, 10, "gateway SERVING once the router is back")
