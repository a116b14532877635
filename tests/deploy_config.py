"""What the deployment tests share: the parsed compose file, Dockerfile and helpers that run commands
through the real command-line definitions.

The tests (test_deploy_compose.py, test_deploy_telemetry.py, test_deploy_kubernetes.py) check
docker-compose.yml, the Dockerfiles, the telemetry configuration and the KubeRay manifests
structurally: no Docker engine or Kubernetes runs here.

Commands are parsed by the real command-line definitions (moe-serve's and `ray start`'s) and settings are built
from each container's environment, so a renamed flag or a value that fails validation fails here.
tests/integration/test_compose_topology.py runs the same compose topology as local processes.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from pydantic import BaseModel, ValidationError
from ray.scripts.scripts import start as ray_start
from typer.main import get_command

from moe_serve.cli.main import app
from moe_serve.config import CommonSettings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
VENV_BIN = Path(sys.executable).parent
GROUP = get_command(app)


def interpolate(value: Any, environ: Mapping[str, str] | None = None) -> Any:
    """Compose's variable substitution: ${VAR}, ${VAR:-default}, ${VAR-default}; `$$` is a literal `$`."""
    environ = environ or {}
    if isinstance(value, dict):
        return {key: interpolate(item, environ) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, environ) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, operator, default = match.group(1), match.group(2), match.group(3) or ""
        if operator == ":-":
            return environ.get(name) or default
        if operator == "-":
            return environ.get(name, default)
        return environ.get(name, "")

    parts = value.split("$$")
    return "$".join(re.sub(r"\$\{(\w+)(?:(:?-)([^}]*))?\}", substitute, part) for part in parts)


RAW_COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
COMPOSE = interpolate(RAW_COMPOSE)  # what `docker compose up` runs with no variables set
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
DOCKERFILE = (DEPLOY / "Dockerfile").read_text()


def moe_serve_args(spec: Mapping[str, Any]) -> list[str] | None:
    """The `moe-serve` arguments a container runs, or None when it runs something else (a Ray node, Redis...)."""
    if spec.get("image", "").rpartition(":")[0] not in ("moe-serve", "moe-serve-gpu"):
        return None
    entrypoint = spec.get("entrypoint")
    if entrypoint is None or entrypoint == ["moe-serve-ray-driver"]:  # the image's ENTRYPOINT is moe-serve
        return list(spec["command"])
    if entrypoint[:2] == ["/bin/sh", "-c"] and 'exec moe-serve "$@"' in entrypoint[2]:
        return list(spec["command"])
    return None


MOE_SERVE = {name: args for name, spec in SERVICES.items() if (args := moe_serve_args(spec)) is not None}
RAY_NODES = {name: spec for name, spec in SERVICES.items() if spec.get("entrypoint") == ["ray"]}


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def ray_start_params(args: list[str]) -> dict[str, Any]:
    """`ray start ARGS` parsed by Ray's own command definition."""
    assert args[0] == "start"
    return ray_start.make_context("start", list(args[1:])).params


def environment(spec: Mapping[str, Any]) -> dict[str, str]:
    return {key: str(value) for key, value in (spec.get("environment") or {}).items()}


class _Built(Exception):
    def __init__(self, settings: BaseModel) -> None:
        super().__init__(settings)
        self.settings = settings


def built_settings(args: list[str], env: Mapping[str, str]) -> BaseModel:
    """The settings `moe-serve ARGS` builds in a container with environment `env`: the real command parses its
    flags and builds its settings, and is stopped right there, before it would start serving."""
    validate = CommonSettings.__init__

    def capture(self: BaseModel, **values: Any) -> None:
        try:
            validate(self, **values)
        except ValidationError as error:
            raise AssertionError(f"`moe-serve {' '.join(args)}`: {error}") from None
        raise _Built(self)

    with pytest.MonkeyPatch.context() as patch:
        for key in list(os.environ):
            if key.startswith(("MOE_SERVE_", "OTEL_")):
                patch.delenv(key)
        for key, value in env.items():
            patch.setenv(key, value)
        patch.setattr(CommonSettings, "__init__", capture)
        try:
            GROUP.main(args=list(args), prog_name="moe-serve", standalone_mode=False)
        except _Built as built:
            return built.settings
    raise AssertionError(f"`moe-serve {' '.join(args)}` built no settings")


def parsed(args: list[str]) -> dict[str, Any]:
    """Parse without running (for commands with side effects, e.g. init-demo)."""
    name, *rest = args
    assert name in GROUP.commands, f"unknown moe-serve command {name!r}"
    return GROUP.commands[name].make_context(name, list(rest)).params


def healthcheck(name: str) -> list[str]:
    test = SERVICES[name]["healthcheck"]["test"]
    assert test[0] == "CMD", f"{name}: exec-form health check expected"
    return test[1:]


def http_port(url: str) -> int:
    return urlparse(url).port or 80


def volume_targets(spec: Mapping[str, Any]) -> dict[str, tuple[str, bool]]:
    """container path -> (source, read-only) of a service's short-syntax volumes."""
    mounts = {}
    for volume in spec.get("volumes", []):
        source, target, *mode = volume.split(":")
        mounts[target] = (source, mode == ["ro"])
    return mounts
