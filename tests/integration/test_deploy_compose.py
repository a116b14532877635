"""docker-compose.yml and the Dockerfile, checked structurally (no Docker engine runs here), and the
shell wrappers the containers run, run for real."""

from __future__ import annotations

import re
import stat
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel
from typer.testing import CliRunner

from moe_serve.cli.main import app
from moe_serve.config import (
    GATEWAY_METRICS_PORT,
    ROUTER_METRICS_PORT,
    GatewaySettings,
    RouterSettings,
    WorkersSettings,
)
from router_service.server import SERVICE_NAME as ROUTER_SERVICE
from tests.deploy_config import (
    COMPOSE,
    DEPLOY,
    DOCKERFILE,
    MOE_SERVE,
    RAW_COMPOSE,
    RAY_NODES,
    ROOT,
    SERVICES,
    VENV_BIN,
    built_settings,
    environment,
    flag,
    healthcheck,
    http_port,
    interpolate,
    parsed,
    ray_start_params,
    volume_targets,
)


def test_services_of_the_topology_are_all_there() -> None:
    assert {
        "redis",
        "ray-head",
        "ray-worker",
        "ray-worker-gpu",
        "demo-checkpoint",
        "cluster-secret",
        "workers",
        "router",
        "gateway",
    } <= set(SERVICES)
    assert {"otel-collector", "prometheus", "grafana"} <= set(SERVICES)
    assert set(MOE_SERVE) == {"demo-checkpoint", "cluster-secret", "workers", "router", "gateway"}
    assert set(RAY_NODES) == {"ray-head", "ray-worker", "ray-worker-gpu"}
    # the image's entrypoint is what services without their own run
    assert 'ENTRYPOINT ["moe-serve"]' in DOCKERFILE


@pytest.mark.parametrize(
    ("service", "settings_class"),
    [("router", RouterSettings), ("gateway", GatewaySettings), ("workers", WorkersSettings)],
)
def test_every_service_runs_a_real_subcommand_whose_settings_validate(
    service: str, settings_class: type[BaseModel]
) -> None:
    settings = built_settings(MOE_SERVE[service], environment(SERVICES[service]))
    assert type(settings) is settings_class
    assert settings.host == "0.0.0.0"
    assert settings.redis_url == "redis://redis:6379/0"
    if service != "gateway":
        assert str(settings.checkpoint) == "/models/mixtral-demo"
    if service in ("router", "gateway"):
        # the documented default ports, set explicitly (Prometheus scrapes them)
        assert settings.metrics_port == {"router": ROUTER_METRICS_PORT, "gateway": GATEWAY_METRICS_PORT}[service]


def test_every_internal_caller_reads_the_secret_the_one_shot_service_writes() -> None:
    """`docker compose up` with nothing set: one random secret per deployment, in a volume only the
    services mount, read by every service that serves or calls an internal hop."""
    writer = MOE_SERVE["cluster-secret"]
    assert writer[0] == "secret" and SERVICES["cluster-secret"]["restart"] == "no"
    written = Path(parsed(writer)["path"])
    assert volume_targets(SERVICES["cluster-secret"])[str(written.parent)] == ("cluster-secret", False)
    assert "cluster-secret" in COMPOSE["volumes"]
    for name in ("router", "gateway", "workers"):
        settings = built_settings(MOE_SERVE[name], environment(SERVICES[name]))
        assert settings.cluster_secret_file == written and not settings.insecure_internal, name
        assert not settings.cluster_secret.get_secret_value(), name  # unset: the file is read
        assert volume_targets(SERVICES[name])[str(written.parent)] == ("cluster-secret", True), name
        assert SERVICES[name]["depends_on"]["cluster-secret"]["condition"] == "service_completed_successfully"
    # a secret given in the shell or .env reaches every service instead
    custom = interpolate(RAW_COMPOSE, {"MOE_SERVE_CLUSTER_SECRET": "from-the-operator-0123456789"})["services"]
    for name in ("router", "gateway", "workers"):
        assert custom[name]["environment"]["MOE_SERVE_CLUSTER_SECRET"] == "from-the-operator-0123456789"
    # the image gives the volume's mount point to the services' user alone
    assert "chmod 0700 /var/lib/moe-serve/secret" in DOCKERFILE and str(written.parent) == "/var/lib/moe-serve/secret"


