"""`moe-serve up` as an operator meets it: /metrics of every service printed and answering, JSON logs,
and a normal shutdown without gRPC core noise (one real `up`, its own local Ray, router as a service so
that every internal hop has a long-lived stream open when the stack stops)."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import pytest
import torch

from tests.helpers import UpCommand, infer_request, kserve_stub, response_tensors


def scrape(address: str) -> str:
    port = address.rpartition(":")[2]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        return response.read().decode()


@pytest.mark.slow
def test_up_serves_metrics_logs_json_and_stops_without_grpc_noise(tmp_path: Path) -> None:
    # the user's environment: no metrics port or gRPC verbosity set (the test run sets a metrics port)
    env = {key: value for key, value in os.environ.items() if key not in ("MOE_SERVE_METRICS_PORT", "GRPC_VERBOSITY")}
    command = ["--port", "0", "--workers", "1", "--router", "service", "--metrics-port", "0", "--log-format", "json"]
    up = UpCommand(tmp_path, command, env)
    output = up.output
    try:
        ready = up.wait_ready()
        metrics = ready["metrics"]
        assert set(metrics) == {"gateway", "router", "mixtral-demo-w0"}, metrics
        channel, stub = kserve_stub(ready["address"])
        with channel:
            hidden = torch.randn(3, 256)
            answer = response_tensors(stub.ModelInfer(infer_request("mixtral-demo", hidden), timeout=30))
        assert answer["output"].shape == (3, 256)
        assert "moe_serve_requests_total{" in scrape(metrics["gateway"])
        for name in ("router", "mixtral-demo-w0"):
            assert "target_info{" in scrape(metrics[name])
    finally:
        code = up.interrupt(90)
    text = up.text
    assert code == 0, text[-4000:]
    for name, address in metrics.items():
        assert f"metrics: {name} http://{address}/metrics" in text  # printed for people too
    assert "GOAWAY" not in text and "chttp2_transport" not in text, text[-4000:]
    # the children's log lines pass through `up` unprefixed and parse as JSON
    logged = [json.loads(line) for line in output if line.startswith("{")]
    assert {"gateway.server", "router_service.server"} <= {entry["logger"] for entry in logged}
