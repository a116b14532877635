"""gRPC servicer of the router: protobuf in, RoutingPlanner + Dispatcher, protobuf out."""

from __future__ import annotations

import time

import torch
from grpc import aio

from moe_serve import codec
from moe_serve.errors import InvalidInput, failure_of
from moe_serve.placement import ExpertKey
from moe_serve.protos import moe_serve_pb2 as moe_pb2
from moe_serve.protos import moe_serve_pb2_grpc as moe_grpc
from moe_serve.registry import Registry
from moe_serve.streams import serve_stream
from router_service.fanout import Dispatcher, DispatchJob
from router_service.planner import RoutingPlanner, assign_workers, segments_of


class RouterServicer(moe_grpc.RouterServicer):
    def __init__(self, planner: RoutingPlanner, registry: Registry, dispatcher: Dispatcher, model_name: str) -> None:
        self.planner, self.registry, self.dispatcher, self.model_name = planner, registry, dispatcher, model_name
        spec = planner.spec
        self._all_experts = [ExpertKey(layer, e) for layer in spec.moe_layers for e in range(spec.num_experts)]

    def ready(self) -> bool:
        return self.registry.covers(self._all_experts)

    async def GetModelInfo(self, request: moe_pb2.ModelInfoRequest, context: aio.ServicerContext) -> moe_pb2.ModelInfo:
        spec = self.planner.spec
        return moe_pb2.ModelInfo(
            model_name=self.model_name,
            family=spec.routing.family,
            hidden_size=spec.hidden_size,
            num_experts=spec.num_experts,
            top_k=spec.top_k,
            moe_layers=list(spec.moe_layers),
            num_layers=spec.num_layers,
            compute_datatype=codec.datatype_name(self.planner.dtype),
            ready=self.ready(),
        )

    async def RouteStream(self, requests: object, context: aio.ServicerContext) -> None:
        await serve_stream(context, self.route, lambda _, error: moe_pb2.RoutePlan(failure=failure_of(error)))

    async def route(self, request: moe_pb2.RouteRequest) -> moe_pb2.RoutePlan:
        """Gate one batch, start its rows towards the workers, and return the plan right away."""
        spec = self.planner.spec
        hidden = codec.from_proto(request.hidden_states, "hidden_states")
        if hidden.dim() != 2 or hidden.shape[1] != spec.hidden_size or hidden.dtype != self.planner.dtype:
            raise InvalidInput(
                f"hidden_states must be {codec.datatype_name(self.planner.dtype)} "
                f"[T, {spec.hidden_size}], got {request.hidden_states.datatype} "
                f"{list(request.hidden_states.shape)}"
            )
        if not request.delivery_address:
            raise InvalidInput("delivery_address is required: workers deliver the expert outputs there")
        decision = self.planner.decide(hidden, request.layer, request.expert_capacity)
        batches = assign_workers(
            request.layer, segments_of(decision.groups), self.registry, self.dispatcher.load, self.dispatcher.rng
        )
        self.dispatcher.launch(
            DispatchJob(
                request_id=request.request_id,
                layer=request.layer,
                hidden_states=hidden,
                top_k=spec.top_k,
                delivery_address=request.delivery_address,
                deadline=time.monotonic() + request.timeout_s if request.timeout_s > 0 else None,
            ),
            batches,
        )
        plan = moe_pb2.RoutePlan(
            expert_ids=codec.to_proto(decision.gating.expert_ids.to(torch.int32)),
            expert_weights=codec.to_proto(decision.expert_weights),
            dropped=codec.to_proto(~decision.kept),
            expected_rows=int(decision.groups.positions.numel()),
        )
        if request.return_router_logits:
            plan.router_logits.CopyFrom(codec.to_proto(decision.gating.router_logits))
        return plan

    async def ListWorkers(
        self, request: moe_pb2.ListWorkersRequest, context: aio.ServicerContext
    ) -> moe_pb2.ListWorkersReply:
        return moe_pb2.ListWorkersReply(workers=[record.to_proto() for record in self.registry.workers()])