def test_secret_writer_writes_once_and_keeps_an_existing_secret(tmp_path: Path) -> None:
    path = tmp_path / "volume" / "cluster.secret"
    first = CliRunner().invoke(app, ["secret", str(path)])
    assert first.exit_code == 0, first.output
    secret = path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(secret.strip()) >= 32
    again = CliRunner().invoke(app, ["secret", str(path)])
    assert again.exit_code == 0 and path.read_text() == secret  # a restart keeps the deployment's secret
    replaced = CliRunner().invoke(app, ["secret", str(path), "--replace"])
    assert replaced.exit_code == 0 and path.read_text() != secret


def test_demo_checkpoint_command_parses() -> None:
    params = parsed(MOE_SERVE["demo-checkpoint"])
    assert MOE_SERVE["demo-checkpoint"][0] == "init-demo"
    # it writes where the services read
    assert str(params["directory"]) == environment(SERVICES["demo-checkpoint"])["MOE_SERVE_CHECKPOINT"]
    assert SERVICES["demo-checkpoint"]["restart"] == "no"


def test_ray_nodes_run_real_ray_start_flags() -> None:
    head = ray_start_params(SERVICES["ray-head"]["command"])
    assert head["head"] and head["block"] and head["port"] == 6379
    for name in ("ray-worker", "ray-worker-gpu"):
        node = ray_start_params(SERVICES[name]["command"])
        assert node["address"] == f"ray-head:{head['port']}" and node["block"] and not node["head"]
        assert SERVICES[name]["depends_on"]["ray-head"]["condition"] == "service_healthy"
    for spec in RAY_NODES.values():
        assert spec["init"] is True  # reaps the daemons `ray start` leaves behind
        assert spec["image"].startswith("moe-serve")  # Ray nodes run the actors: same Python, Ray and moe-serve


def test_every_long_running_service_has_a_working_health_check() -> None:
    for name, spec in SERVICES.items():
        if spec.get("restart") == "no":
            continue
        assert "healthcheck" in spec, f"{name} has no health check"
    # ours: grpc.health.v1 through `moe-serve health`, on the port each listens on
    for name in ("router", "gateway"):
        check = healthcheck(name)
        assert check[:2] == ["moe-serve", "health"]
        assert parsed(check[1:])["address"] == f"127.0.0.1:{flag(MOE_SERVE[name], '--port')}"
    # the workers driver serves nothing itself: it is healthy when its router sees a replica of every expert
    check = parsed(healthcheck("workers")[1:])
    assert check["address"] == flag(MOE_SERVE["workers"], "--router-address")
    assert check["service"] == ROUTER_SERVICE
    # Ray: the GCS on the head, the local raylet (through the node's agent) on worker nodes
    head = healthcheck("ray-head")
    assert (
        head[:2] == ["ray", "health-check"]
        and head[3] == f"127.0.0.1:{ray_start_params(SERVICES['ray-head']['command'])['port']}"
    )
    for name in ("ray-worker", "ray-worker-gpu"):
        agent_port = ray_start_params(SERVICES[name]["command"])["dashboard_agent_listen_port"]
        assert healthcheck(name)[-1] == f"http://127.0.0.1:{agent_port}/api/local_raylet_healthz"
    assert healthcheck("redis") == ["redis-cli", "ping"]
    assert healthcheck("prometheus")[-1] == "http://127.0.0.1:9090/-/healthy"
    assert healthcheck("grafana")[-1] == "http://127.0.0.1:3000/api/health"
    collector = yaml.safe_load((DEPLOY / "otel-collector" / "config.yaml").read_text())
    health_port = int(collector["extensions"]["health_check"]["endpoint"].rpartition(":")[2])
    assert http_port(healthcheck("otel-collector")[-1]) == health_port
    # the collector image has no shell or HTTP client of its own: ours adds the busybox the check runs
    assert healthcheck("otel-collector")[0] == "/usr/local/bin/busybox"
    assert (
        "COPY --from=busybox /bin/busybox /usr/local/bin/busybox"
        in (DEPLOY / "otel-collector" / "Dockerfile").read_text()
    )


