"""The KubeRay manifests, checked structurally (no Kubernetes runs here)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import ray
import yaml

from moe_serve.config import GATEWAY_METRICS_PORT, ROUTER_METRICS_PORT, GatewaySettings, RouterSettings, WorkersSettings
from moe_serve.runtime.grpc_utils import LIVENESS_SERVICE
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
API_VERSIONS = {"RayCluster": "ray.io/v1", "Deployment": "apps/v1", "Service": "v1", "PodDisruptionBudget": "policy/v1"}


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
    kinds = ["RayCluster", *["Deployment"] * 4, *["Service"] * 4, *["PodDisruptionBudget"] * 2]
    assert sorted(d["kind"] for d in KUBERNETES) == sorted(kinds)
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
    assert _service_port("moe-serve-router-api", "grpc") == router_port
    # the gateways route over the headless Service (every ready router); the workers driver registers
    # through the API Service, which lists routers before they are ready
    assert flag(kube_args(gateway), "--router-address") == f"dns:///moe-serve-router:{router_port}"
    assert flag(kube_args(workers), "--router-address") == f"moe-serve-router-api:{router_port}"
    assert _container_port(gateway, "grpc") == int(flag(kube_args(gateway), "--port"))
    # KServe v2 HTTP/REST beside gRPC, on the container and on the Service
    assert _container_port(gateway, "http") == int(flag(kube_args(gateway), "--http-port")) == 8000
    assert _service_port("moe-serve-gateway", "http") == 8000 and _service_port("moe-serve-gateway", "grpc") == 8001
    assert built_settings(kube_args(gateway), kube_env(gateway)).http
    assert _container_port(gateway, "delivery") == int(flag(kube_args(gateway), "--delivery-port"))
    # Prometheus on the documented default ports (Triton's 8002 for the gateway); the delivery port moved off it
    for name, default in (("router", ROUTER_METRICS_PORT), ("gateway", GATEWAY_METRICS_PORT)):
        spec = container(f"moe-serve-{name}")
        assert _container_port(spec, "metrics") == int(kube_env(spec)["MOE_SERVE_METRICS_PORT"]) == default
        assert _service_port(f"moe-serve-{name}", "metrics") == default
    assert _container_port(gateway, "delivery") != GATEWAY_METRICS_PORT
    # KubeRay names the head's Service <cluster>-head-svc; the GCS listens on the head's gcs-server port
    cluster = kube("RayCluster")[0]
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head_address = f"{cluster['metadata']['name']}-head-svc:{_container_port(head, 'gcs-server')}"
    assert flag(kube_args(workers), "--ray-address") == head_address
    # Services select the pods of their Deployment
    for service in kube("Service"):
        deployment = kube("Deployment", service["metadata"]["name"].removesuffix("-api"))
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


def test_gateway_and_router_probes_ask_readiness_and_liveness_apart() -> None:
    """gRPC probes with the health service names the servers register: "" is readiness (gateway: the router
    and every expert answer; router: every expert has a live replica), LIVENESS_SERVICE the process itself."""
    for name, port in (("gateway", 8001), ("router", 8010)):
        spec = container(f"moe-serve-{name}")
        assert spec["readinessProbe"]["grpc"] == {"port": port}
        assert spec["livenessProbe"]["grpc"] == {"port": port, "service": LIVENESS_SERVICE}


def test_several_routers_share_the_load_of_every_gateway() -> None:
    router_service = kube("Service", "moe-serve-router")["spec"]
    assert router_service["clusterIP"] == "None"  # headless: its DNS name resolves to every ready router pod
    assert kube("Service", "moe-serve-router-api")["spec"]["publishNotReadyAddresses"] is True
    routers = kube("Deployment", "moe-serve-router")["spec"]["replicas"]
    gateway = built_settings(kube_args(container("moe-serve-gateway")), kube_env(container("moe-serve-gateway")))
    assert routers >= 2 and gateway.router_streams >= routers  # a RouteStream for each router at least


def test_disruption_budgets_keep_a_gateway_and_a_router() -> None:
    for name in ("moe-serve-gateway", "moe-serve-router"):
        budget = kube("PodDisruptionBudget", name)["spec"]
        deployment = kube("Deployment", name)["spec"]
        assert budget["selector"]["matchLabels"] == deployment["template"]["metadata"]["labels"]
        assert 1 <= budget["minAvailable"] < deployment["replicas"]  # a drain evicts one pod at a time
        assert budget["unhealthyPodEvictionPolicy"] == "AlwaysAllow"  # a pod that is not ready never blocks it


def _pods() -> list[tuple[str, dict[str, Any]]]:
    cluster = kube("RayCluster")[0]["spec"]
    pods = [(d["metadata"]["name"], d["spec"]["template"]["spec"]) for d in kube("Deployment")]
    pods.append(("ray-head", cluster["headGroupSpec"]["template"]["spec"]))
    pods += [(f"ray-{g['groupName']}", g["template"]["spec"]) for g in cluster["workerGroupSpecs"]]
    return pods


def test_every_container_meets_the_restricted_pod_security_standard() -> None:
    """allowPrivilegeEscalation false, every capability dropped, non-root, RuntimeDefault seccomp, and a
    read-only root filesystem with emptyDir volumes mounted where the processes write."""
    checked = 0
    for pod_name, pod in _pods():
        volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
        for spec in [*pod.get("initContainers", []), *pod["containers"]]:
            where = f"{pod_name}/{spec['name']}"
            effective = {**pod.get("securityContext", {}), **spec.get("securityContext", {})}
            assert effective.get("allowPrivilegeEscalation") is False, where
            assert effective.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not effective.get("capabilities", {}).get("add"), where
            assert effective.get("runAsNonRoot") is True and effective.get("runAsUser", 0) != 0, where
            assert effective.get("seccompProfile") == {"type": "RuntimeDefault"}, where
            assert effective.get("privileged") is not True, where
            assert effective.get("readOnlyRootFilesystem") is True, where
            mounts = {m["mountPath"]: m["name"] for m in spec.get("volumeMounts", [])}
            writable = ["/data"] if spec["image"].startswith("redis:") else ["/tmp"]
            for path in writable:
                assert path in mounts and "emptyDir" in volumes[mounts[path]], f"{where}: {path} is not writable"
            checked += 1
    assert checked == 10  # redis, router (+ init), gateway, workers (+ init), Ray head (+ init), Ray GPU (+ init)
