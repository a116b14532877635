"""Cumulative per-(layer, expert) counters at the gateway, and the internal RPC that reads them."""

from __future__ import annotations

import json
from collections.abc import Sized

import torch
from grpc import aio

from gateway.admission import AdmissionController
from gateway.live_state import LiveState
from moe_serve.protos import moe_serve_pb2 as moe_pb2
from moe_serve.protos import moe_serve_pb2_grpc as moe_grpc


class ExpertCounters:
    """Rows routed to, and slots dropped or rerouted away from, each expert of each MoE layer.

    Expert ids run over the routed experts and, after them, the shared expert (id E).
    """

    def __init__(self, moe_layers: tuple[int, ...], num_placed_experts: int) -> None:
        self.num_placed_experts = num_placed_experts
        zeros = {layer: torch.zeros(num_placed_experts, dtype=torch.int64) for layer in moe_layers}
        self.routed_rows = {layer: t.clone() for layer, t in zeros.items()}
        self.dropped_slots = {layer: t.clone() for layer, t in zeros.items()}
        self.rerouted_slots = zeros
        self.dispatches = 0

    def record(
        self,
        layer: int,
        plan_ids: torch.Tensor,
        kept: torch.Tensor,
        shared_rows: int,
        dropped_per_expert: torch.Tensor,
        rerouted_per_expert: torch.Tensor,
        routed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Add one dispatched batch: final expert ids [T, k], kept mask [T, k], overflow counts [E];
        returns the rows each expert received in it (`routed`, shared expert last, when the router
        counted them already)."""
        self.dispatches += 1
        if routed is None:
            routed = torch.bincount(plan_ids[kept].long(), minlength=self.num_placed_experts)
            if shared_rows:
                routed[-1] += shared_rows
        self.routed_rows[layer] += routed
        self.dropped_slots[layer][: dropped_per_expert.numel()] += dropped_per_expert
        self.rerouted_slots[layer][: rerouted_per_expert.numel()] += rerouted_per_expert
        return routed

    def to_proto(self) -> list[moe_pb2.ExpertCounters]:
        return [
            moe_pb2.ExpertCounters(
                layer=layer,
                expert=expert,
                routed_rows=int(self.routed_rows[layer][expert]),
                dropped_slots=int(self.dropped_slots[layer][expert]),
                rerouted_slots=int(self.rerouted_slots[layer][expert]),
            )
            for layer in sorted(self.routed_rows)
            for expert in range(self.num_placed_experts)
        ]


class GatewayAdminServicer(moe_grpc.GatewayAdminServicer):
    def __init__(
        self, counters: ExpertCounters, admission: AdmissionController, live_state: LiveState, pending: Sized
    ) -> None:
        self.counters, self.admission, self.live_state, self.pending = counters, admission, live_state, pending

    async def GetLiveState(self, request: moe_pb2.LiveStateRequest, context: aio.ServicerContext) -> moe_pb2.LiveState:
        return moe_pb2.LiveState(json=json.dumps(await self.live_state.document()))

    async def GetStats(
        self, request: moe_pb2.GatewayStatsRequest, context: aio.ServicerContext
    ) -> moe_pb2.GatewayStats:
        batched_requests, running_batches = self.admission.batch_occupancy()
        return moe_pb2.GatewayStats(
            experts=self.counters.to_proto(),
            requests=self.admission.admitted,
            rejected_requests=self.admission.rejected,
            inflight_tokens=self.admission.inflight_tokens,
            dispatches=self.counters.dispatches,
            inflight_requests=self.admission.inflight_requests,
            pending_dispatches=len(self.pending),
            batched_requests=batched_requests,
            running_batches=running_batches,
        )
