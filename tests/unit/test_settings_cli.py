"""The service commands' flags are made from their settings classes: every field a flag, its help the
field's description and environment variable, choices listed and checked; a child started by `up`
gets exactly its parent's settings through MOE_SERVE_SETTINGS_JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import typer
from pydantic import BaseModel, SecretStr
from typer.testing import CliRunner

from moe_serve.cli.commands import services
from moe_serve.cli.commands.common import flag_names
from moe_serve.cli.main import app
from moe_serve.config import (
    SETTINGS_JSON_ENV,
    GatewaySettings,
    RouterSettings,
    UpSettings,
    WorkerSettings,
    WorkersSettings,
    is_secret,
    settings_from_json,
    settings_json,
)

COMMANDS: dict[str, type[BaseModel]] = {
    "gateway": GatewaySettings,
    "router": RouterSettings,
    "worker": WorkerSettings,
    "up": UpSettings,
    "workers": WorkersSettings,
}
# spellings scripts, compose files and tests use: each must keep working
HISTORIC_FLAGS = {
    "gateway": [
        "--registry-ttl", "--request-timeout", "--live-state-interval", "--embedded-router", "--no-prefetch",
        "--prefetch", "--no-metrics", "--no-http", "--allow-client-shm", "--insecure-internal",
        "--pipeline-chunk-tokens", "--router-port", "--delivery-port", "--cluster-secret-file",
    ],
    "router": ["--registry-ttl", "--no-prefetch", "--split-min-rows", "--noisy-gating-std", "--no-metrics"],
    "worker": ["--lfu-window", "--registry-ttl", "--eviction-policy", "--device", "--torch-threads", "--num-workers"],
    "up": [
        "--rebalance", "--workers", "--router", "--allow-client-shm", "--no-http", "--pipeline-chunk-tokens",
        "--autoscale-max-workers", "--ray-address", "--worker-num-gpus", "--no-metrics",
    ],
    "workers": ["--rebalance", "--workers", "--registry-ttl", "--router-address"],
}  # fmt: skip
CHOICES = {
    "gateway": {"--overflow": "drop|reroute|dropless", "--dtype": "auto|float32|bfloat16|float16"},
    "worker": {"--eviction-policy": "lru|lfu", "--device": "auto|cpu|cuda"},
    "up": {"--router": "embedded|service", "--log-format": "text|json", "--event-loop": "auto|uvloop|asyncio"},
    "router": {"--log-level": "DEBUG|INFO|WARNING|ERROR|CRITICAL"},
}


def command_flags(command: str) -> set[str]:
    click_command = typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]
    return {flag for param in click_command.params for flag in (*param.opts, *param.secondary_opts)}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_field_is_a_flag_and_every_historic_flag_still_is(command: str) -> None:
    flags = command_flags(command)
    for name, field in COMMANDS[command].model_fields.items():
        if is_secret(field):
            assert f"--{name.replace('_', '-')}" not in flags  # a secret is never on a command line
        else:
            assert set(flag_names(name, field)) <= flags, name
    assert set(HISTORIC_FLAGS[command]) <= flags


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_env_vars_defaults_and_choices(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # one line per option
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "[env var: MOE_SERVE_REDIS_URL]" in result.output
    assert "[env var: MOE_SERVE_CLUSTER_SECRET]" not in result.output
    assert "[default: INFO]" in result.output
    for flag, choices in CHOICES.get(command, {}).items():
        (line,) = [line for line in result.output.splitlines() if f"│ {flag} " in line]
        assert f"[{choices}]" in line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["gateway", "--overflow", "spill"], "invalid overflow: Input should be 'drop', 'reroute' or 'dropless'"),
        (["up", "--router", "remote"], "invalid router: Input should be 'embedded' or 'service'"),
        (["worker", "--checkpoint", ".", "--eviction-policy", "fifo"], "Input should be 'lru' or 'lfu'"),
        (["router", "--checkpoint", ".", "--log-level", "loud"], "Input should be 'DEBUG', 'INFO', 'WARNING'"),
    ],
)
def test_a_bad_choice_exits_2_with_one_line_naming_the_choices(args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and message in result.output, result.output


@pytest.fixture
def gateway_settings(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Run `moe-serve gateway` up to the settings it would serve with (no server starts)."""
    from gateway.server import GatewayService

    captured: list[Any] = []
    monkeypatch.setattr(GatewayService, "serve", staticmethod(lambda settings: settings))
    monkeypatch.setattr(services, "run_service", lambda settings, event_loop: captured.append(settings))
    monkeypatch.setattr(services, "configure_logging", lambda *args: None)
    return captured