def test_addresses_ports_and_hostnames_are_consistent() -> None:
    router, gateway, workers = MOE_SERVE["router"], MOE_SERVE["gateway"], MOE_SERVE["workers"]
    router_address = f"router:{flag(router, '--port')}"
    assert flag(gateway, "--router-address") == router_address
    assert flag(workers, "--router-address") == router_address
    assert flag(router, "--advertise-host") == "router"
    # workers on the Ray nodes deliver expert outputs to the address the gateway advertises: its service name
    # and a fixed delivery port
    assert flag(gateway, "--advertise-host") == "gateway"
    assert int(flag(gateway, "--delivery-port")) > 0
    # both KServe v2 transports published: gRPC and HTTP/REST
    published = [f"{flag(gateway, port)}:{flag(gateway, port)}" for port in ("--port", "--http-port")]
    assert SERVICES["gateway"]["ports"] == published == ["8001:8001", "8000:8000"]
    assert built_settings(gateway, environment(SERVICES["gateway"])).http  # REST is served, not only published
    head_port = ray_start_params(SERVICES["ray-head"]["command"])["port"]
    assert flag(workers, "--ray-address") == f"ray-head:{head_port}"
    assert SERVICES["workers"]["entrypoint"] == ["moe-serve-ray-driver"]  # a Ray driver must run on a Ray node
    # compose stops dependents first: the workers driver drains its actors before any Ray node goes away
    for node in RAY_NODES:
        assert node in SERVICES["workers"]["depends_on"], node
    assert SERVICES["workers"]["depends_on"]["ray-worker-gpu"]["required"] is False  # absent without the profile
    redis_port = 6379
    for name in ("router", "gateway", "workers"):
        env = environment(SERVICES[name])
        assert env["MOE_SERVE_REDIS_URL"] == f"redis://redis:{redis_port}/0"
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4317"
        assert SERVICES[name]["restart"] == "unless-stopped"
    assert environment(SERVICES["router"])["OTEL_SERVICE_NAME"] == "moe-serve-router"
    assert environment(SERVICES["gateway"])["OTEL_SERVICE_NAME"] == "moe-serve-gateway"
    # forwarded to the worker actors, which must keep their own service name
    assert "OTEL_SERVICE_NAME" not in environment(SERVICES["workers"])
    for name, spec in SERVICES.items():
        for dependency in spec.get("depends_on", {}):
            assert dependency in SERVICES, f"{name} depends on unknown service {dependency}"


def test_every_checkpoint_reader_sees_the_models_volume() -> None:
    checkpoint = environment(SERVICES["router"])["MOE_SERVE_CHECKPOINT"]
    assert checkpoint.startswith("/models/")
    # router, the controller (workers container or head) and the expert workers on the Ray nodes read it
    for name in ("router", "workers", "ray-head", "ray-worker", "ray-worker-gpu"):
        assert volume_targets(SERVICES[name])["/models"] == ("models", True), name
    for name in ("router", "workers"):
        assert environment(SERVICES[name])["MOE_SERVE_CHECKPOINT"] == checkpoint
        assert SERVICES[name]["depends_on"]["demo-checkpoint"]["condition"] == "service_completed_successfully"
    assert volume_targets(SERVICES["demo-checkpoint"])["/models"] == ("models", False)
    assert "models" in COMPOSE["volumes"]
    # MODELS_DIR mounts a host directory instead, on every one of them
    custom = interpolate(RAW_COMPOSE, {"MODELS_DIR": "/srv/models"})["services"]
    for name in ("router", "workers", "ray-worker", "demo-checkpoint"):
        assert volume_targets(custom[name])["/models"][0] == "/srv/models"


