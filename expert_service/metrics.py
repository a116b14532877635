"""A worker's metrics: compute time per (layer, expert), rows in flight per (layer, expert), bytes sent,
rows moved per direction and transport."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from opentelemetry.metrics import CallbackOptions, Observation

from moe_serve.cluster.placement import ExpertKey
from moe_serve.runtime.telemetry import LATENCY_BUCKETS_S, Telemetry, WireBytes


class WorkerMetrics:
    def __init__(
        self,
        telemetry: Telemetry,
        model: str,
        worker_id: str,
        inflight_by_expert: Counter[ExpertKey],
        abandoned: Callable[[], int],
        rows_by_transport: Counter[tuple[str, str]] | None = None,
    ) -> None:
        meter, self.labels = telemetry.meter, {"model": model, "worker": worker_id}
        self._meter = meter
        self._compute = meter.create_histogram(
            "moe_serve.expert.compute.duration",
            unit="s",
            description="Time one expert took on one batch of rows",
            explicit_bucket_boundaries_advisory=list(LATENCY_BUCKETS_S),
        )
        self.wire = WireBytes(meter, "worker")

        def queue(options: CallbackOptions) -> list[Observation]:
            return [
                Observation(rows, {**self.labels, "layer": str(key.layer), "expert": str(key.expert)})
                for key, rows in inflight_by_expert.items()
            ]

        meter.create_observable_gauge(
            "moe_serve.expert.queue.rows",
            [queue],
            unit="{row}",
            description="Rows received by this worker and not yet delivered, per expert",
        )
        meter.create_observable_counter(
            "moe_serve.worker.abandoned",
            [lambda options: [Observation(abandoned(), self.labels)]],
            unit="{batch}",
            description="Batches dropped because their request's deadline had passed",
        )
        by_transport = rows_by_transport if rows_by_transport is not None else Counter()
        meter.create_observable_counter(
            "moe_serve.worker.transport.rows",
            [
                lambda options: [
                    Observation(rows, {**self.labels, "direction": direction, "transport": name})
                    for (direction, name), rows in by_transport.items()
                ]
            ],
            unit="{row}",
            description="Rows received from the router and outputs delivered to the gateway, by how they moved: bytes, "
            "shm (a mapped arena), nixl (transfers)",
        )

    def observe_offload(self, state: Callable[[], dict[str, Any]]) -> None:
        """Expert-offloading metrics, read from the device tier's own accounting at each collection."""
        meter = self._meter
        counters = {
            "hits": ("moe_serve.offload.hits", "{use}", "Expert uses that found the expert resident (or hinted)"),
            "misses": ("moe_serve.offload.misses", "{use}", "Expert uses that had to load the expert first"),
            "bytes_moved": ("moe_serve.offload.moved", "By", "Bytes of expert weights copied into the device tier"),
            "load_seconds": ("moe_serve.offload.load.time", "s", "Time spent copying experts into the device tier"),
            "evictions": ("moe_serve.offload.evictions", "{expert}", "Experts evicted from the device tier"),
            "prefetched": ("moe_serve.offload.prefetched", "{expert}", "Loads started by the router's hints"),
        }
        for field, (name, unit, description) in counters.items():
            meter.create_observable_counter(
                name,
                [lambda options, field=field: [Observation(state().get(field, 0), self.labels)]],
                unit=unit,
                description=description,
            )
        meter.create_observable_gauge(
            "moe_serve.offload.resident",
            [lambda options: [Observation(state().get("resident_bytes", 0), self.labels)]],
            unit="By",
            description="Bytes of experts resident in the device tier",
        )
        meter.create_observable_gauge(
            "moe_serve.offload.resident.experts",
            [lambda options: [Observation(len(state().get("resident", ())), self.labels)]],
            unit="{expert}",
            description="Experts resident in the device tier",
        )

    def computed(self, key: ExpertKey, seconds: float) -> None:
        self._compute.record(seconds, {**self.labels, "layer": str(key.layer), "expert": str(key.expert)})
