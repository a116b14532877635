"""Metrics on by default: documented ports per service, `--metrics-port 0` and `--no-metrics`, and a
real service process that serves /metrics (or none) and logs JSON lines when asked."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from typer.testing import CliRunner

from moe_serve.cli.main import app
from moe_serve.cluster.launcher import gateway_settings
from moe_serve.config import (
    GATEWAY_METRICS_PORT,
    ROUTER_METRICS_PORT,
    WORKER_METRICS_PORT,
    GatewaySettings,
    RouterSettings,
    UpSettings,
    WorkerSettings,
)
from moe_serve.runtime.grpc_utils import LIVENESS_SERVICE, READY_MARKER
from tests.deploy_config import built_settings
from tests.helpers import save_tiny_mixtral


@pytest.fixture
def default_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment a user has: no MOE_SERVE_METRICS_PORT (the test run sets 0 for its services)."""
    monkeypatch.delenv("MOE_SERVE_METRICS_PORT", raising=False)
    monkeypatch.delenv("MOE_SERVE_METRICS", raising=False)


def test_every_service_has_a_default_metrics_port(default_environment: None, tmp_path: Path) -> None:
    assert (GATEWAY_METRICS_PORT, ROUTER_METRICS_PORT, WORKER_METRICS_PORT) == (8002, 8012, 8022)
    assert GatewaySettings().prometheus_port == 8002  # Triton's metrics port, beside gRPC on 8001
    assert UpSettings().prometheus_port == 8002  # `up`: its gateway's
    assert RouterSettings(checkpoint=tmp_path).prometheus_port == 8012
    assert WorkerSettings(checkpoint=tmp_path).prometheus_port == 8022
    # the internal delivery port no longer defaults to or documents 8002
    assert GatewaySettings().delivery_port != GATEWAY_METRICS_PORT


def test_metrics_flags_reach_the_settings(default_environment: None) -> None:
    assert built_settings(["up"], {}).prometheus_port == 8002
    assert built_settings(["up", "--metrics-port", "0"], {}).prometheus_port == 0
    assert built_settings(["up", "--no-metrics"], {}).prometheus_port is None
    assert built_settings(["gateway", "--no-metrics"], {}).prometheus_port is None
    assert built_settings(["router", "--checkpoint", "x", "--metrics-port", "9100"], {}).prometheus_port == 9100
    assert built_settings(["worker", "--checkpoint", "x"], {"MOE_SERVE_METRICS": "false"}).prometheus_port is None
    assert built_settings(["up", "--log-format", "json"], {}).log_format == "json"


@pytest.mark.parametrize("command", ["up", "gateway", "router", "worker"])
def test_help_documents_the_metrics_defaults(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "8002" in result.output and "--no-metrics" in result.output and "--log-format" in result.output


def test_up_passes_no_metrics_to_its_gateway(tmp_path: Path) -> None:
    def gateway(**up: object) -> GatewaySettings:
        return gateway_settings(UpSettings(**up), tmp_path, "m", router_address="127.0.0.1:1")

    assert gateway(metrics=False).prometheus_port is None
    assert gateway(metrics_port=0).prometheus_port == 0
    assert gateway(metrics_port=0, log_format="json").log_format == "json"


SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def run_router(checkpoint: Path, *flags: str) -> tuple[dict, str]:
    """Start `moe-serve router` (no workers: it serves, not ready), read its ready line, scrape its
    metrics endpoint if it has one, probe its health, SIGTERM it; returns (ready line, stderr)."""
    router = subprocess.Popen(
        [sys.executable, "-m", "moe_serve", "router", "--checkpoint", str(checkpoint), "--port", "0", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert router.stdout is not None
        line = router.stdout.readline()
        assert line.startswith(READY_MARKER), line + (router.stderr.read() if router.stderr else "")
        ready = json.loads(line[len(READY_MARKER) :])
        if ready["metrics_address"]:
            port = ready["metrics_address"].rpartition(":")[2]
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
                assert response.status == 200
                assert response.headers["Content-Type"].startswith("text/plain")
                assert b"target_info" in response.read()  # the OpenTelemetry resource, as Prometheus text
        # what a kubelet's gRPC probes see (no credentials): alive, not ready (no worker has registered)
        with grpc.insecure_channel(ready["address"]) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            assert check(health_pb2.HealthCheckRequest(service=LIVENESS_SERVICE), timeout=10).status == SERVING
            assert check(health_pb2.HealthCheckRequest(service=""), timeout=10).status == NOT_SERVING
        # the services announce ready a moment before their SIGTERM handler is installed (a race the
        # supervision work owns); a signal inside that window would end the process with -15
        time.sleep(0.5)
        router.terminate()
        _, stderr = router.communicate(timeout=30)
    finally:
        if router.poll() is None:
            router.kill()
            router.wait()
    assert router.returncode == 0, stderr
    return ready, stderr


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_mixtral(tmp_path_factory.mktemp("ckpt") / "tiny")


def test_a_service_serves_metrics_on_a_free_port_and_logs_json_lines(tiny_checkpoint: Path) -> None:
    ready, stderr = run_router(tiny_checkpoint, "--metrics-port", "0", "--log-format", "json")
    assert ready["metrics_address"]  # scraped in run_router
    entries = [json.loads(line) for line in stderr.splitlines()]  # every line, not only some
    assert {entry["logger"] for entry in entries} >= {"router_service.server", "moe_serve.runtime.telemetry"}
    for entry in entries:
        assert set(entry) >= {"time", "level", "logger", "message", "process"}
        assert entry["time"].endswith("+00:00")


def test_no_metrics_serves_none_and_text_logs_stay_the_default(tiny_checkpoint: Path) -> None:
    ready, stderr = run_router(tiny_checkpoint, "--no-metrics")
    assert ready["metrics_address"] is None
    assert " INFO router_service.server: router for tiny" in stderr
