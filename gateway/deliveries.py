"""Expert outputs delivered by workers, collected per pending request.

Deliveries can arrive before the router's plan does; a request completes when the plan is known
and every kept slot has been filled once. Workers learn of a request that is gone (finished,
cancelled, expired) through NOT_FOUND, and stop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import torch
from grpc import aio
from opentelemetry.trace import SpanKind, Tracer

from moe_serve.layer.combine import CombineBuffer
from moe_serve.protos import moe_serve_pb2 as moe_pb2
from moe_serve.protos import moe_serve_pb2_grpc as moe_grpc
from moe_serve.runtime import codec
from moe_serve.runtime.errors import MoEServeError, RequestNotFound, error_of, failure_of
from moe_serve.runtime.streams import serve_stream
from moe_serve.runtime.telemetry import DELIVERY_STREAM, extract_context, rpc_span
from moe_serve.runtime.transports import ACCEPT_KEY, DEFAULT_TRANSPORTS, RegionAccess, attach, received_tensor


class PendingRequest:
    """Collects the rows of one request; `done` resolves when all arrived or one batch failed."""

    def __init__(self, num_tokens: int, top_k: int, hidden_size: int, dtype: torch.dtype) -> None:
        self.buffer = CombineBuffer(num_tokens, top_k, hidden_size, dtype)
        self.expected_rows: int | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def expect(self, rows: int) -> None:
        self.expected_rows = rows
        self._check_complete()

    def add_rows(self, positions: torch.Tensor, rows: torch.Tensor) -> int:
        if self.done.done():
            return 0
        accepted = self.buffer.add(positions, rows)
        self._check_complete()
        return accepted

    def fail(self, error: MoEServeError) -> None:
        if not self.done.done():
            self.done.set_exception(error)

    def _check_complete(self) -> None:
        if self.expected_rows is not None and self.buffer.rows_filled >= self.expected_rows and not self.done.done():
            self.done.set_result(None)


class PendingRequests:
    """Requests this gateway is waiting on, by request id."""

    def __init__(self) -> None:
        self._requests: dict[str, PendingRequest] = {}

    def __len__(self) -> int:
        return len(self._requests)

    def open(self, request_id: str, pending: PendingRequest) -> None:
        self._requests[request_id] = pending

    def close(self, request_id: str) -> None:
        pending = self._requests.pop(request_id, None)
        if pending is not None and not pending.done.done():
            pending.done.cancel()

    def get(self, request_id: str) -> PendingRequest:
        pending = self._requests.get(request_id)
        if pending is None:
            raise RequestNotFound(f"request {request_id!r} is not pending here (finished, cancelled or expired)")
        return pending

    # the embedded router hands rows and failures over here, with no delivery message (fanout.LocalDelivery)
    def deliver(self, request_id: str, positions: torch.Tensor, rows: torch.Tensor) -> int:
        return self.get(request_id).add_rows(positions, rows)

    def fail(self, request_id: str, error: MoEServeError) -> None:
        pending = self._requests.get(request_id)
        if pending is not None:
            pending.fail(error)


class DeliveryServicer(moe_grpc.DeliveryServiceServicer):
    """Internal endpoint where workers (and the router, for failures) deliver to this gateway. A worker's
    stream may offer an arena for its outputs (moe_serve/runtime/transports.py): the gateway maps it
    (same host) or transfers from it (NIXL) when one of its own `transports` reaches it."""

    def __init__(
        self, pending: PendingRequests, tracer: Tracer, transports: Sequence[str] = DEFAULT_TRANSPORTS
    ) -> None:
        self.pending, self.tracer, self.transports = pending, tracer, tuple(transports)

    async def DeliveryStream(self, requests: object, context: aio.ServicerContext) -> None:
        arena = attach(context.invocation_metadata(), self.transports, "gateway deliveries")
        try:
            await serve_stream(
                context,
                lambda delivery: self.deliver(delivery, arena),
                lambda _, error: moe_pb2.DeliveryAck(failure=failure_of(error)),
                initial_metadata=((ACCEPT_KEY, arena.transport if arena is not None else "0"),),
            )
        finally:
            if arena is not None:
                arena.close()

    async def deliver(self, delivery: moe_pb2.Delivery, arena: RegionAccess | None = None) -> moe_pb2.DeliveryAck:
        with rpc_span(self.tracer, DELIVERY_STREAM, SpanKind.SERVER, extract_context(delivery.trace_context)):
            pending = self.pending.get(delivery.request_id)
            if delivery.HasField("failure"):
                pending.fail(error_of(delivery.failure))
                return moe_pb2.DeliveryAck()
            positions = codec.from_proto(delivery.positions, "positions")
            region = delivery.rows_region if delivery.HasField("rows_region") else None
            rows = await received_tensor(delivery.rows, region, arena, "rows")
            # copied into the combine buffer here: the worker may reuse the region once this is answered
            return moe_pb2.DeliveryAck(rows_accepted=pending.add_rows(positions, rows))