def test_flags_override_env_which_overrides_defaults(
    gateway_settings: list[GatewaySettings], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOE_SERVE_PIPELINE_CHUNK_TOKENS", "64")
    monkeypatch.setenv("MOE_SERVE_MAX_BATCH_TOKENS", "512")
    args = ["gateway", "--pipeline-chunk-tokens", "32", "--no-prefetch", "--registry-ttl", "3", "--log-level", "debug"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (settings,) = gateway_settings
    assert settings.pipeline_chunk_tokens == 32  # flag over env
    assert settings.max_batch_tokens == 512  # env over default
    assert settings.max_inflight_tokens == GatewaySettings.model_fields["max_inflight_tokens"].default
    assert (settings.prefetch, settings.registry_ttl_s, settings.log_level) == (False, 3.0, "DEBUG")


def test_a_child_gets_exactly_its_parents_settings(
    gateway_settings: list[GatewaySettings], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The JSON channel `up` uses: every field, secrets excepted, and the secret by its own variable."""
    parent = GatewaySettings(
        port=0,
        pipeline_chunk_tokens=16,
        overflow="reroute",
        capacity_factor=1.25,
        metrics_port=None,
        prefetch=False,
        embedded_router=True,
        checkpoint=tmp_path,
        cluster_secret=SecretStr("s" * 40),
        log_format="json",
    )
    text = settings_json(parent)
    assert "s" * 40 not in text
    monkeypatch.setenv(SETTINGS_JSON_ENV, text)
    monkeypatch.setenv("MOE_SERVE_CLUSTER_SECRET", "s" * 40)
    monkeypatch.setenv("MOE_SERVE_PIPELINE_CHUNK_TOKENS", "99")  # the parent's value wins over the environment
    monkeypatch.setenv("MOE_SERVE_METRICS_PORT", "9")  # an unset value (None) too
    result = CliRunner().invoke(app, ["gateway"])
    assert result.exit_code == 0, result.output
    (child,) = gateway_settings
    assert child.model_dump() == parent.model_dump()
    assert child.cluster_secret is not None and child.cluster_secret.get_secret_value() == "s" * 40


def test_worker_settings_round_trip_with_the_secret_for_ray_actors(tmp_path: Path) -> None:
    template = WorkerSettings(checkpoint=tmp_path, eviction_policy="lfu", cluster_secret=SecretStr("k" * 40))
    text = settings_json(template, secrets=True, experts="0-3", worker_id="w1")
    worker = settings_from_json(WorkerSettings, text)
    assert worker.model_dump() == template.model_copy(update={"experts": "0-3", "worker_id": "w1"}).model_dump()
    assert worker.cluster_secret is not None and worker.cluster_secret.get_secret_value() == "k" * 40


def test_up_composes_the_service_settings_with_their_defaults() -> None:
    """`up` declares no gateway, router or worker setting of its own: it inherits each with its default."""
    same = {
        GatewaySettings: ("pipeline_chunk_tokens", "max_inflight_tokens", "overflow", "batch_window_ms", "port"),
        RouterSettings: ("prefetch", "split_min_rows", "dtype"),
        WorkerSettings: ("eviction_policy", "device_memory_budget", "compute_threads", "lfu_window_s"),
    }
    for service, fields in same.items():
        for field in fields:
            assert repr(UpSettings.model_fields[field]) == repr(service.model_fields[field]), field


def test_up_hands_its_gateway_router_and_workers_their_settings(tmp_path: Path) -> None:
    from moe_serve.cluster.launcher import gateway_settings, router_settings, settings_environment, worker_settings
    from moe_serve.runtime.security import ClusterCredentials

    up = UpSettings(pipeline_chunk_tokens=8, overflow="drop", split_min_rows=4, eviction_policy="lfu", metrics=False)
    embedded = gateway_settings(up, tmp_path, "m", router_port=7)
    assert (embedded.pipeline_chunk_tokens, embedded.overflow, embedded.split_min_rows) == (8, "drop", 4)
    assert (embedded.embedded_router, embedded.router_port, embedded.model_name, embedded.prometheus_port) == (
        True,
        7,
        "m",
        None,
    )
    assert gateway_settings(up, tmp_path, "m", router_address="h:1").router_address == "h:1"
    router = router_settings(up, tmp_path, "m", 5)
    assert (router.port, router.split_min_rows, router.prometheus_port) == (5, 4, None)
    assert list(settings_environment(router)) == [SETTINGS_JSON_ENV]
    worker = worker_settings(up, tmp_path, "h:1", ClusterCredentials(b"x" * 40))
    assert (worker.eviction_policy, worker.router_address, worker.prometheus_port) == ("lfu", "h:1", None)


def test_a_restarted_service_keeps_the_ports_it_announced() -> None:
    from moe_serve.cluster.launcher import ServiceProcess
    from moe_serve.cluster.supervisor import pinned_environment

    settings = settings_json(GatewaySettings(port=0, http_port=0, metrics_port=0))
    service = ServiceProcess(
        name="gateway",
        process=None,  # type: ignore[arg-type]  # pinning reads what it announced, not the process
        ready={"address": "127.0.0.1:41234", "http_address": "127.0.0.1:41236"},
        args=["gateway"],
        env={SETTINGS_JSON_ENV: settings, "OTHER": "1"},
    )
    pinned = pinned_environment(service)
    restarted = settings_from_json(GatewaySettings, pinned[SETTINGS_JSON_ENV])
    assert (restarted.port, restarted.http_port, restarted.metrics_port, pinned["OTHER"]) == (41234, 41236, 0, "1")


def test_a_gateway_hands_the_router_it_embeds_its_router_settings(tmp_path: Path) -> None:
    from moe_serve.config import embedded_router_settings

    gateway = GatewaySettings(
        embedded_router=True, checkpoint=tmp_path, router_port=9, split_min_rows=3, prefetch=False, model_name="m"
    )
    router = embedded_router_settings(gateway)
    assert (router.port, router.split_min_rows, router.prefetch, router.model_name) == (9, 3, False, "m")
    assert router.prometheus_port is None and router.host == gateway.host
