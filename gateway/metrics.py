"""The gateway's metrics: requests and latency by status, tokens, admission rejections by reason,
per-expert rows / drops / reroutes, load share, imbalance, drop rate, and bytes on the wire.

Label cardinality stays bounded: model, status code, reason, direction/hop, layer and expert ids
(bounded by the model). Never request ids or token counts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from gateway.live_state import LoadWindow
from gateway.stats import ExpertCounters
from moe_serve.runtime.telemetry import LATENCY_BUCKETS_S, Telemetry, WireBytes

# seconds: a T=1 request's stages take tens of microseconds to a few milliseconds
STAGE_BUCKETS_S = (0.00002, 0.00005, 0.0001, 0.0002, *LATENCY_BUCKETS_S)


class GatewayMetrics:
    def __init__(
        self,
        telemetry: Telemetry,
        model: str,
        counters: ExpertCounters,
        window: LoadWindow,
        inflight_tokens: Callable[[], int],
    ) -> None:
        meter, self.model = telemetry.meter, model
        self._requests = meter.create_counter(
            "moe_serve.requests", unit="{request}", description="Inference requests by final gRPC status code"
        )
        self._duration = meter.create_histogram(
            "moe_serve.request.duration",
            unit="s",
            description="Request latency at the gateway",
            explicit_bucket_boundaries_advisory=list(LATENCY_BUCKETS_S),
        )
        self._tokens = meter.create_counter(
            "moe_serve.tokens", unit="{token}", description="Tokens in (requests) and out (responses)"
        )
        self._rejections = meter.create_counter(
            "moe_serve.admission.rejections",
            unit="{request}",
            description="Requests refused by a capacity bound, by bound",
        )
        self._stages = meter.create_histogram(
            "moe_serve.gateway.stage.duration",
            unit="s",
            description="Time one request spent in each gateway stage: decode, route (until the plan is "
            "back), collect (the last delivery after the plan), combine, encode; total is the whole request",
            explicit_bucket_boundaries_advisory=list(STAGE_BUCKETS_S),
        )
        self.wire = WireBytes(meter, "gateway")
        meter.create_observable_gauge(
            "moe_serve.inflight.tokens",
            [self._observe(lambda: [(inflight_tokens(), {})])],
            unit="{token}",
            description="Tokens admitted and not yet answered",
        )

        self._observe_expert_counters(meter, counters)
        self._observe_load_window(meter, window)

    def _observe_expert_counters(self, meter: Meter, counters: ExpertCounters) -> None:
        """Rows routed, slots dropped and slots rerouted, per (layer, expert), since start."""

        def expert_series(table: dict) -> Iterable[tuple[float, dict]]:
            for layer, values in table.items():
                for expert, value in enumerate(values.tolist()):
                    yield value, {"layer": str(layer), "expert": str(expert)}

        meter.create_observable_counter(
            "moe_serve.expert.rows",
            [self._observe(lambda: expert_series(counters.routed_rows))],
            unit="{row}",
            description="Rows routed to each expert (shared expert is id E)",
        )
        meter.create_observable_counter(
            "moe_serve.expert.dropped",
            [self._observe(lambda: expert_series(counters.dropped_slots))],
            unit="{slot}",
            description="Slots dropped by capacity, by the expert over capacity",
        )
        meter.create_observable_counter(
            "moe_serve.expert.rerouted",
            [self._observe(lambda: expert_series(counters.rerouted_slots))],
            unit="{slot}",
            description="Slots rerouted by capacity, by the expert over capacity",
        )

    def _observe_load_window(self, meter: Meter, window: LoadWindow) -> None:
        """Load share per expert, imbalance and drop rate per layer, over the sliding window."""

        def layer_values(field: str) -> Iterable[tuple[float, dict]]:
            for layer, view in window.layers().items():
                yield view[field], {"layer": str(layer)}

        def shares() -> Iterable[tuple[float, dict]]:
            for layer, view in window.layers().items():
                for expert, share in enumerate(view["load_share"]):
                    yield share, {"layer": str(layer), "expert": str(expert)}

        meter.create_observable_gauge(
            "moe_serve.expert.load_share",
            [self._observe(shares)],
            description="Share of a layer's rows each expert received (sliding window)",
        )
        meter.create_observable_gauge(
            "moe_serve.expert.imbalance",
            [self._observe(lambda: layer_values("imbalance"))],
            description="max / mean rows per expert in a layer (sliding window)",
        )
        meter.create_observable_gauge(
            "moe_serve.capacity.drop_rate",
            [self._observe(lambda: layer_values("drop_rate"))],
            description="Dropped slots / routed slots per layer (sliding window)",
        )

    def _observe(self, series: Callable[[], Iterable[tuple[float, dict]]]) -> Callable[[CallbackOptions], list]:
        def callback(options: CallbackOptions) -> list[Observation]:
            return [Observation(value, {"model": self.model, **labels}) for value, labels in series()]

        return callback

    def request_done(self, status_code: str, seconds: float, tokens_in: int, tokens_out: int) -> None:
        labels = {"model": self.model, "status_code": status_code}
        self._requests.add(1, labels)
        self._duration.record(seconds, labels)
        self._tokens.add(tokens_in, {"model": self.model, "direction": "in"})
        if tokens_out:
            self._tokens.add(tokens_out, {"model": self.model, "direction": "out"})

    def stage(self, stage: str, seconds: float) -> None:
        """One request's (or dispatch batch's) time in a gateway stage."""
        self._stages.record(seconds, {"model": self.model, "stage": stage})

    def rejected(self, reason: str) -> None:
        self._rejections.add(1, {"model": self.model, "reason": reason})
