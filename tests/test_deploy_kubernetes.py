"""The KubeRay manifests, checked structurally (no Kubernetes runs here)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import ray
import yaml

from gateway.readiness import LIVENESS_SERVICE
from moe_serve.config import GatewaySettings, RouterSettings, WorkersSettings
from tests.deploy_config import (
    DEPLOY,
    SERVICES,
    built_settings,
    flag,
    ray_start_params,
)

KUBERNETES = [
    document
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml"))
    for document in yaml.safe_load_all(path.read_text())
    if document
]
API_VERSIONS = {"RayCluster": "ray.io/v1", "Deployment": "apps/v1", "Service": "v1"}


def kube(kind: str, name: str | None = None) -> Any:
    found = [d for d in KUBERNETES if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert found, f"no {kind} {name or ''}"
    return found[0] if name else found


def container(deployment: str) -> dict[str, Any]:
    (only,) = kube("Deployment", deployment)["spec"]["template"]["spec"]["containers"]
    return only


def kube_env(spec: Mapping[str, Any]) -> dict[str, str]:
    """A container's environment as the pod would see it (fieldRefs resolved to a sample pod IP)."""
    env = {}
    for item in spec.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        elif item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "status.podIP":
            env[item["name"]] = "10.1.2.3"
    return env


def kube_args(spec: Mapping[str, Any]) -> list[str]:
    assert spec.get("command") in (None, ["moe-serve-ray-driver"])
    return list(spec["args"])


def test_kubernetes_manifests_have_the_right_kinds_and_api_versions() -> None:
    assert sorted(d["kind"] for d in KUBERNETES) == sorted(["RayCluster", *["Deployment"] * 4, *["Service"] * 3])
    for document in KUBERNETES:
        assert document["apiVersion"] == API_VERSIONS[document["kind"]]
    for image in re.findall(
        r"^\s*image: (\S+)$", "".join(p.read_text() for p in (DEPLOY / "kubernetes").glob("*.yaml")), re.M
    ):
        assert re.fullmatch(r"[\w./-]+:v?\d+(\.\d+)+(-[a-z0-9.-]+)?", image), f"{image} is not pinned"
    assert {d["metadata"]["name"] for d in kube("Deployment")} == {
        "moe-serve-redis",
        "moe-serve-router",
        "moe-serve-gateway",
        "moe-serve-workers",
    }


