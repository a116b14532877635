"""Cross-request dynamic batching: concurrent requests for the same MoE layer ride one dispatch.

Like Triton's dynamic batcher and MLServer's adaptive batching: the first request for a layer
opens a window (`batch_window_s`); requests for the same layer arriving within it join, up to
`max_batch_tokens`; then the batch is dispatched as one, so each expert runs one larger matmul,
and every request gets exactly its own rows back. A request waits no longer than its own
deadline, and one that is cancelled or expires leaves the batch still being collected at once
(its tokens no longer count towards `max_batch_tokens`); one whose batch is already dispatched
just stops waiting for it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from opentelemetry.trace import Span, Tracer

from gateway.converters import InferenceRequest, InferenceResult
from moe_serve.runtime.errors import DeadlineExceeded

Dispatch = Callable[[list[InferenceRequest], float], Awaitable[list[InferenceResult]]]


@dataclass(eq=False)  # identity: a batch's items are told apart by who submitted them
class _Waiting:
    request: InferenceRequest
    deadline: float
    future: asyncio.Future[InferenceResult]
    queued: Span  # the request's time in the batch queue (ends when its batch is dispatched)


@dataclass
class _Open:
    """The batch being collected for one layer."""

    items: list[_Waiting] = field(default_factory=list)
    tokens: int = 0
    timer: asyncio.TimerHandle | None = None


class DynamicBatcher:
    def __init__(self, dispatch: Dispatch, window_s: float, max_batch_tokens: int, tracer: Tracer) -> None:
        self._dispatch, self.window_s, self.max_batch_tokens, self.tracer = dispatch, window_s, max_batch_tokens, tracer
        self._open: dict[int, _Open] = {}
        self._running: set[asyncio.Task[None]] = set()
        self.batches_dispatched = 0

    def occupancy(self) -> tuple[int, int]:
        """(requests waiting in open batches, batches dispatched and not finished): 0 when idle."""
        return sum(len(batch.items) for batch in self._open.values()), len(self._running)

    async def submit(self, request: InferenceRequest, deadline: float) -> InferenceResult:
        """Join the open batch of the request's layer and wait for this request's result."""
        loop = asyncio.get_running_loop()
        batch = self._open.setdefault(request.layer, _Open())
        if batch.items and batch.tokens + request.num_tokens > self.max_batch_tokens:
            self._flush(request.layer)
            batch = self._open.setdefault(request.layer, _Open())
        waiting = _Waiting(request, deadline, loop.create_future(), self.tracer.start_span("gateway.queue"))
        batch.items.append(waiting)
        batch.tokens += request.num_tokens
        if batch.tokens >= self.max_batch_tokens:
            self._flush(request.layer)
        elif batch.timer is None:
            batch.timer = loop.call_later(self.window_s, self._flush, request.layer)
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                return await waiting.future
        except TimeoutError:
            raise DeadlineExceeded("the request's deadline passed while it was batched or computed") from None
        finally:
            self._withdraw(request.layer, batch, waiting)

    def _withdraw(self, layer: int, batch: _Open, waiting: _Waiting) -> None:
        """Take a request that stopped waiting (cancelled, expired) out of its batch if still open."""
        if self._open.get(layer) is not batch or waiting not in batch.items:
            return  # dispatched already (or answered): nothing is held for it here
        batch.items.remove(waiting)
        batch.tokens -= waiting.request.num_tokens
        waiting.queued.end()
        if not batch.items:
            if batch.timer is not None:
                batch.timer.cancel()
            del self._open[layer]

    def _flush(self, layer: int) -> None:
        batch = self._open.pop(layer, None)
        if batch is None:
            return
        if batch.timer is not None:
            batch.timer.cancel()
        for item in batch.items:
            item.queued.end()
        items = [item for item in batch.items if not item.future.done()]  # done = cancelled or expired
        if items:
            task = asyncio.get_running_loop().create_task(self._run(items))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, items: list[_Waiting]) -> None:
        self.batches_dispatched += 1
        try:
            results = await self._dispatch([item.request for item in items], max(item.deadline for item in items))
        except Exception as error:  # every request of the batch gets the batch's error
            for item in items:
                if not item.future.done():
                    item.future.set_exception(error)
            return
        for item, result in zip(items, results, strict=True):
            if not item.future.done():
                item.future.set_result(result)
