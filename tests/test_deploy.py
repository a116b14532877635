"""docker-compose.yml and the Dockerfile, checked structurally (no Docker engine runs here).

The same topology runs as local processes in tests/test_topology.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
import yaml
from typer.main import get_command

from moe_serve.cli import app
from moe_serve.config import GatewaySettings, RouterSettings, WorkerSettings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
OUR_SERVICES = {name: spec for name, spec in SERVICES.items() if spec.get("image", "").startswith("moe-serve")}
SETTINGS_OF = {"gateway": GatewaySettings, "router": RouterSettings, "worker": WorkerSettings}


def parse_command(args: list[str]) -> tuple[str, dict]:
    """Parse `moe-serve ARGS` with the real CLI definition (no side effects); return (command, params)."""
    group = get_command(app)
    name, *rest = args
    command = group.get_command(click.Context(group), name)
    assert command is not None, f"unknown moe-serve command {name!r}"
    context = command.make_context(name, list(rest))
    return name, context.params


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


@pytest.mark.parametrize("service", sorted(OUR_SERVICES))
def test_every_command_is_a_real_subcommand_with_flags_that_parse(service: str) -> None:
    spec = OUR_SERVICES[service]
    command, params = parse_command(spec["command"])
    if command in SETTINGS_OF:
        # the settings the container would build: compose environment, overridden by its flags
        with pytest.MonkeyPatch.context() as patch:
            for key, value in spec["environment"].items():
                patch.setenv(key, str(value))
            renamed = {"request_timeout": "request_timeout_s", "registry_ttl": "registry_ttl_s"}
            SETTINGS_OF[command](**{renamed.get(k, k): v for k, v in params.items() if v is not None})


def test_every_long_running_service_has_a_health_check() -> None:
    for name, spec in SERVICES.items():
        if spec.get("restart") == "no":
            continue
        assert "healthcheck" in spec, f"{name} has no healthcheck"
        test = spec["healthcheck"]["test"]
        if name in OUR_SERVICES:
            # grpc.health.v1 on the port the service listens on
            assert test[1:3] == ["moe-serve", "health"]
            assert test[3].endswith(":" + flag(spec["command"], "--port"))


def test_addresses_ports_and_environment_are_consistent() -> None:
    gateway, router = SERVICES["gateway"]["command"], SERVICES["router"]["command"]
    assert flag(gateway, "--router-address") == f"router:{flag(router, '--port')}"
    assert flag(router, "--advertise-host") == "router"
    assert SERVICES["gateway"]["ports"] == [f"{flag(gateway, '--port')}:{flag(gateway, '--port')}"]
    workers = [name for name, spec in OUR_SERVICES.items() if spec["command"][0] == "worker"]
    assert len(workers) >= 2
    indexes = sorted(int(flag(SERVICES[w]["command"], "--worker-index")) for w in workers)
    assert indexes == list(range(len(workers)))
    for name in workers:
        args = SERVICES[name]["command"]
        assert flag(args, "--advertise-host") == name
        assert int(flag(args, "--num-workers")) == len(workers)
    for spec in OUR_SERVICES.values():
        environment = spec["environment"]
        assert environment["MOE_SERVE_REDIS_URL"].startswith("redis://redis:")
        assert environment["MOE_SERVE_HOST"] == "0.0.0.0"


def test_dockerfile_is_slim_pinned_and_non_root() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", dockerfile, re.MULTILINE)
    assert "torch==2.13.0" in dockerfile and "-c requirements/constraints.txt" in dockerfile
    user = re.findall(r"^USER (\S+)", dockerfile, re.MULTILINE)
    assert user and user[-1] not in ("root", "0")
    assert 'ENTRYPOINT ["moe-serve"]' in dockerfile