def test_expert_workers_can_only_land_on_ray_worker_nodes() -> None:
    head = ray_start_params(SERVICES["ray-head"]["command"])
    assert head["num_cpus"] == 0 and head["num_gpus"] == 0
    driver_node = (DEPLOY / "bin" / "moe-serve-ray-driver").read_text()
    assert "--num-cpus=0 --num-gpus=0" in driver_node
    settings = built_settings(MOE_SERVE["workers"], environment(SERVICES["workers"]))
    assert settings.worker_num_cpus >= 1 and settings.worker_num_gpus == 0
    node = ray_start_params(SERVICES["ray-worker"]["command"])
    assert node["num_gpus"] == 0
    # room for the initial workers plus as many again (scaling starts new workers before old ones leave)
    slots = node["num_cpus"] // settings.worker_num_cpus * SERVICES["ray-worker"]["deploy"]["replicas"]
    assert slots >= 2 * settings.workers


def test_ray_authentication_is_a_decision_shared_by_every_ray_process() -> None:
    participants = [*RAY_NODES, "workers"]
    for name in participants:
        env = environment(SERVICES[name])
        assert env["RAY_AUTH_MODE"] == "disabled", name  # the default: a private network, see the comment
        assert "RAY_AUTH_TOKEN" in env
    token = interpolate(RAW_COMPOSE, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "s3cret"})["services"]
    for name in participants:
        assert token[name]["environment"]["RAY_AUTH_MODE"] == "token"
        assert token[name]["environment"]["RAY_AUTH_TOKEN"] == "s3cret"
    # nothing of Ray is published outside the compose network
    for name in participants:
        assert "ports" not in SERVICES[name]


def test_gpu_profile_reserves_gpus_and_the_default_profile_does_not() -> None:
    for name, spec in SERVICES.items():
        devices = spec.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        if "gpu" in spec.get("profiles", []):
            assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}], name
        else:
            assert not spec.get("profiles"), f"{name} would not start by default"
            assert not devices, f"{name} reserves devices outside the gpu profile"
    assert [name for name, spec in SERVICES.items() if spec.get("profiles")] == ["ray-worker-gpu"]
    gpu = SERVICES["ray-worker-gpu"]
    assert ray_start_params(gpu["command"])["num_gpus"] is None  # Ray counts the GPUs it sees
    assert gpu["image"] == "moe-serve-gpu:0.1.0"
    assert gpu["build"]["args"]["TORCH_INDEX_URL"] == "https://pypi.org/simple"  # PyPI's torch is the CUDA build
    # the documented switch: every worker actor then asks Ray for one GPU, one worker per GPU of the host
    switched = interpolate(RAW_COMPOSE, {"MOE_SERVE_WORKER_NUM_GPUS": "1", "MOE_SERVE_WORKERS": "8"})["services"]
    settings = built_settings(switched["workers"]["command"], environment(switched["workers"]))
    assert settings.worker_num_gpus == 1 and settings.workers == 8


def _from_images(dockerfile: str) -> Iterator[str]:
    defaults = dict(re.findall(r"^ARG (\w+)=(\S+)", dockerfile, re.MULTILINE))
    stages = set(re.findall(r"^FROM \S+ AS (\S+)", dockerfile, re.MULTILINE))
    for image in re.findall(r"^FROM (\S+)", dockerfile, re.MULTILINE):
        image = re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], image)
        if image not in stages:
            yield image


