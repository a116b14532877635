"""How the gateway reaches the router: the router service over its stream, or the router running
inside the gateway's own process (embedded mode).

Both take a RouteRequest without its hidden states, the hidden states as a tensor, and return the
RoutePlan once the rows are on their way to the workers; the DataPlane does not know which it has.
Embedded, a T=1 request is 6 messages on the wire instead of 12: no route request or plan, and the
workers answer with their rows on the compute stream instead of delivering them to the gateway's
delivery port and waiting there for an acknowledgement (measured by `moe-serve bench`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from opentelemetry import trace
from opentelemetry.trace import Tracer

from gateway.deliveries import PendingRequests
from moe_serve.protos import moe_serve_pb2 as moe_pb2
from moe_serve.runtime import codec
from moe_serve.runtime.errors import Overloaded, ServiceUnavailable, error_of
from moe_serve.runtime.streams import StreamClient
from moe_serve.runtime.telemetry import ROUTE_STREAM, client_span, inject_context
from router_service.planner import RoutingDecision
from router_service.servicer import RouterServicer


@dataclass(frozen=True)
class Plan:
    """The routing of one dispatch batch, as the gateway uses it (RoutePlan's fields, as tensors).

    expert_ids INT32 [T, k], expert_weights FP32 [T, k] (0 where dropped), dropped and rerouted
    BOOL [T, k], shared_weights FP32 [T, S], router_logits FP32 [T, E] when asked for;
    dropped/rerouted_per_expert INT64 [E] are read only by the statistics, after the answer.
    """

    expected_rows: int
    expert_ids: torch.Tensor
    expert_weights: torch.Tensor
    dropped: torch.Tensor
    rerouted: torch.Tensor
    shared_weights: torch.Tensor
    router_logits: torch.Tensor | None
    overflow_counts: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    # [E + S] rows each expert (shared last) received, when the router counted them already
    routed_per_expert: torch.Tensor | None = None

    @classmethod
    def from_proto(cls, plan: moe_pb2.RoutePlan) -> Plan:
        def per_expert() -> tuple[torch.Tensor, torch.Tensor]:
            return (
                codec.from_proto(plan.dropped_per_expert, "dropped_per_expert"),
                codec.from_proto(plan.rerouted_per_expert, "rerouted_per_expert"),
            )

        return cls(
            expected_rows=int(plan.expected_rows),
            expert_ids=codec.from_proto(plan.expert_ids, "expert_ids"),
            expert_weights=codec.from_proto(plan.expert_weights, "expert_weights"),
            dropped=codec.from_proto(plan.dropped, "dropped"),
            rerouted=codec.from_proto(plan.rerouted, "rerouted"),
            shared_weights=codec.from_proto(plan.shared_weights, "shared_weights"),
            router_logits=codec.from_proto(plan.router_logits, "router_logits")
            if plan.HasField("router_logits")
            else None,
            overflow_counts=per_expert,
        )

    @classmethod
    def of_decision(cls, decision: RoutingDecision, num_experts: int, with_logits: bool) -> Plan:
        """The embedded router's decision as it is, never encoded."""
        return cls(
            expected_rows=int(decision.groups.positions.numel()),
            expert_ids=decision.outcome.expert_ids.to(torch.int32),
            expert_weights=decision.expert_weights,
            dropped=decision.outcome.dropped,
            rerouted=decision.outcome.rerouted,
            shared_weights=decision.gating.shared_weights,
            router_logits=decision.gating.router_logits if with_logits else None,
            overflow_counts=lambda: decision.overflow_counts(num_experts),
            routed_per_expert=decision.groups.counts,
        )


class Router(Protocol):
    async def route(self, request: moe_pb2.RouteRequest, hidden: torch.Tensor, timeout: float) -> Plan:
        """Gate `hidden` [T, d] (compute dtype), start its rows towards the workers, return the plan.
        Raises the MoEServeError that stopped the routing."""
        ...


class RemoteRouter:
    """The router service, over long-lived RouteStreams taken in turn.

    The streams share one channel with client-side round_robin: each stream is a call of its own,
    so over a target that resolves to several routers (a headless Service) they land on different
    routers, which then share the load instead of only standing in for each other.
    """

    def __init__(
        self,
        streams: Sequence[StreamClient[moe_pb2.RouteRequest, moe_pb2.RoutePlan]],
        max_message_bytes: int,
        wire: Callable[[str, str, int], None],
        tracer: Tracer | None = None,
    ) -> None:
        self.streams, self.wire = list(streams), wire
        self.tracer = tracer or trace.get_tracer(__name__)
        self._turns = itertools.cycle(self.streams)
        self.max_message_bytes = max_message_bytes  # the hops' limit; 0 = not known here, not checked

    async def route(self, request: moe_pb2.RouteRequest, hidden: torch.Tensor, timeout: float) -> Plan:
        self._check_message_size(request, hidden)
        self.wire("gateway_to_router", "sent", codec.fill_proto(request.hidden_states, hidden))
        with client_span(self.tracer, ROUTE_STREAM) as span:
            if span is not None:  # the router's span continues this one
                inject_context(request.trace_context)
            try:
                plan = await next(self._turns).call(request, timeout)
            except ServiceUnavailable as error:
                raise ServiceUnavailable(f"router unreachable: {error.message}") from None
            if plan.HasField("failure"):
                raise error_of(plan.failure)
        return Plan.from_proto(plan)

    def _check_message_size(self, request: moe_pb2.RouteRequest, hidden: torch.Tensor) -> None:
        """Refuse a batch whose message to the router would exceed the hops' limit.

        Refused here, before writing: an oversized message would break the router stream that
        every concurrent request shares. A 16-bit input computed in FP32 doubles in size on this hop.
        `request` has every field but the hidden states, whose encoded size is added exactly
        (the size of the whole message would cost a serialization: 1 ms per 8 MiB).
        """
        if not self.max_message_bytes:
            return
        size = request.ByteSize() + codec.embedded_size(hidden)
        if size <= self.max_message_bytes:
            return
        per_token = hidden.shape[1] * hidden.element_size()
        fits = max(1, (self.max_message_bytes - (size - hidden.shape[0] * per_token)) // per_token)
        raise Overloaded(
            f"{hidden.shape[0]} tokens need a {size}-byte message to the router (hidden states in "
            f"{codec.datatype_name(hidden.dtype)}), more than max_message_bytes={self.max_message_bytes}; "
            f"send at most {fits} tokens per request",
            reason="message_size",
        )

    async def close(self) -> None:
        for stream in self.streams:
            await stream.close()


class EmbeddedRouter:
    """The router running in this process: a call, not a message; workers answer with their rows,
    which go straight into the gateway's pending requests."""

    def __init__(self, servicer: RouterServicer, pending: PendingRequests) -> None:
        self.servicer, self.pending = servicer, pending

    async def route(self, request: moe_pb2.RouteRequest, hidden: torch.Tensor, timeout: float) -> Plan:
        decision = await self.servicer.route_local(request, hidden, self.pending)
        return Plan.of_decision(decision, self.servicer.planner.spec.num_experts, request.return_router_logits)

    async def close(self) -> None:
        """The router's service is stopped by its owner (the gateway service), after the gateway drained."""