def test_ray_cluster_has_a_resource_free_head_and_gpu_worker_groups() -> None:
    cluster = kube("RayCluster")[0]["spec"]
    assert cluster["rayVersion"] == ray.__version__  # every node runs the image's Ray
    head = cluster["headGroupSpec"]
    head_params = ray_start_params(["start", "--head", *(f"--{k}={v}" for k, v in head["rayStartParams"].items())])
    assert head_params["num_cpus"] == 0 and head_params["num_gpus"] == 0
    assert head["template"]["spec"]["containers"][0]["image"] == SERVICES["ray-head"]["image"]
    assert cluster["workerGroupSpecs"]
    for group in cluster["workerGroupSpecs"]:
        ray_start_params(["start", *(f"--{k}={v}" for k, v in group["rayStartParams"].items())])
        (node,) = group["template"]["spec"]["containers"]
        assert node["resources"]["limits"]["nvidia.com/gpu"] >= 1
        assert node["resources"]["requests"]["nvidia.com/gpu"] == node["resources"]["limits"]["nvidia.com/gpu"]
        assert node["image"] == SERVICES["ray-worker-gpu"]["image"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert "args" not in node  # KubeRay appends container args to its own `ray start`


def test_kubernetes_containers_run_real_subcommands_whose_settings_validate() -> None:
    router = built_settings(kube_args(container("moe-serve-router")), kube_env(container("moe-serve-router")))
    gateway = built_settings(kube_args(container("moe-serve-gateway")), kube_env(container("moe-serve-gateway")))
    workers = built_settings(kube_args(container("moe-serve-workers")), kube_env(container("moe-serve-workers")))
    assert (type(router), type(gateway), type(workers)) == (RouterSettings, GatewaySettings, WorkersSettings)
    # workers deliver to the gateway replica that asked, so gateway and router advertise their pod IPs
    assert router.advertise_host == gateway.advertise_host == "10.1.2.3"
    assert workers.advertise_host is None  # each worker actor advertises its own pod's address
    assert workers.worker_num_gpus == 1 and workers.workers >= 1
    assert container("moe-serve-workers")["command"] == ["moe-serve-ray-driver"]
    for settings in (router, gateway, workers):
        assert settings.host == "0.0.0.0"
        assert settings.redis_url == f"redis://moe-serve-redis:{_service_port('moe-serve-redis', 'redis')}/0"
    assert str(router.checkpoint) == str(workers.checkpoint) == "/models/mixtral-demo"


def _service_port(name: str, port_name: str) -> int:
    service = kube("Service", name)
    return next(p["port"] for p in service["spec"]["ports"] if p["name"] == port_name)


def _container_port(spec: Mapping[str, Any], port_name: str) -> int:
    return next(p["containerPort"] for p in spec["ports"] if p["name"] == port_name)


def test_kubernetes_addresses_services_and_ray_auth_are_consistent() -> None:
    router, gateway, workers = (container(f"moe-serve-{n}") for n in ("router", "gateway", "workers"))
    router_port = int(flag(kube_args(router), "--port"))
    assert _container_port(router, "grpc") == router_port == _service_port("moe-serve-router", "grpc")
    router_address = f"moe-serve-router:{router_port}"
    assert flag(kube_args(gateway), "--router-address") == router_address
    assert flag(kube_args(workers), "--router-address") == router_address
    assert _container_port(gateway, "grpc") == int(flag(kube_args(gateway), "--port"))
    assert _container_port(gateway, "delivery") == int(flag(kube_args(gateway), "--delivery-port"))
    for name in ("router", "gateway"):
        assert _container_port(container(f"moe-serve-{name}"), "metrics") == int(
            kube_env(container(f"moe-serve-{name}"))["MOE_SERVE_METRICS_PORT"]
        )
    # KubeRay names the head's Service <cluster>-head-svc; the GCS listens on the head's gcs-server port
    cluster = kube("RayCluster")[0]
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head_address = f"{cluster['metadata']['name']}-head-svc:{_container_port(head, 'gcs-server')}"
    assert flag(kube_args(workers), "--ray-address") == head_address
    # Services select the pods of their Deployment
    for service in kube("Service"):
        deployment = kube("Deployment", service["metadata"]["name"])
        assert service["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    # one workers driver per stack (its controller is a named actor): never two during a rollout
    driver = kube("Deployment", "moe-serve-workers")["spec"]
    assert driver["replicas"] == 1 and driver["strategy"]["type"] == "Recreate"
    # token authentication from one Secret on every Ray process: head, GPU workers, autoscaler, driver
    ray_envs = [
        head["env"],
        *(g["template"]["spec"]["containers"][0]["env"] for g in cluster["spec"]["workerGroupSpecs"]),
        cluster["spec"]["autoscalerOptions"]["env"],
        workers["env"],
    ]
    for env in ray_envs:
        by_name = {item["name"]: item for item in env}
        assert by_name["RAY_AUTH_MODE"]["value"] == "token"
        assert by_name["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {
            "name": "moe-serve-ray-token",
            "key": "auth_token",
        }


def test_kubernetes_pods_that_read_the_checkpoint_mount_it_and_write_the_demo_first() -> None:
    cluster = kube("RayCluster")[0]["spec"]
    pods = [
        cluster["headGroupSpec"]["template"]["spec"],
        *(group["template"]["spec"] for group in cluster["workerGroupSpecs"]),
        kube("Deployment", "moe-serve-router")["spec"]["template"]["spec"],
        kube("Deployment", "moe-serve-workers")["spec"]["template"]["spec"],
    ]
    checkpoint = kube_env(container("moe-serve-router"))["MOE_SERVE_CHECKPOINT"]
    for pod in pods:
        (writer,) = pod["initContainers"]
        assert kube_env(writer)["MOE_SERVE_CHECKPOINT"] == checkpoint
        assert 'exec moe-serve init-demo "$MOE_SERVE_CHECKPOINT"' in writer["args"][0]
        assert 'if [ -f "$MOE_SERVE_CHECKPOINT/config.json" ]' in writer["args"][0]
        mounts = {m["mountPath"]: m for c in pod["containers"] for m in c.get("volumeMounts", [])}
        assert mounts["/models"]["name"] == "models" and mounts["/models"].get("readOnly") is True
        assert pod["securityContext"]["runAsNonRoot"] is True


def test_internal_callers_take_the_cluster_secret_from_a_kubernetes_secret() -> None:
    for deployment in ("moe-serve-router", "moe-serve-gateway", "moe-serve-workers"):
        (reference,) = [item for item in container(deployment)["env"] if item["name"] == "MOE_SERVE_CLUSTER_SECRET"]
        assert reference["valueFrom"]["secretKeyRef"] == {"name": "moe-serve-cluster-secret", "key": "secret"}
    header = (DEPLOY / "kubernetes" / "moe-serve.yaml").read_text()
    assert "kubectl create secret generic moe-serve-cluster-secret --from-literal=secret=" in header


def test_gateway_probes_ask_readiness_and_liveness_apart() -> None:
    gateway = container("moe-serve-gateway")
    assert gateway["readinessProbe"]["grpc"] == {"port": 8001}  # "": readiness (the router and every expert)
    assert gateway["livenessProbe"]["grpc"] == {"port": 8001, "service": LIVENESS_SERVICE}