def test_every_image_is_pinned() -> None:
    dockerfiles = {"deploy/Dockerfile": DOCKERFILE}
    for name, spec in SERVICES.items():
        image = spec["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and re.fullmatch(r"v?\d+(\.\d+)+(-[a-z0-9.-]+)?", tag), f"{name}: {image} is not pinned"
        if "build" in spec:
            build = spec["build"]
            path = Path(build["context"]) / build.get("dockerfile", "Dockerfile")
            dockerfiles[str(path)] = (ROOT / path).read_text()
    assert set(dockerfiles) == {"deploy/Dockerfile", "deploy/otel-collector/Dockerfile"}
    for path, dockerfile in dockerfiles.items():
        for image in _from_images(dockerfile):
            _, _, tag = image.rpartition(":")
            assert re.fullmatch(r"\d+(\.\d+)+(-[a-z0-9.-]+)?", tag), f"{path}: FROM {image} is not pinned"
    assert "FROM otel/opentelemetry-collector-contrib:" in dockerfiles["deploy/otel-collector/Dockerfile"]


def test_dockerfile_is_slim_pinned_non_root_and_multi_stage() -> None:
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11\.\d+-slim-bookworm$", DOCKERFILE, re.MULTILINE)
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in DOCKERFILE  # the default build is CPU
    assert "pip install torch==2.13.0 --index-url ${TORCH_INDEX_URL}" in DOCKERFILE
    assert "pip install -c requirements/constraints.txt ." in DOCKERFILE
    # the runtime stage gets the built virtualenv, not the build tools or sources
    runtime = DOCKERFILE.split("AS runtime", 1)[1]
    assert "COPY --from=build /opt/venv /opt/venv" in runtime and "pip install" not in runtime
    user = re.findall(r"^USER (\S+)", DOCKERFILE, re.MULTILINE)
    assert user and user[-1].split(":")[0] not in ("root", "0") and user[-1].split(":")[0].isdigit()
    assert re.search(r"useradd .*--uid 10001", DOCKERFILE)
    # the Ray driver wrapper the compose file and Kubernetes run, installed on the PATH
    assert "deploy/bin/moe-serve-ray-driver /usr/local/bin/moe-serve-ray-driver" in DOCKERFILE
    assert (DEPLOY / "bin" / "moe-serve-ray-driver").stat().st_mode & stat.S_IXUSR
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".git"} <= set(ignored)


def _fake(directory: Path, name: str) -> None:
    script = directory / name
    script.write_text(f'#!/bin/sh\necho "{name} $*" >> "{directory}/calls"\n')
    script.chmod(0o755)


def _run_driver(tmp_path: Path, *args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    for name in ("ray", "moe-serve"):
        _fake(tmp_path, name)
    return subprocess.run(
        ["/bin/sh", str(DEPLOY / "bin" / "moe-serve-ray-driver"), *args],
        env={"PATH": f"{tmp_path}:/usr/bin:/bin", **(env or {})},
        capture_output=True,
        text=True,
        check=False,
    )


def test_ray_driver_wrapper_joins_as_an_empty_node_then_runs_moe_serve(tmp_path: Path) -> None:
    args = MOE_SERVE["workers"]
    result = _run_driver(tmp_path, *args)
    assert result.returncode == 0, result.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    address = flag(args, "--ray-address")
    assert calls == [
        f"ray start --address={address} --num-cpus=0 --num-gpus=0 --disable-usage-stats",
        "moe-serve " + " ".join(args),
    ]
    (tmp_path / "calls").unlink()
    assert _run_driver(tmp_path, "workers", "--ray-address=head:1").returncode == 0
    assert (tmp_path / "calls").read_text().startswith("ray start --address=head:1 ")
    (tmp_path / "calls").unlink()
    assert _run_driver(tmp_path, "workers", env={"MOE_SERVE_RAY_ADDRESS": "head:2"}).returncode == 0
    assert (tmp_path / "calls").read_text().startswith("ray start --address=head:2 ")
    (tmp_path / "calls").unlink()
    missing = _run_driver(tmp_path, "workers")
    assert missing.returncode == 2 and "--ray-address" in missing.stderr
    assert not (tmp_path / "calls").exists()


def test_demo_checkpoint_writer_writes_once_and_never_touches_an_existing_checkpoint(tmp_path: Path) -> None:
    spec = SERVICES["demo-checkpoint"]
    checkpoint = tmp_path / "models" / "mixtral-demo"
    args = [arg.replace("/models/", f"{tmp_path}/models/") for arg in spec["command"]]
    env = {"PATH": f"{VENV_BIN}:/usr/bin:/bin", "MOE_SERVE_CHECKPOINT": str(checkpoint)}

    def run() -> subprocess.CompletedProcess:
        return subprocess.run([*spec["entrypoint"], *args], env=env, capture_output=True, text=True, check=False)

    first = run()
    assert first.returncode == 0, first.stderr
    assert (checkpoint / "config.json").is_file() and (checkpoint / "model.safetensors").is_file()
    # a checkpoint already there (the demo, or real weights mounted at the path) is left alone
    (checkpoint / "config.json").write_text('{"model_type": "mounted"}')
    second = run()
    assert second.returncode == 0 and "checkpoint found" in second.stdout
    assert (checkpoint / "config.json").read_text() == '{"model_type": "mounted"}'
