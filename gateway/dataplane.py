"""The gateway's request path, free of KServe protobuf: admit, batch, route, collect, combine.

One dispatch batch (one request, or several concurrent ones when cross-request batching is on):
the capacity policy turns into a per-expert limit over the batch; the router (a service, or inside
this process: gateway/routing.py) gets the hidden states and answers with the routing plan while it
fans the rows out; workers deliver expert outputs straight here; the combine step reduces them, and
each request gets its own rows back.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace

import torch
from grpc import aio
from opentelemetry.trace import Tracer

from gateway.admission import AdmissionController
from gateway.batching import DynamicBatcher
from gateway.capacity_policy import CapacityPolicy
from gateway.converters import OUTPUT_NAME, InferenceRequest, InferenceResult
from gateway.deliveries import PendingRequest, PendingRequests
from gateway.live_state import LoadWindow
from gateway.model import ServedModel
from gateway.routing import Plan, Router
from gateway.stats import ExpertCounters
from moe_serve.protos import moe_serve_pb2 as moe_pb2
from moe_serve.runtime.errors import DeadlineExceeded, Overloaded, ServiceUnavailable
from moe_serve.runtime.telemetry import child_span, inject_context, record_soon


class DataPlane:
    def __init__(
        self,
        model: ServedModel,
        router: Router,
        model_info: Callable[[], Awaitable[moe_pb2.ModelInfo]],
        admission: AdmissionController,
        pending: PendingRequests,
        delivery_address: str,
        policy: CapacityPolicy,
        counters: ExpertCounters,
        window: LoadWindow,
        tracer: Tracer,
        wire: Callable[[str, str, int], None],
        max_inflight_rows_per_replica: int = 0,
        batch_window_s: float = 0.0,
        max_batch_tokens: int = 8192,
        pipeline_chunk_tokens: int = 0,
    ) -> None:
        self.model, self.router, self._model_info = model, router, model_info
        self.admission, self.pending, self.delivery_address = admission, pending, delivery_address
        self.policy, self.counters, self.window, self.tracer, self.wire = policy, counters, window, tracer, wire
        self.max_inflight_rows_per_replica = max_inflight_rows_per_replica
        self.pipeline_chunk_tokens = pipeline_chunk_tokens
        # (route, collect, combine seconds) of each dispatch batch; the servicer records them
        self.record_stages: Callable[[float, float, float], None] = lambda route, collect, combine: None
        self.draining = False  # set on shutdown: new requests are refused, admitted ones finish
        self.batcher = (
            DynamicBatcher(self.dispatch, batch_window_s, max_batch_tokens, tracer) if batch_window_s > 0 else None
        )
        if self.batcher is not None:
            admission.batch_occupancy = self.batcher.occupancy

    async def ready(self) -> bool:
        """True when the router answers and every expert has a live replica."""
        try:
            info = await self._model_info()
        except aio.AioRpcError:
            return False
        return info.ready

    async def infer(self, request: InferenceRequest, timeout_s: float) -> InferenceResult:
        """Run one request within `timeout_s` seconds (the client's remaining deadline or the default)."""
        if self.draining:
            raise ServiceUnavailable("this gateway is shutting down; send the request to another replica")
        deadline = time.monotonic() + timeout_s
        try:
            with self.admission.admit(request.num_tokens):
                if self.batcher is not None:
                    return await self.batcher.submit(request, deadline)
                chunks = self._pipeline_chunks(request)
                if len(chunks) > 1:
                    return await self._pipelined(chunks, deadline)
                return (await self.dispatch([request], deadline))[0]
        except Overloaded:
            # counted here, once per request, whichever bound refused it: the gateway's tokens in
            # flight, the message size to the router, or the router's rows in flight per replica
            self.admission.rejected += 1
            raise

    def _pipeline_chunks(self, request: InferenceRequest) -> list[InferenceRequest]:
        """`request` as near-equal token chunks of at most pipeline_chunk_tokens, or alone.

        Only where chunks are independent: a capacity limit counts rows over the whole batch, and a
        sequence's token order (prefetch hints) holds for one request. Near-equal sizes, not a
        short remainder: CPU BLAS takes another path for one or two rows, whose sums differ.
        """
        chunk = self.pipeline_chunk_tokens
        if not chunk or request.num_tokens <= chunk or not self.policy.dropless or request.sequence_id:
            return [request]
        parts = -(-request.num_tokens // chunk)
        return [replace(request, hidden_states=part) for part in request.hidden_states.tensor_split(parts)]

    async def _pipelined(self, chunks: list[InferenceRequest], deadline: float) -> InferenceResult:
        """Dispatch the chunks concurrently (each a batch of its own) and join their results in order.

        While the router gates one chunk, the workers compute another and the gateway combines a
        third. A failing chunk cancels the others (TaskGroup), so the request fails as a whole,
        with that chunk's error (and so its gRPC status), not the TaskGroup's exception group.
        """
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self.dispatch([chunk], deadline)) for chunk in chunks]
        except BaseExceptionGroup as failures:
            raise failures.exceptions[0] from None
        results = [task.result()[0] for task in tasks]
        return InferenceResult(
            tensors={name: torch.cat([r.tensors[name] for r in results]) for name in results[0].tensors},
            dropped_slots=sum(r.dropped_slots for r in results),
            rerouted_slots=sum(r.rerouted_slots for r in results),
            dispatched_at=min(r.dispatched_at for r in results),
        )

    async def dispatch(self, requests: list[InferenceRequest], deadline: float) -> list[InferenceResult]:
        """Route, collect and combine `requests` as one batch; each gets its own rows back."""
        model, dispatched_at = self.model, time.monotonic()
        hidden = (
            torch.cat([r.hidden_states.to(model.compute_dtype) for r in requests])
            if len(requests) > 1
            else requests[0].hidden_states.to(model.compute_dtype)
        )
        batch_id = uuid.uuid4().hex
        pending = PendingRequest(hidden.shape[0], model.slots_per_token, model.hidden_size, model.compute_dtype)
        self.pending.open(batch_id, pending)
        try:
            wanted = {name for r in requests for name in r.requested_outputs}
            routing = time.perf_counter()
            with child_span(self.tracer, "gateway.route"):
                # a sequence's token order holds for one request only, not for a batch of several
                sequence_id = requests[0].sequence_id if len(requests) == 1 else ""
                plan = await self._route(
                    batch_id, requests[0].layer, hidden, "router_logits" in wanted, deadline, sequence_id
                )
            planned = time.perf_counter()
            pending.expect(plan.expected_rows)
            with child_span(self.tracer, "gateway.collect"):
                await self._wait(pending, deadline)
            collected = time.perf_counter()
        finally:
            self.pending.close(batch_id)
        with child_span(self.tracer, "gateway.combine"):
            output = pending.buffer.combine(plan.expert_weights, plan.shared_weights, model.weights_in_activation_dtype)
        self.record_stages(planned - routing, collected - planned, time.perf_counter() - collected)
        # statistics wait until the answer is on its way: they are not on the request's critical path
        record_soon(self._count, requests[0].layer, plan, hidden.shape[0])
        return self._split(requests, output, plan, dispatched_at)

    async def _route(
        self,
        batch_id: str,
        layer: int,
        hidden: torch.Tensor,
        with_logits: bool,
        deadline: float,
        sequence_id: str = "",
    ) -> Plan:
        model = self.model
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            # on the wire, timeout_s 0 means "no deadline": an expired batch must never leave
            raise DeadlineExceeded("the request's deadline passed before it was routed")
        route_request = moe_pb2.RouteRequest(
            request_id=batch_id,
            timeout_s=remaining,
            layer=layer,
            expert_capacity=self.policy.limit(hidden.shape[0], model.top_k, model.num_experts),
            overflow=self.policy.overflow,
            max_inflight_rows_per_replica=self.max_inflight_rows_per_replica,
            delivery_address=self.delivery_address,
            return_router_logits=with_logits,
            sequence_id=sequence_id,
        )
        inject_context(route_request.trace_context)
        return await self.router.route(route_request, hidden, remaining)

    @staticmethod
    async def _wait(pending: PendingRequest, deadline: float) -> None:
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await asyncio.shield(pending.done)
        except TimeoutError:
            received = pending.buffer.rows_filled
            raise DeadlineExceeded(
                f"deadline passed with {received} of {pending.expected_rows} expert rows delivered"
            ) from None

    def _count(self, layer: int, plan: Plan, num_tokens: int) -> None:
        kept = ~plan.dropped
        dropped_per_expert, rerouted_per_expert = plan.overflow_counts()
        routed = self.counters.record(
            layer,
            plan.expert_ids,
            kept,
            num_tokens * self.model.num_shared_slots,
            dropped_per_expert,
            rerouted_per_expert,
            plan.routed_per_expert,
        )
        self.window.record_dispatch(layer, routed, int(plan.dropped.sum()), kept.numel())

    def _split(
        self, requests: list[InferenceRequest], output: torch.Tensor, plan: Plan, dispatched_at: float
    ) -> list[InferenceResult]:
        """Each request's rows of the batch outputs, by its token range."""
        batch_tensors = {
            "router_logits": plan.router_logits,
            "expert_ids": plan.expert_ids,
            "expert_weights": plan.expert_weights,
            "dropped_mask": plan.dropped,
        }
        dropped, rerouted = plan.dropped, plan.rerouted
        dropless = self.policy.dropless  # nothing dropped or rerouted: no per-request sums to take
        results, start = [], 0
        for request in requests:
            rows = slice(start, start + request.num_tokens)
            start += request.num_tokens
            tensors: dict[str, torch.Tensor] = {}
            for name in request.requested_outputs:
                if name == OUTPUT_NAME:
                    tensors[name] = output[rows].to(request.hidden_states.dtype)
                else:
                    tensors[name] = batch_tensors[name][rows]
            results.append(
                InferenceResult(
                    tensors=tensors,
                    dropped_slots=0 if dropless else int(dropped[rows].sum()),
                    rerouted_slots=0 if dropless else int(rerouted[rows].sum()),
                    dispatched_at=dispatched_at,
                )
            )
        return results
