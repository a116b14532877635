"""The gateway's request path, free of KServe protobuf: admit, route, collect, combine.

One request: admission holds its tokens; the capacity policy turns into a per-expert limit;
the router gets the hidden states and answers with the routing plan while it fans the rows out;
workers deliver expert outputs straight here; the combine step reduces them to the output.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import torch
from grpc import aio

from gateway.admission import AdmissionController
from gateway.converters import OUTPUT_NAME, InferenceRequest, InferenceResult
from gateway.deliveries import PendingRequest, PendingRequests
from gateway.model import ServedModel
from moe_serve import codec
from moe_serve.capacity import compute_expert_capacity
from moe_serve.errors import DeadlineExceeded, ServiceUnavailable, error_of
from moe_serve.protos import moe_serve_pb2 as moe_pb2
from moe_serve.streams import StreamClient


class DataPlane:
    def __init__(
        self,
        model: ServedModel,
        router: StreamClient[moe_pb2.RouteRequest, moe_pb2.RoutePlan],
        model_info: Callable[[], Awaitable[moe_pb2.ModelInfo]],
        admission: AdmissionController,
        pending: PendingRequests,
        delivery_address: str,
        capacity_factor: float,
    ) -> None:
        self.model, self.router, self._model_info = model, router, model_info
        self.admission, self.pending = admission, pending
        self.delivery_address, self.capacity_factor = delivery_address, capacity_factor

    async def ready(self) -> bool:
        """True when the router answers and every expert has a live replica."""
        try:
            info = await self._model_info()
        except aio.AioRpcError:
            return False
        return info.ready

    async def infer(self, request: InferenceRequest, timeout_s: float) -> InferenceResult:
        """Run one request within `timeout_s` seconds (the client's remaining deadline or the default)."""
        deadline = time.monotonic() + timeout_s
        model = self.model
        with self.admission.admit(request.num_tokens):
            hidden = request.hidden_states.to(model.compute_dtype)
            pending = PendingRequest(request.num_tokens, model.top_k, model.hidden_size, model.compute_dtype)
            self.pending.open(request.request_id, pending)
            try:
                plan = await self._route(request, hidden, deadline)
                pending.expect(int(plan.expected_rows))
                await self._wait(pending, deadline)
                weights = codec.from_proto(plan.expert_weights, "expert_weights")
                output = pending.buffer.combine(weights).to(request.hidden_states.dtype)
            finally:
                self.pending.close(request.request_id)
        return InferenceResult(tensors=self._select_outputs(request, output, plan))

    async def _route(self, request: InferenceRequest, hidden: torch.Tensor, deadline: float) -> moe_pb2.RoutePlan:
        capacity = compute_expert_capacity(
            request.num_tokens, self.model.top_k, self.model.num_experts, self.capacity_factor
        )
        remaining = max(0.0, deadline - time.monotonic())
        route_request = moe_pb2.RouteRequest(
            request_id=request.request_id,
            timeout_s=remaining,
            layer=request.layer,
            hidden_states=codec.to_proto(hidden),
            expert_capacity=capacity,
            delivery_address=self.delivery_address,
            return_router_logits="router_logits" in request.requested_outputs,
        )
        try:
            plan = await self.router.call(route_request, remaining)
        except ServiceUnavailable as error:
            raise ServiceUnavailable(f"router unreachable: {error.message}") from None
        if plan.HasField("failure"):
            raise error_of(plan.failure)
        return plan

    @staticmethod
    async def _wait(pending: PendingRequest, deadline: float) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(pending.done), timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            received = pending.buffer.rows_filled
            raise DeadlineExceeded(
                f"deadline passed with {received} of {pending.expected_rows} expert rows delivered"
            ) from None

    def _select_outputs(
        self, request: InferenceRequest, output: torch.Tensor, plan: moe_pb2.RoutePlan
    ) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for name in request.requested_outputs:
            if name == OUTPUT_NAME:
                tensors[name] = output
            elif name == "router_logits":
                tensors[name] = codec.from_proto(plan.router_logits, name)
            elif name == "expert_ids":
                tensors[name] = codec.from_proto(plan.expert_ids, name)
            elif name == "expert_weights":
                tensors[name] = codec.from_proto(plan.expert_weights, name)
        return tensors
