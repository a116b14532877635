"""The compose TLS overlay (deploy/compose.tls.yml), merged over docker-compose.yml as `docker compose -f ... -f ...`
does, checked structurally: every service gets the certificates it needs, from files `moe-serve certs` really writes."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from typer.testing import CliRunner

from moe_serve.cli.main import app
from tests.deploy_config import (
    DEPLOY,
    DOCKERFILE,
    RAW_COMPOSE,
    RAY_NODES,
    built_settings,
    environment,
    interpolate,
    moe_serve_args,
    parsed,
    volume_targets,
)

OVERLAY = yaml.safe_load((DEPLOY / "compose.tls.yml").read_text())


def merge_service(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Compose's merge of one service: mappings merge, volumes merge by target, anything else is replaced."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if key in ("environment", "depends_on", "healthcheck") and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        elif key == "volumes":
            by_target = {volume.split(":")[1]: volume for volume in merged.get("volumes", [])}
            by_target.update({volume.split(":")[1]: volume for volume in value})
            merged[key] = list(by_target.values())
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def merged_compose() -> dict[str, Any]:
    raw = copy.deepcopy(RAW_COMPOSE)
    for name, spec in OVERLAY["services"].items():
        raw["services"][name] = merge_service(raw["services"].get(name, {}), spec)
    raw["volumes"] = {**raw.get("volumes", {}), **OVERLAY.get("volumes", {})}
    return interpolate(raw)


SERVICES = merged_compose()["services"]
CERTS_SERVICE_ARGS = moe_serve_args(SERVICES["certs"])


def certificate_files(settings: Any) -> list[Path]:
    names = ("internal_tls_ca", "internal_tls_cert", "internal_tls_key", "tls_cert", "tls_key", "auth_tokens_file")
    return [Path(value) for name in names if (value := getattr(settings, name, None)) is not None]


def test_every_service_runs_with_mutual_tls_and_the_gateway_with_tls_and_tokens() -> None:
    for name in ("router", "workers", "gateway"):
        settings = built_settings(moe_serve_args(SERVICES[name]), environment(SERVICES[name]))
        assert settings.internal_tls_ca and settings.internal_tls_cert and settings.internal_tls_key, name
        for path in certificate_files(settings):
            assert str(path).startswith("/certs/"), f"{name}: {path}"
        assert volume_targets(SERVICES[name])["/certs"] == ("certs", True), name
        assert SERVICES[name]["depends_on"]["certs"]["condition"] == "service_completed_successfully"
    gateway = built_settings(moe_serve_args(SERVICES["gateway"]), environment(SERVICES["gateway"]))
    assert gateway.tls_cert and gateway.tls_key and gateway.auth_tokens_file
    # the worker actors get the internal certificate's paths from the controller: every Ray node has them
    for name in RAY_NODES:
        assert volume_targets(SERVICES[name])["/certs"] == ("certs", True), name
    assert "certs" in merged_compose()["volumes"]


def test_the_certs_service_writes_every_file_the_services_read(tmp_path: Path) -> None:
    assert CERTS_SERVICE_ARGS[:2] == ["certs", "/certs"]
    assert volume_targets(SERVICES["certs"])["/certs"] == ("certs", False)
    result = CliRunner().invoke(app, [*CERTS_SERVICE_ARGS[:1], str(tmp_path), *CERTS_SERVICE_ARGS[2:]])
    assert result.exit_code == 0, result.output
    for name in ("router", "workers", "gateway"):
        settings = built_settings(moe_serve_args(SERVICES[name]), environment(SERVICES[name]))
        for path in certificate_files(settings):
            assert (tmp_path / path.relative_to("/certs")).is_file(), f"{name} reads {path}, which certs does not write"
    gateway_certificate = x509.load_pem_x509_certificate((tmp_path / "gateway.pem").read_bytes())
    names = gateway_certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    # clients reach the gateway as `gateway` inside the network and as localhost from the host
    assert {"gateway", "localhost"} <= set(names.get_values_for_type(x509.DNSName))
    # the image owns /certs, so the named volume is writable by the certs service (uid 10001)
    assert "/certs" in DOCKERFILE and "chown moe:moe /models /certs" in DOCKERFILE


def test_health_checks_speak_tls(monkeypatch) -> None:
    gateway_check = SERVICES["gateway"]["healthcheck"]["test"]
    assert gateway_check[:3] == ["CMD", "moe-serve", "health"]
    params = parsed(gateway_check[2:])
    assert str(params["tls_ca"]) == "/certs/ca.pem" and params["address"].startswith("localhost:")
    # internal services keep their checks: in their environment `moe-serve health` picks up the internal certificate
    for name in ("router", "workers"):
        check = SERVICES[name]["healthcheck"]["test"]
        assert check[:3] == ["CMD", "moe-serve", "health"], name
        with monkeypatch.context() as patch:
            for key, value in environment(SERVICES[name]).items():
                patch.setenv(key, value)
            params = parsed(check[2:])
        assert str(params["internal_tls_ca"]) == "/certs/internal-ca.pem", name
        assert str(params["internal_tls_key"]) == "/certs/internal.key", name
