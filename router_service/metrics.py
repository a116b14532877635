"""The router's metrics: gating time, replicas per (layer, expert), dispatch retries (made and refused by the
retry budget), hedges of late batches, bytes on the wire, rows sent off their token's main node per layer."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from opentelemetry.metrics import CallbackOptions, Observation

from moe_serve.cluster.placement import ExpertKey
from moe_serve.runtime.telemetry import LATENCY_BUCKETS_S, Telemetry, WireBytes
from router_service.registry import Registry
from router_service.retries import RetryBudget


class RouterMetrics:
    def __init__(self, telemetry: Telemetry, model: str, registry: Registry, keys: list[ExpertKey]) -> None:
        meter, self.model = telemetry.meter, model
        self._gating = meter.create_histogram(
            "moe_serve.router.gating.duration",
            unit="s",
            description="Gating, capacity and grouping of one batch",
            explicit_bucket_boundaries_advisory=list(LATENCY_BUCKETS_S),
        )
        # observable, so the series exists (at 0) before the first retry
        self.retries = 0
        meter.create_observable_counter(
            "moe_serve.dispatch.retries",
            [lambda options: [Observation(self.retries, {"model": model})]],
            unit="{batch}",
            description="Worker batches retried on another replica",
        )
        # a batch late on its replica, sent to another one too (router_service/stragglers.py)
        self.hedges = 0
        meter.create_observable_counter(
            "moe_serve.dispatch.hedges",
            [lambda options: [Observation(self.hedges, {"model": model})]],
            unit="{batch}",
            description="Worker batches overdue on their replica and hedged on another one",
        )
        # a retryable failure the retry budget refused: the request failed at once instead
        self.retry_budget: RetryBudget | None = None
        meter.create_observable_counter(
            "moe_serve.dispatch.retries_denied",
            [lambda options: [Observation(self.retry_budget.denied if self.retry_budget else 0, {"model": model})]],
            unit="{batch}",
            description="Worker batch retries refused by the retry budget (the request failed instead)",
        )
        self.wire = WireBytes(meter, "router")
        meter.create_observable_counter(
            "moe_serve.registry.rejected_records",
            [
                lambda options: [
                    Observation(count, {"model": model, "reason": reason})
                    for reason, count in registry.policy.rejected.items()
                ]
            ],
            unit="{record}",
            description="Registry records refused (invalid, unsigned or wrongly signed, expired) and never routed to",
        )

        # the dispatcher's per-layer count (router_service.planner.cross_node_rows), read at each scrape;
        # every MoE layer reported, at 0 before its first row, so rates need no series to appear
        self.cross_node_rows: Mapping[int, int] = Counter()
        layers = sorted({key.layer for key in keys})
        meter.create_observable_counter(
            "moe_serve.router.cross_node_rows",
            [lambda options: cross_node_observations(self.cross_node_rows, layers, model)],
            unit="{row}",
            description="Rows sent to a node other than their token's main node (the node with most of its rows)",
        )

        def replicas(options: CallbackOptions) -> list[Observation]:
            return [
                Observation(
                    len(registry.replicas(key)), {"model": model, "layer": str(key.layer), "expert": str(key.expert)}
                )
                for key in keys
            ]

        meter.create_observable_gauge(
            "moe_serve.expert.replicas",
            [replicas],
            unit="{replica}",
            description="Live replicas of each expert, as this router's registry sees them",
        )

    def gating(self, seconds: float) -> None:
        self._gating.record(seconds, {"model": self.model})

    def retried(self) -> None:
        self.retries += 1

    def hedged(self) -> None:
        self.hedges += 1


def cross_node_observations(counts: Mapping[int, int], layers: list[int], model: str) -> list[Observation]:
    """One observation per MoE layer (labels: model, layer): a bounded set, whatever the traffic."""
    return [Observation(counts.get(layer, 0), {"model": model, "layer": str(layer)}) for layer in layers]
