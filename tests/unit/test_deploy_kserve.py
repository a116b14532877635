"""The KServe ServingRuntime and InferenceService example, checked structurally (no Kubernetes runs here):
the transports KServe expects on the ports the real `moe-serve up` flags bind, and arguments the real
command line parses into valid settings."""

from __future__ import annotations

from typing import Any

import yaml

from moe_serve.config import UpSettings
from tests.deploy_config import DEPLOY, built_settings, flag

MANIFESTS = [
    document
    for path in sorted((DEPLOY / "kubernetes" / "kserve").glob("*.yaml"))
    for document in yaml.safe_load_all(path.read_text())
    if document
]


def one(kind: str) -> dict[str, Any]:
    (found,) = [document for document in MANIFESTS if document["kind"] == kind]
    return found


RUNTIME, SERVICE = one("ServingRuntime"), one("InferenceService")
(CONTAINER,) = RUNTIME["spec"]["containers"]


def test_kinds_and_api_versions() -> None:
    assert sorted(d["kind"] for d in MANIFESTS) == ["InferenceService", "ServingRuntime"]
    assert RUNTIME["apiVersion"] == "serving.kserve.io/v1alpha1"
    assert SERVICE["apiVersion"] == "serving.kserve.io/v1beta1"
    assert CONTAINER["name"] == "kserve-container"  # the name KServe merges the predictor's settings into


def test_kserve_v2_on_both_transports_at_the_ports_the_flags_bind() -> None:
    assert set(RUNTIME["spec"]["protocolVersions"]) == {"v2", "grpc-v2"}
    ports = {port["name"]: port["containerPort"] for port in CONTAINER["ports"]}
    # KServe (and Knative) name gRPC's port h2c (HTTP/2 cleartext) and REST's http1
    assert ports == {"h2c": 8001, "http1": 8000}
    args = CONTAINER["args"]
    assert int(flag(args, "--port")) == ports["h2c"] and int(flag(args, "--http-port")) == ports["http1"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert CONTAINER[probe]["httpGet"]["port"] == ports["http1"]
    assert CONTAINER["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert CONTAINER["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    annotations = RUNTIME["spec"]["annotations"]
    assert annotations["prometheus.kserve.io/port"] == flag(args, "--metrics-port")
    # two ports on one container need RawDeployment (Knative's Serverless mode allows one)
    assert SERVICE["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"


def test_args_are_real_moe_serve_up_flags_with_valid_values() -> None:
    args = [arg.replace("{{.Name}}", SERVICE["metadata"]["name"]) for arg in CONTAINER["args"]]
    env = {item["name"]: item["value"] for item in CONTAINER.get("env", [])}
    settings = built_settings(args, env)  # the real `moe-serve` command line parses them, then stops
    assert isinstance(settings, UpSettings)
    assert settings.host == "0.0.0.0" and settings.http and (settings.port, settings.http_port) == (8001, 8000)
    assert str(settings.checkpoint) == "/mnt/models"  # where KServe's storage initializer puts storageUri
    assert settings.model_name == SERVICE["metadata"]["name"]


def test_the_inference_service_selects_this_runtime_and_its_model_format() -> None:
    model = SERVICE["spec"]["predictor"]["model"]
    assert model["runtime"] == RUNTIME["metadata"]["name"]
    formats = {(f["name"], f["version"]) for f in RUNTIME["spec"]["supportedModelFormats"]}
    assert (model["modelFormat"]["name"], model["modelFormat"]["version"]) in formats
    assert model["storageUri"].startswith(("pvc://", "s3://", "gs://", "hf://", "https://"))
