"""The command line as users run it: every subcommand's --help, and `moe-serve up` + `moe-serve infer`."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from typer.testing import CliRunner

from moe_serve.cli.cluster_commands import ClusterInfo
from moe_serve.cli.main import app
from moe_serve.protos import moe_serve_pb2 as moe_pb2
from moe_serve.protos import moe_serve_pb2_grpc as moe_grpc
from moe_serve.runtime.security import CLUSTER_SECRET_ENV, ClusterCredentials, open_channel
from tests.helpers import UpCommand, infer_request, kserve_stub, response_tensors

COMMANDS = ["up", "gateway", "router", "worker", "infer", "init-demo", "scale", "status", "bench", "soak", "health"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_invalid_setting_is_reported_without_a_trace() -> None:
    result = CliRunner().invoke(app, ["router", "--checkpoint", "x", "--port", "99999"])
    assert result.exit_code == 2
    assert "port" in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_up_on_the_demo_checkpoint_then_infer(tmp_path: Path) -> None:
    """Exactly the README's path: no checkpoint given, a local Ray started by `up` itself, no cluster
    secret given (`up` makes one)."""
    env = {key: value for key, value in os.environ.items() if key != CLUSTER_SECRET_ENV}
    up = UpCommand(tmp_path, ["--port", "0", "--workers", "2"], env)
    output = up.output
    try:
        ready = up.wait_ready()
        assert ready["model"] == "mixtral-demo"
        assert (tmp_path / ".moe-serve" / "mixtral-demo" / "config.json").is_file()
        assert_internal_hops_authenticated(tmp_path / ".moe-serve" / "cluster.json", up.process.pid)

        def cli(*args: str, timeout_s: float = 120, cwd: Path | None = tmp_path) -> subprocess.CompletedProcess:
            return subprocess.run(
                [sys.executable, "-m", "moe_serve", *args],
                cwd=cwd,
                capture_output=True,
                text=True,
                timeout=timeout_s,
                env=env,
            )

        # the commands that change nothing run side by side (each is an interpreter's start-up and
        # imports, mostly), while this process checks REST against gRPC
        with ThreadPoolExecutor(4) as pool:
            infer = pool.submit(
                cli, "infer", "--url", ready["address"], "--tokens", "5", "--repeat", "3", timeout_s=60, cwd=None
            )
            status = pool.submit(cli, "status")
            before = pool.submit(cli, "status", "--json")
            refused = pool.submit(cli, "scale", "--expert", "1")
            assert_rest_equals_grpc(ready["http_address"], ready["address"], ready["model"])
            assert f"REST http://{ready['http_address']}/v2" in "".join(output)
        infer, status, before, refused = infer.result(), status.result(), before.result(), refused.result()
        assert infer.returncode == 0, infer.stdout + infer.stderr
        assert "FP32 [5, 256]" in infer.stdout and "latency p50" in infer.stdout
        assert status.returncode == 0, status.stdout + status.stderr
        assert "placement" in status.stdout and "replicas per expert" in status.stdout
        before = json.loads(before.stdout)
        assert [w["worker_id"] for w in before["workers"]] == ["mixtral-demo-w0", "mixtral-demo-w1"]
        assert refused.returncode == 2 and "--replicas" in refused.stderr
        scaled = cli("scale", "--expert", "1", "--replicas", "2")
        assert scaled.returncode == 0, scaled.stdout + scaled.stderr
        with ThreadPoolExecutor(2) as pool:
            after = pool.submit(cli, "status", "--json")
            again = pool.submit(cli, "infer", "--url", ready["address"], "--tokens", "64", timeout_s=60, cwd=None)
        after = json.loads(after.result().stdout)
        assert {w["worker_id"] for w in after["workers"]} == {"mixtral-demo-w0", "mixtral-demo-w1", "mixtral-demo-w2"}
        assert after["replicas"]["0:1"] == after["replicas"]["1:1"] == 2 and after["replicas"]["0:2"] == 1
        again = again.result()
        assert again.returncode == 0, again.stdout + again.stderr
    finally:
        code = up.interrupt(60)
    assert code == 0, "".join(output[-40:])
    assert not (tmp_path / ".moe-serve" / "cluster.secret").exists()  # the stack's secret goes with it


def assert_internal_hops_authenticated(cluster_file: Path, up_pid: int) -> None:
    """`up` made a cluster secret: kept 0600 for tools, on no command line, refused without."""
    info = json.loads(cluster_file.read_text())
    secret_file = Path(info["secret_file"])
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    secret = secret_file.read_text().strip()
    assert len(secret) >= 32
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            assert secret.encode() not in cmdline.read_bytes(), cmdline
        except OSError:  # the process ended meanwhile
            continue
    with grpc.insecure_channel(info["router"]) as channel, pytest.raises(grpc.RpcError) as refused:
        moe_grpc.RouterStub(channel).ListWorkers(moe_pb2.ListWorkersRequest(), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    credentials = ClusterCredentials(secret.encode())
    with open_channel(info["router"], [], credentials) as channel:
        assert len(moe_grpc.RouterStub(channel).ListWorkers(moe_pb2.ListWorkersRequest(), timeout=10).workers) == 2


def test_status_of_a_cluster_that_does_not_answer_fails_within_its_timeout(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on once the probe is closed
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    cluster_file = tmp_path / "cluster.json"
    ClusterInfo(address, "no-controller", "moe-serve", "gateway:1", "router:1", "m").write(cluster_file)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "moe_serve", "status", "--cluster-file", str(cluster_file), "--timeout", "2"],
        capture_output=True,
        text=True,
        timeout=60,  # Ray on its own retries for minutes
    )
    # 2 s of waiting plus the interpreter's and Ray's imports
    assert time.monotonic() - started < 20
    assert result.returncode == 1, result.stdout + result.stderr
    message = " ".join(result.stderr.split())  # rich wraps long lines
    assert f"the Ray cluster at {address} did not answer within 2 s" in message and "ray status" in message
    assert "Traceback" not in result.stderr


def test_health_command_reports_serving(fp32_stack) -> None:
    result = CliRunner().invoke(app, ["health", fp32_stack.address])
    assert result.exit_code == 0, result.output
    assert "SERVING" in result.output
    result = CliRunner().invoke(app, ["health", "127.0.0.1:1", "--timeout", "0.5"])
    assert result.exit_code == 1


def assert_rest_equals_grpc(http_address: str, grpc_address: str, model: str) -> None:
    """`up` serves KServe v2 REST too (curl's JSON request), with the gRPC port's answer to the bit."""
    hidden = torch.randn(3, 256, generator=torch.Generator().manual_seed(2))
    tensor = {"name": "hidden_states", "datatype": "FP32", "shape": [3, 256], "data": hidden.tolist()}
    body = json.dumps({"inputs": [tensor], "parameters": {"layer": 1}}).encode()
    request = urllib.request.Request(f"http://{http_address}/v2/models/{model}/infer", body)
    with urllib.request.urlopen(request, timeout=60) as response:
        (output,) = json.loads(response.read())["outputs"]
    channel, stub = kserve_stub(grpc_address)
    with channel:
        expected = response_tensors(stub.ModelInfer(infer_request(model, hidden, layer=1), timeout=60))["output"]
    assert torch.equal(torch.tensor(output["data"], dtype=torch.float32).reshape(3, 256), expected)
