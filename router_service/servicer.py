"""gRPC servicer of the router: protobuf in, RoutingPlanner + Dispatcher, protobuf out."""

from __future__ import annotations

import asyncio
import time

import torch
from grpc import aio
from opentelemetry.trace import SpanKind, Tracer

from moe_serve.cluster.placement import ExpertKey
from moe_serve.protos import moe_serve_pb2 as moe_pb2
from moe_serve.protos import moe_serve_pb2_grpc as moe_grpc
from moe_serve.runtime import codec
from moe_serve.runtime.errors import InvalidInput, Overloaded, ServiceUnavailable, failure_of, quoted
from moe_serve.runtime.streams import serve_stream
from moe_serve.runtime.telemetry import ROUTE_STREAM, child_span, extract_context, record_soon, rpc_span
from router_service.fanout import Dispatcher, DispatchJob, LocalDelivery
from router_service.metrics import RouterMetrics
from router_service.planner import RoutingDecision, RoutingPlanner, WorkerBatch, cross_node_rows, segments_of
from router_service.registry import Registry


class RouterServicer(moe_grpc.RouterServicer):
    def __init__(
        self,
        planner: RoutingPlanner,
        registry: Registry,
        dispatcher: Dispatcher,
        model_name: str,
        tracer: Tracer,
        metrics: RouterMetrics | None = None,
    ) -> None:
        self.planner, self.registry, self.dispatcher, self.model_name = planner, registry, dispatcher, model_name
        self.tracer, self.metrics = tracer, metrics
        self.draining = False  # set on shutdown: new routes are refused, routed batches finish
        spec = planner.spec
        self._all_experts = [ExpertKey(layer, e) for layer in spec.moe_layers for e in range(spec.num_placed_experts)]
        # shared experts take a row of every token: served on the token's main node where they have a replica
        self._shared_ids = frozenset(range(spec.num_experts, spec.num_placed_experts))

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
            num_shared_slots=spec.num_shared_slots,
            weights_in_activation_dtype=spec.routing.weights_in_activation_dtype,
            default_expert_capacity=spec.default_expert_capacity,
        )

    async def RouteStream(self, requests: object, context: aio.ServicerContext) -> None:
        await serve_stream(context, self.route, lambda _, error: moe_pb2.RoutePlan(failure=failure_of(error)))

    async def route(self, request: moe_pb2.RouteRequest) -> moe_pb2.RoutePlan:
        """Gate one batch, start its rows towards the workers, and return the plan once they are written."""
        with rpc_span(self.tracer, ROUTE_STREAM, SpanKind.SERVER, extract_context(request.trace_context)):
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
            decision, rows_written = self._route(request, hidden, None)
            await rows_written  # the rows first: the plan is needed only when they come back
            return self._plan(decision, request.return_router_logits)

    async def route_local(
        self, request: moe_pb2.RouteRequest, hidden: torch.Tensor, local: LocalDelivery
    ) -> RoutingDecision:
        """The embedded router: the gateway's own call, in its process. `hidden` [T, d] is already in
        the compute dtype (`request.hidden_states` stays empty), and the rows go to `local`.

        Returns the decision as soon as the sends have started: no plan message has to wait for
        the rows here, and the gateway reads the decision while the rows are on their way."""
        with child_span(self.tracer, "router.route"):
            decision, _ = self._route(request, hidden, local)
            await asyncio.sleep(0)  # the sends run up to their writes before the caller goes on
            return decision

    def _route(
        self, request: moe_pb2.RouteRequest, hidden: torch.Tensor, local: LocalDelivery | None
    ) -> tuple[RoutingDecision, asyncio.Future[None]]:
        if self.draining:
            raise ServiceUnavailable("this router is shutting down")
        if request.overflow not in ("", "drop", "reroute"):
            raise InvalidInput(f"overflow must be 'drop' or 'reroute', got {quoted(request.overflow)}")
        started = time.perf_counter()
        with child_span(self.tracer, "router.gating"):
            decision = self.planner.decide(hidden, request.layer, request.expert_capacity, request.overflow or "drop")
        if self.metrics is not None:  # recorded after the fan-out below is under way
            record_soon(self.metrics.gating, time.perf_counter() - started)
        with child_span(self.tracer, "router.dispatch"):
            batches = self.dispatcher.assign(
                request.layer, segments_of(decision.groups), frozenset(), self._shared_ids, decision.slots_per_token
            )
            self.dispatcher.cross_node_rows[request.layer] += cross_node_rows(batches, decision.slots_per_token)
            self._check_replica_bound(batches, request.max_inflight_rows_per_replica)
            # the background sends inherit this span's context (asyncio tasks copy the context)
            rows_written = self.dispatcher.launch(
                DispatchJob(
                    request_id=request.request_id,
                    layer=request.layer,
                    hidden_states=hidden,
                    slots_per_token=decision.slots_per_token,
                    delivery_address=request.delivery_address,
                    deadline=time.monotonic() + request.timeout_s if request.timeout_s > 0 else None,
                    local=local,
                ),
                batches,
            )
        if self.dispatcher.hints is not None:  # offloading workers: hint the next layer's likely experts
            self.dispatcher.hints.after_route(request.sequence_id, request.layer, decision.outcome.expert_ids)
        return decision, rows_written

    def _check_replica_bound(self, batches: list[WorkerBatch], bound: int) -> None:
        """Refuse before any row leaves when a replica would exceed `bound` rows in flight (0 = none)."""
        if bound <= 0:
            return
        for batch in batches:
            inflight = self.dispatcher.outstanding_rows(batch.worker)
            if inflight + batch.num_rows > bound:
                raise Overloaded(
                    f"worker {batch.worker.worker_id} (experts {list(batch.experts)}) has {inflight} rows in flight; "
                    f"{batch.num_rows} more would exceed max_inflight_rows_per_replica={bound}; retry with backoff",
                    reason="replica_rows",
                )

    def _plan(self, decision: RoutingDecision, with_logits: bool) -> moe_pb2.RoutePlan:
        dropped, rerouted = decision.overflow_counts(self.planner.spec.num_experts)
        plan = moe_pb2.RoutePlan(
            expert_ids=codec.to_proto(decision.outcome.expert_ids.to(torch.int32)),
            expert_weights=codec.to_proto(decision.expert_weights),
            dropped=codec.to_proto(decision.outcome.dropped),
            rerouted=codec.to_proto(decision.outcome.rerouted),
            shared_weights=codec.to_proto(decision.gating.shared_weights),
            dropped_per_expert=codec.to_proto(dropped),
            rerouted_per_expert=codec.to_proto(rerouted),
            expected_rows=int(decision.groups.positions.numel()),
        )
        if with_logits:
            codec.fill_proto(plan.router_logits, decision.gating.router_logits)
        return plan

    async def GetExpertLoad(
        self, request: moe_pb2.ExpertLoadRequest, context: aio.ServicerContext
    ) -> moe_pb2.ExpertLoadReply:
        return moe_pb2.ExpertLoadReply(
            experts=[
                moe_pb2.ExpertLoad(
                    layer=key.layer,
                    expert=key.expert,
                    rows=self.dispatcher.expert_rows[key],
                    replicas=len(self.registry.replicas(key)),
                )
                for key in self._all_experts
            ],
            worker_rows=dict(self.dispatcher.worker_rows),
            cross_node_rows=dict(self.dispatcher.cross_node_rows),
        )

    async def SetReplicaShares(
        self, request: moe_pb2.ReplicaShares, context: aio.ServicerContext
    ) -> moe_pb2.ReplicaSharesAck:
        table: dict[ExpertKey, dict[str, float]] = {}
        for item in request.shares:
            if not item.share >= 0:  # also refuses NaN
                raise InvalidInput(f"replica share {item.share} of worker {item.worker_id!r} is not >= 0")
            key = ExpertKey(item.expert.layer, item.expert.expert)
            table.setdefault(key, {})[item.worker_id] = item.share
        self.dispatcher.replica_shares = table
        return moe_pb2.ReplicaSharesAck(experts=len(table))

    async def ListWorkers(
        self, request: moe_pb2.ListWorkersRequest, context: aio.ServicerContext
    ) -> moe_pb2.ListWorkersReply:
        return moe_pb2.ListWorkersReply(workers=[record.to_proto() for record in self.registry.workers()])
