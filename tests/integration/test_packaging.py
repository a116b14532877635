"""Packaging, by the package registry itself: the light client installs alone in a fresh venv, and the
server resolves beside tritonclient by plain pip resolution (no --no-deps, no constraints file).

Both ask the registry (and this machine's wheel folders) and take about a minute each: slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.helpers import REPOSITORY

CLIENT_PACKAGE = REPOSITORY / "clients" / "python"
# what the light client must not bring: the server's heavy dependencies, and torch (an extra)
SERVER_ONLY = ("ray", "torch", "redis", "opentelemetry", "cryptography", "uvloop", "moe_serve")
LIGHT_CLIENT_CHECK = f"""
import importlib.util, json, sys
import numpy as np
import moe_serve_client
from moe_serve_client import GatewayError, MoEClient, ServedModelMetadata
from moe_serve_client.protocol import build_infer_request
request = build_infer_request("m", np.ones((2, 4), np.float32), 0, ["output"])
try:
    moe_serve_client.patch_model
    hint = None
except ImportError as error:
    hint = str(error)
print(json.dumps({{
    "loaded": sorted(name for name in {SERVER_ONLY!r} if name in sys.modules),
    "installed": sorted(name for name in {SERVER_ONLY!r} if importlib.util.find_spec(name) is not None),
    "request_bytes": len(request.SerializeToString()),
    "typed": (importlib.util.find_spec("moe_serve_client").submodule_search_locations[0] + "/py.typed"),
    "version": moe_serve_client.__version__,
    "hint": hint,
}}))
"""


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_light_client_installs_in_a_fresh_venv_without_ray_or_torch(tmp_path: Path) -> None:
    environment = tmp_path / "venv"
    venv.create(environment, with_pip=True)
    python = environment / "bin" / "python"
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", str(CLIENT_PACKAGE)],
        check=True,
        timeout=180,
    )
    # away from the checkout: neither PYTHONPATH nor the working directory may show it the repository's packages
    clean = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    result = subprocess.run(
        [python, "-c", LIGHT_CLIENT_CHECK],
        capture_output=True,
        text=True,
        env=clean,
        cwd=tmp_path,
        check=True,
        timeout=60,
    )
    report = json.loads(result.stdout)

    assert report["loaded"] == [] and report["installed"] == []
    assert report["request_bytes"] > 0 and report["version"] == "0.1.0"
    assert Path(report["typed"]).is_file()
    assert "pip install 'moe-serve-client[torch]'" in report["hint"]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_server_resolves_beside_tritonclient_by_plain_pip(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    # plain resolution: no constraints file, no --no-deps (pip's own configuration still applies)
    requirements = ["torch==2.13.0", str(CLIENT_PACKAGE), str(REPOSITORY), "tritonclient[grpc,http]==2.73.0"]
    pip = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run(
        [*pip, "--dry-run", "--ignore-installed", "--report", str(report_path), *requirements],
        check=True,
        timeout=360,
    )
    chosen = {
        item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"]
        for item in json.loads(report_path.read_text())["install"]
    }

    assert chosen["tritonclient"] == "2.73.0" and chosen["moe-serve"] == "0.1.0"
    assert chosen["moe-serve-client"] == "0.1.0"
    assert chosen["protobuf"].startswith("6."), chosen["protobuf"]  # tritonclient[grpc]: protobuf<7
    assert int(chosen["greenlet"].split(".")[1]) < 4, chosen["greenlet"]  # tritonclient[http]: greenlet<3.4
