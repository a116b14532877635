"""docker-compose.yml's topology as local processes, each started with its compose command and environment.

Only what names the compose network is translated: `redis` is the real Redis server (under this test's own key
prefix), `ray-head` the session's Ray cluster, `router:8010` the router process's address, fixed ports become free
ones and advertised service names 127.0.0.1. The OTLP endpoint is left unset (no collector runs here). `workers`
runs without its moe-serve-ray-driver wrapper, whose only job is to make its container a Ray node: this machine
already is one.
"""

from __future__ import annotations

import functools
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import ray
import torch

from moe_serve.cluster.controller import NAMESPACE
from moe_serve.cluster.processes import ServiceProcess, start_service_process
from moe_serve.protos import moe_serve_pb2 as moe_pb2
from moe_serve.protos import moe_serve_pb2_grpc as moe_grpc
from moe_serve.runtime.security import ClusterCredentials, open_channel
from tests.conftest import REDIS_URL
from tests.deploy_config import MOE_SERVE, SERVICES, environment, flag
from tests.helpers import (
    infer_request,
    kserve_stub,
    reference_blocks,
    reference_forward,
    response_tensors,
)

SECRET_PATH = "/var/lib/moe-serve/secret/cluster.secret"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def local_service(
    name: str, replace: dict[str, str], checkpoint: Path, redis_prefix: str, secret_file: Path
) -> tuple[list[str], dict[str, str], int | None]:
    """(args, environment, metrics port) of compose service `name` as a local process."""
    args = []
    for previous, arg in zip(["", *MOE_SERVE[name]], MOE_SERVE[name], strict=False):
        if previous in ("--port", "--http-port", "--delivery-port"):
            arg = "0"
        elif previous == "--advertise-host":
            arg = "127.0.0.1"
        args.append(replace.get(arg, arg))
    env = environment(SERVICES[name])
    assert env.pop("MOE_SERVE_REDIS_URL") == "redis://redis:6379/0"
    env["MOE_SERVE_REDIS_URL"] = REDIS_URL
    if "MOE_SERVE_CHECKPOINT" in env:
        env["MOE_SERVE_CHECKPOINT"] = str(checkpoint)
    # the secret the `cluster-secret` service wrote into its volume; no secret of the test run's
    assert env.pop("MOE_SERVE_CLUSTER_SECRET_FILE") == SECRET_PATH and env["MOE_SERVE_CLUSTER_SECRET"] == ""
    env["MOE_SERVE_CLUSTER_SECRET_FILE"] = str(secret_file)
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4317"
    env["OTEL_EXPORTER_OTLP_ENDPOINT"] = ""
    # the session's Ray cluster has its own authentication mode, which this process's environment carries
    env.pop("RAY_AUTH_MODE", None)
    env.pop("RAY_AUTH_TOKEN", None)
    metrics_port = None
    if "MOE_SERVE_METRICS_PORT" in env:
        metrics_port = free_port()
        env["MOE_SERVE_METRICS_PORT"] = str(metrics_port)
    return [*args, "--redis-prefix", redis_prefix], env, metrics_port


def registered_workers(router_address: str, credentials: ClusterCredentials) -> list[str]:
    with open_channel(router_address, [], credentials) as channel:
        reply = moe_grpc.RouterStub(channel).ListWorkers(moe_pb2.ListWorkersRequest(), timeout=5)
    return sorted(worker.worker_id for worker in reply.workers)


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def assert_prometheus_text(port: int) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        assert "# TYPE" in response.read().decode()


@pytest.mark.slow
def test_compose_topology_serves_exact_results_and_stops_cleanly(
    ray_cluster: str, checkpoints: Callable[[torch.dtype], Path], redis_prefix: str, tmp_path: Path
) -> None:
    checkpoint = checkpoints(torch.float32)
    replace = {flag(MOE_SERVE["workers"], "--ray-address"): ray_cluster}
    assert replace == {"ray-head:6379": ray_cluster}
    # the one-shot `cluster-secret` service first, its volume a local directory
    secret_file = tmp_path / "secret" / Path(SECRET_PATH).name
    command = [
        arg.replace(str(Path(SECRET_PATH).parent), str(secret_file.parent)) for arg in MOE_SERVE["cluster-secret"]
    ]
    subprocess.run([sys.executable, "-m", "moe_serve", *command], check=True, timeout=60)
    credentials = ClusterCredentials(secret_file.read_text().strip().encode())
    service = functools.partial(
        local_service, checkpoint=checkpoint, redis_prefix=redis_prefix, secret_file=secret_file
    )
    started: list[ServiceProcess] = []
    try:
        args, env, router_metrics = service("router", replace)
        router = start_service_process("router", args, env=env)
        started.append(router)
        replace[flag(MOE_SERVE["gateway"], "--router-address")] = router.address

        args, env, _ = service("workers", replace)
        assert flag(args, "--ray-address") == ray_cluster and flag(args, "--router-address") == router.address
        workers = start_service_process("workers", args, env=env, timeout_s=180)
        started.append(workers)
        # ready means every worker registered (in Redis, which the router follows)
        expected = int(flag(args, "--workers"))
        assert len(registered_workers(router.address, credentials)) == expected

        args, env, gateway_metrics = service("gateway", replace)
        gateway = start_service_process("gateway", args, env=env)
        started.append(gateway)
        model = gateway.ready["model"]
        assert model == checkpoint.name

        blocks = reference_blocks(checkpoint, torch.float32)
        channel, stub = kserve_stub(gateway.address)
        with channel:
            for layer, block in enumerate(blocks):
                hidden = torch.randn(13, 64, generator=torch.Generator().manual_seed(layer))
                request = infer_request(model, hidden, layer=layer, outputs=("output", "expert_ids"))
                result = response_tensors(stub.ModelInfer(request, timeout=30))
                output, _, ids = reference_forward(block, hidden)
                torch.testing.assert_close(result["output"], output, rtol=1e-5, atol=1e-5)
                assert torch.equal(result["expert_ids"].long(), ids.long())

        # what Prometheus scrapes: both metrics ports serve Prometheus text
        for port in (router_metrics, gateway_metrics):
            assert port is not None
            assert_prometheus_text(port)

        # SIGTERM, as `docker compose down` sends it: every process exits 0, the workers first deregister and
        # their controller leaves the Ray cluster
        assert gateway.stop() == 0
        assert workers.stop(grace_s=90) == 0
        wait_for(lambda: registered_workers(router.address, credentials) == [], "the workers to leave the registry")
        with pytest.raises(ValueError):
            ray.get_actor(workers.ready["controller"], namespace=NAMESPACE)
        assert router.stop() == 0
    finally:
        for process in reversed(started):
            process.stop()
