"""The telemetry configuration of the deployment: OpenTelemetry Collector, Prometheus, Grafana provisioning."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import yaml

from tests.deploy_config import (
    DEPLOY,
    RAY_NODES,
    SERVICES,
    environment,
    ray_start_params,
    volume_targets,
)

COLLECTOR = yaml.safe_load((DEPLOY / "otel-collector" / "config.yaml").read_text())
PROMETHEUS = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())


def _static_targets() -> dict[str, list[str]]:
    return {
        job["job_name"]: [t for group in job.get("static_configs", []) for t in group["targets"]]
        for job in PROMETHEUS["scrape_configs"]
    }


def test_collector_receives_otlp_and_feeds_prometheus_and_a_traces_exporter() -> None:
    receiver = COLLECTOR["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    endpoint = urlparse(environment(SERVICES["router"])["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert endpoint.hostname == "otel-collector" and receiver == f"0.0.0.0:{endpoint.port}"
    pipelines = COLLECTOR["service"]["pipelines"]
    assert pipelines["metrics"]["exporters"] == ["prometheus"]
    assert "debug" in pipelines["traces"]["exporters"]
    for pipeline in pipelines.values():
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                assert component in COLLECTOR[kind], f"{component} is used but not defined"
    assert COLLECTOR["service"]["extensions"] == ["health_check"]
    exporter_port = COLLECTOR["exporters"]["prometheus"]["endpoint"].rpartition(":")[2]
    assert _static_targets()["otel-collector"] == [f"otel-collector:{exporter_port}"]
    # the collector runs the file Prometheus and the tests read
    spec = SERVICES["otel-collector"]
    config_path = spec["command"][0].removeprefix("--config=")
    assert volume_targets(spec)[config_path] == ("./deploy/otel-collector/config.yaml", True)


def test_prometheus_scrapes_the_services_on_their_metrics_ports() -> None:
    targets = _static_targets()
    for name in ("gateway", "router"):
        assert targets[name] == [f"{name}:{environment(SERVICES[name])['MOE_SERVE_METRICS_PORT']}"]
    # the expert workers (Ray actors) are not scraped directly: they push OTLP to the collector
    assert "MOE_SERVE_METRICS_PORT" not in environment(SERVICES["workers"])
    # what is scraped directly must not also arrive through the collector (dashboards would count it twice)
    dropped = set(re.findall(r'resource\.attributes\["service\.name"\] == "([^"]+)"', str(COLLECTOR["processors"])))
    assert dropped == {environment(SERVICES[name])["OTEL_SERVICE_NAME"] for name in ("gateway", "router")}
    assert any(p.startswith("filter/") for p in COLLECTOR["service"]["pipelines"]["metrics"]["processors"])
    assert not any(p.startswith("filter/") for p in COLLECTOR["service"]["pipelines"]["traces"]["processors"])
    collector_job = next(job for job in PROMETHEUS["scrape_configs"] if job["job_name"] == "otel-collector")
    assert collector_job["honor_labels"] is True  # keeps the job/instance labels the collector derives
    ray_job = next(job for job in PROMETHEUS["scrape_configs"] if job["job_name"] == "ray")
    (dns,) = ray_job["dns_sd_configs"]
    assert set(dns["names"]) == set(RAY_NODES)
    for name in RAY_NODES:
        assert ray_start_params(SERVICES[name]["command"])["metrics_export_port"] == dns["port"]
    every_target = [t for group in targets.values() for t in group if not t.startswith("localhost:")]
    assert {t.split(":")[0] for t in every_target} <= set(SERVICES)
    spec = SERVICES["prometheus"]
    config = next(arg for arg in spec["command"] if arg.startswith("--config.file=")).split("=", 1)[1]
    assert volume_targets(spec)[config] == ("./deploy/prometheus/prometheus.yml", True)
    assert spec["ports"] == ["127.0.0.1:9090:9090"]


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards_directory() -> None:
    provisioning = DEPLOY / "grafana" / "provisioning"
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["isDefault"] is True
    assert datasource["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "moe-serve.yaml").read_text())["providers"]
    mounts = volume_targets(SERVICES["grafana"])
    assert mounts["/etc/grafana/provisioning"] == ("./deploy/grafana/provisioning", True)
    assert mounts[provider["options"]["path"]] == ("./deploy/grafana/dashboards", True)
    assert provider["type"] == "file"
    assert (DEPLOY / "grafana" / "dashboards" / "README.md").is_file()
    # every datasource a dashboard names is its `datasource` variable, whose default is the provisioned one
    for dashboard in (DEPLOY / "grafana" / "dashboards").glob("*.json"):
        document = json.loads(dashboard.read_text())
        for named in _datasources(document):
            assert named == {"type": "prometheus", "uid": "${datasource}"}, f"{dashboard.name}: {named}"
        variable = next(v for v in document["templating"]["list"] if v["name"] == "datasource")
        assert variable["type"] == "datasource" and variable["query"] == "prometheus"
        assert variable["current"]["value"] == datasource["uid"]


def test_dashboard_filters_by_model_layer_and_instance() -> None:
    """Template variables datasource, model, layer and instance, and every moe-serve series each panel
    queries filtered by them (layer where the series has one; the wire bytes carry no model label)."""
    document = json.loads((DEPLOY / "grafana" / "dashboards" / "moe-serve.json").read_text())
    variables = {v["name"]: v for v in document["templating"]["list"]}
    assert list(variables) == ["datasource", "model", "layer", "instance"]
    for name in ("model", "layer", "instance"):
        assert variables[name]["type"] == "query" and variables[name]["includeAll"] is True
        assert variables[name]["allValue"] == ".*"  # "All" also matches series without the label
        assert "label_values(" in variables[name]["definition"] and name in variables[name]["definition"]
    with_layer = 0
    for panel in document["panels"]:
        for target in panel["targets"]:
            for metric, matchers in re.findall(r"(moe_serve_\w+)(\{[^}]*\})?", target["expr"]):
                assert 'instance=~"$instance"' in matchers, f"{panel['title']}: {metric}"
                if metric != "moe_serve_wire_bytes_total":
                    assert 'model=~"$model"' in matchers, f"{panel['title']}: {metric}"
                if "expert" in metric or "capacity" in metric:
                    assert 'layer=~"$layer"' in matchers, f"{panel['title']}: {metric}"
                    with_layer += 1
    assert with_layer >= 8


def _datasources(node: Any) -> Iterator[Any]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield value
            else:
                yield from _datasources(value)
    elif isinstance(node, list):
        for item in node:
            yield from _datasources(item)
    assert SERVICES["grafana"]["ports"] == ["127.0.0.1:3000:3000"]
