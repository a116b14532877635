"""Fan-out: send each worker its rows concurrently, retry failed batches on other replicas.

The router answers the gateway with the routing plan as soon as the rows are on their way; the
batches then complete in the background. Every batch ends in exactly one of: delivered by a
worker (a worker answers only after the gateway acknowledged the rows), retried on another
replica of the same experts, or reported to the gateway as a failure delivery, so the gateway
never waits for rows that will not come.

A batch a replica sits on far longer than its recent calls took is hedged: sent to another replica
too, the first delivery winning (router_service/stragglers.py). A batch waiting on a worker that the
registry drops for missed heartbeats fails at once, and is retried like any failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import torch
from opentelemetry import trace
from opentelemetry.trace import Tracer

from moe_serve.cluster.placement import ExpertKey
from moe_serve.layer.dispatch import token_indices
from moe_serve.protos import moe_serve_pb2 as moe_pb2
from moe_serve.protos import moe_serve_pb2_grpc as moe_grpc
from moe_serve.runtime import codec
from moe_serve.runtime.errors import (
    ExpertUnavailable,
    InvalidInput,
    MoEServeError,
    ServiceUnavailable,
    error_of,
    failure_of,
)
from moe_serve.runtime.security import INSECURE_INTERNAL, ClusterCredentials
from moe_serve.runtime.shared_arena import Arena, aligned
from moe_serve.runtime.streams import StreamClientPool
from moe_serve.runtime.telemetry import COMPUTE_STREAM, DELIVERY_STREAM, client_span, inject_context, record_soon
from moe_serve.runtime.transports import DEFAULT_TRANSPORTS, stream_arena
from moe_serve.worker_record import WorkerRecord
from router_service.hints import OffloadHints
from router_service.metrics import RouterMetrics
from router_service.planner import WorkerBatch, assign_workers, gather_rows, split_batch
from router_service.registry import Registry
from router_service.retries import RetryBudget, backoff_s
from router_service.stragglers import StragglerWatch

logger = logging.getLogger(__name__)

# codes that mean "this replica could not do it", so another replica may
RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
# codes that mean the gateway no longer waits for the rows: nothing left to do
ABANDON_CODES = frozenset({grpc.StatusCode.NOT_FOUND, grpc.StatusCode.DEADLINE_EXCEEDED})
QUARANTINE_S = 2.0  # a replica that failed a call is avoided this long when another exists
# room a worker message needs beside its rows: ids, addresses, trace context, tensor headers,
# plus at most this much per expert segment
MESSAGE_OVERHEAD_BYTES = 4096
SEGMENT_OVERHEAD_BYTES = 24


class LocalDelivery(Protocol):
    """The gateway's pending requests, when this router runs inside the gateway's process."""

    def deliver(self, request_id: str, positions: torch.Tensor, rows: torch.Tensor) -> int:
        """Place expert output rows; the number accepted. RequestNotFound when no longer awaited."""
        ...

    def fail(self, request_id: str, error: MoEServeError) -> None: ...


@dataclass
class DispatchJob:
    """One routed request whose batches are in flight.

    Workers deliver to `delivery_address` (a gateway's DeliveryService), or, with `local` set (the
    embedded router), answer with the rows themselves, which go to `local` without another hop.
    """

    request_id: str
    layer: int
    hidden_states: torch.Tensor
    slots_per_token: int
    delivery_address: str
    deadline: float | None  # time.monotonic() value, or None for no deadline
    failed: bool = field(default=False)
    local: LocalDelivery | None = None

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()


@dataclass(eq=False, slots=True)
class _Flight:
    """One call of a batch to one replica, and the hedge started if it ran late."""

    worker_id: str
    waiting: bool = True  # the call has not returned
    settled: bool = False  # the rows were delivered, by this call or by its hedge
    hedge: asyncio.Task[None] | None = None
    interrupt: asyncio.Timeout | None = None  # rescheduled to now to stop waiting (the worker left)
    interrupted_by: MoEServeError | None = None

    def fail(self, error: MoEServeError) -> None:
        """Stop waiting for the worker's answer: the call fails with `error`."""
        if self.waiting and self.interrupt is not None and self.interrupted_by is None:
            self.interrupted_by = error
            self.interrupt.reschedule(asyncio.get_running_loop().time())


class Dispatcher:
    def __init__(
        self,
        registry: Registry,
        max_attempts: int,
        max_message_bytes: int,
        split_min_rows: int = 0,
        metrics: RouterMetrics | None = None,
        credentials: ClusterCredentials = INSECURE_INTERNAL,
        hints: OffloadHints | None = None,
        shared_memory_bytes: int = 0,
        tracer: Tracer | None = None,
        transports: Sequence[str] = DEFAULT_TRANSPORTS,
    ) -> None:
        self.registry, self.max_attempts, self.split_min_rows = registry, max_attempts, split_min_rows
        self.tracer = tracer or trace.get_tracer(__name__)
        self.max_message_bytes = max_message_bytes
        self.metrics, self.hints = metrics, hints
        # the placement planner's share of an expert's rows per worker id, set by SetReplicaShares
        self.replica_shares: dict[ExpertKey, dict[str, float]] = {}
        self.retry_budget = RetryBudget()
        if metrics is not None:
            metrics.retry_budget = self.retry_budget
        # rows sent per (layer, expert) since start: the load the balancer measures
        self.expert_rows: Counter[ExpertKey] = Counter()
        # rows per worker id, and per layer the rows sent off their token's main node (planner.cross_node_rows)
        self.worker_rows: Counter[str] = Counter()
        self.cross_node_rows: Counter[int] = Counter()
        if metrics is not None:
            metrics.cross_node_rows = self.cross_node_rows  # exported per layer at each scrape
        # each worker stream offers an arena of this size, shared and/or by NIXL (moe_serve/runtime/transports.py)
        self._workers: StreamClientPool[moe_pb2.ComputeRequest, moe_pb2.ComputeResult] = StreamClientPool(
            lambda channel: moe_grpc.ExpertWorkerStub(channel).ComputeStream,
            max_message_bytes,
            credentials,
            (lambda: stream_arena(shared_memory_bytes, transports)) if shared_memory_bytes > 0 else None,
            decode_reply=moe_pb2.ComputeResult.FromString,  # a worker on this host offers a side channel
        )
        self._gateways: StreamClientPool[moe_pb2.Delivery, moe_pb2.DeliveryAck] = StreamClientPool(
            lambda channel: moe_grpc.DeliveryServiceStub(channel).DeliveryStream, max_message_bytes, credentials
        )
        self._outstanding_rows: dict[str, int] = defaultdict(int)
        self._quarantined_until: dict[str, float] = {}
        self.stragglers = StragglerWatch()
        self._flights: set[_Flight] = set()  # calls waiting for a worker's answer
        self._tasks: set[asyncio.Task[Any]] = set()
        self.rng = random.Random()
        registry.add_listener(self._placement_changed)

    def outstanding_rows(self, worker: WorkerRecord) -> int:
        return self._outstanding_rows[worker.worker_id]

    def load(self, worker: WorkerRecord) -> float:
        """Outstanding rows on a replica, as this router sees them (infinite while quarantined or suspect)."""
        worker_id = worker.worker_id
        if self._quarantined_until.get(worker_id, 0.0) > time.monotonic() or self.stragglers.is_suspect(worker_id):
            return math.inf
        return self._outstanding_rows[worker_id]

    def idle(self) -> bool:
        """True when no routed request still has batches in flight."""
        return not self._tasks

    def assign(
        self,
        layer: int,
        segments: dict[int, torch.Tensor],
        excluded: frozenset[str] = frozenset(),
        follow_tokens: frozenset[int] = frozenset(),
        slots_per_token: int = 1,
    ) -> list[WorkerBatch]:
        """Replicas for each expert's rows (see planner.assign_workers), with this router's load view;
        `follow_tokens` experts (shared ones) go to their token's main node where they have a replica."""
        resident = self.hints.resident if self.hints is not None else None
        shares = self.replica_shares
        return assign_workers(
            layer,
            segments,
            self.registry,
            self.load,
            self.rng,
            excluded,
            self.split_min_rows,
            resident,
            (lambda key: shares.get(key, {})) if shares else None,
            follow_tokens,
            slots_per_token,
        )

    def launch(self, job: DispatchJob, batches: list[WorkerBatch]) -> asyncio.Future[None]:
        """Start sending `batches` in the background.

        The returned future resolves once every first message to a worker has been written (or
        has failed to be): the plan the router answers with is needed only when the rows come
        back, so the rows go out first, ahead of it, on the critical path of every request.
        """
        self.retry_budget.earn()
        handed_off: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        task = self._track(self._send_all(job, batches, attempt=1, excluded=frozenset(), handed_off=handed_off))
        task.add_done_callback(lambda _: _resolve(handed_off))
        return handed_off

    def _track(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._workers.close()
        await self._gateways.close()
        if self.hints is not None:
            await self.hints.close()

    def max_rows_per_message(self, job: DispatchJob, batch: WorkerBatch) -> int:
        """Rows of `batch` one message may carry within the hop's message-size limit.

        A worker's batch for a large request can exceed the limit the request itself fit in (k rows
        per token, several experts on one worker); an oversized message would break the stream that
        every concurrent request to that worker shares, so the batch goes as several messages.
        The delivery back carries the same rows and positions, so it fits too.
        """
        row_bytes = job.hidden_states.shape[1] * job.hidden_states.element_size() + 4  # + int32 position
        room = self.max_message_bytes - MESSAGE_OVERHEAD_BYTES - SEGMENT_OVERHEAD_BYTES * len(batch.experts)
        return max(1, room // row_bytes)

    async def _send_all(
        self,
        job: DispatchJob,
        batches: list[WorkerBatch],
        attempt: int,
        excluded: frozenset[str],
        handed_off: asyncio.Future[None] | None = None,
        hedge_of: _Flight | None = None,
    ) -> bool:
        """Send every batch (in pieces within the message-size limit); True when all their rows are settled."""
        pieces = [piece for batch in batches for piece in split_batch(batch, self.max_rows_per_message(job, batch))]
        unwritten = len(pieces)

        def written() -> None:
            nonlocal unwritten
            unwritten -= 1
            if unwritten == 0 and handed_off is not None:
                _resolve(handed_off)

        if len(pieces) == 1:  # the common case at small T: no gather task between the rows and the wire
            return await self._send(job, pieces[0], attempt, excluded, written, hedge_of)
        sends = (self._send(job, piece, attempt, excluded, written, hedge_of) for piece in pieces)
        return all(await asyncio.gather(*sends))

    async def _send(
        self,
        job: DispatchJob,
        batch: WorkerBatch,
        attempt: int,
        excluded: frozenset[str],
        written: Callable[[], None] | None = None,
        hedge_of: _Flight | None = None,
    ) -> bool:
        """Have `batch.worker` compute and deliver `batch`: hedged if late, retried if it fails.

        Returns True once nothing more is owed for these rows (delivered, here or by the hedge, or the
        gateway no longer waits for them), False when they failed (see _give_up).
        """
        timeout = job.remaining()
        if job.failed or (timeout is not None and timeout <= 0):
            if written is not None:
                written()
            return True  # the gateway has already answered this request
        worker_id = batch.worker.worker_id
        client = self._workers.get(batch.worker.address)
        request = moe_pb2.ComputeRequest(
            request_id=job.request_id,
            timeout_s=timeout or 0.0,
            layer=job.layer,
            segments=[
                moe_pb2.ExpertSegment(expert=e, num_rows=n) for e, n in zip(batch.experts, batch.counts, strict=True)
            ],
            delivery_address=job.delivery_address,
            reply_with_rows=job.local is not None,
        )
        lent = _lend_rows(client.session, request, job, batch)
        payload = (
            0
            if lent is not None
            else codec.fill_proto(request.rows, gather_rows(job.hidden_states, batch.positions, job.slots_per_token))
        )
        payload += codec.fill_proto(request.positions, batch.positions.to(torch.int32))
        if attempt == 1:  # the balancer measures demand: rows sent, retries not counted again
            for expert, count in zip(batch.experts, batch.counts, strict=True):
                self.expert_rows[ExpertKey(job.layer, expert)] += count
            self.worker_rows[worker_id] += batch.num_rows
        if self.metrics is not None:  # recorded once the message is written
            record_soon(self.metrics.wire, "router_to_worker", "sent", payload)
        loop = asyncio.get_running_loop()
        self._outstanding_rows[worker_id] += batch.num_rows
        flight = _Flight(worker_id)
        self._flights.add(flight)
        started = loop.time()
        overdue_s = self.stragglers.overdue_after_s(worker_id, batch.num_rows)
        watch = None  # no timer when the deadline comes first: a hedge could not beat it
        if timeout is None or overdue_s < timeout:
            watch = loop.call_at(started + overdue_s, self._overdue, job, batch, attempt, excluded, flight, overdue_s)
        try:
            async with asyncio.timeout(None) as flight.interrupt:
                with client_span(self.tracer, COMPUTE_STREAM):
                    inject_context(request.trace_context)  # the worker's span continues this one
                    result = await client.call(request, timeout, written, lent.release if lent is not None else None)
            error = error_of(result.failure) if result.HasField("failure") else None
            if error is None and job.local is not None:
                error = _accept_rows(job, job.local, result, lent)
            if lent is not None:  # read (or never written to): the region may serve the next batch
                lent.release()
            if error is None:
                self.stragglers.record(worker_id, loop.time() - started, batch.num_rows)
                if self.hints is not None:
                    self.hints.record(batch.worker, job.layer, result)
            else:
                self.stragglers.answered(worker_id)
        except MoEServeError as call_error:
            error = call_error
        except TimeoutError:
            if flight.interrupted_by is None:  # only flight.fail fires the interrupt
                raise
            error = flight.interrupted_by
        finally:
            flight.waiting = False
            self._flights.discard(flight)
            if watch is not None:
                watch.cancel()
            self._outstanding_rows[worker_id] -= batch.num_rows
        if error is None or error.status_code in ABANDON_CODES:
            flight.settled = True  # delivered, or the gateway no longer waits: a failing hedge fails nothing
        if flight.settled:
            return True
        if flight.hedge is not None and not flight.hedge.done():  # the hedge carries these rows on
            await flight.hedge
            return flight.settled
        if error.status_code in RETRYABLE_CODES:
            self._quarantined_until[worker_id] = time.monotonic() + QUARANTINE_S
            delay = backoff_s(attempt, self.rng)
            remaining = job.remaining()
            if attempt < self.max_attempts and (remaining is None or remaining > delay) and self.retry_budget.spend():
                await asyncio.sleep(delay)
                reason = f"{error.status_code.name}: {error}"
                return await self._retry(job, batch, attempt, excluded | {worker_id}, reason, hedge_of)
        error.message = (
            f"experts {list(batch.experts)} of layer {job.layer} failed on worker {worker_id} "
            f"after {attempt} attempt(s): {error.status_code.name}: {error.message}"
        )
        await self._give_up(job, error, hedge_of)
        return False

    def _overdue(
        self,
        job: DispatchJob,
        batch: WorkerBatch,
        attempt: int,
        excluded: frozenset[str],
        flight: _Flight,
        overdue_s: float,
    ) -> None:
        """Timer: `batch` has waited `overdue_s` on its replica. Suspect the replica, hedge on another one."""
        worker_id = batch.worker.worker_id
        self.stragglers.suspect(worker_id)
        remaining = job.remaining()
        if job.failed or flight.settled or (remaining is not None and remaining <= 0):
            return
        segments = dict(zip(batch.experts, torch.split(batch.positions, list(batch.counts)), strict=True))
        try:
            hedges = self.assign(job.layer, segments, excluded | {worker_id})
        except ExpertUnavailable:
            return  # no other replica: the batch waits for this one, or for the registry to drop it
        if not self.retry_budget.spend(counted=False):
            return
        logger.warning(
            "request %s: worker %s has not answered within %.3f s (its bound for %d rows); hedging experts %s on %s",
            job.request_id,
            worker_id,
            overdue_s,
            batch.num_rows,
            list(batch.experts),
            ", ".join(b.worker.worker_id for b in hedges),
        )
        if self.metrics is not None:
            self.metrics.hedged()
        flight.hedge = self._track(self._hedge(job, hedges, attempt, excluded | {worker_id}, flight))

    async def _hedge(
        self, job: DispatchJob, batches: list[WorkerBatch], attempt: int, excluded: frozenset[str], late: _Flight
    ) -> None:
        if await self._send_all(job, batches, attempt + 1, excluded, hedge_of=late):
            late.settled = True

    def _placement_changed(self) -> None:
        """Registry listener: what still waits on a worker that missed its heartbeats fails at once."""
        self.stragglers.keep_only({record.worker_id for record in self.registry.workers()})
        for record in self.registry.expired:
            for flight in [f for f in self._flights if f.worker_id == record.worker_id]:
                flight.fail(
                    ServiceUnavailable(
                        f"worker {record.worker_id} left the registry (missed heartbeats) with this batch outstanding"
                    )
                )

    async def _retry(
        self,
        job: DispatchJob,
        batch: WorkerBatch,
        attempt: int,
        excluded: frozenset[str],
        reason: str,
        hedge_of: _Flight | None,
    ) -> bool:
        segments = dict(zip(batch.experts, torch.split(batch.positions, list(batch.counts)), strict=True))
        try:
            retry_batches = self.assign(job.layer, segments, excluded)
        except ExpertUnavailable as error:
            error.message = f"{error.message} (last failure: {reason})"
            await self._give_up(job, error, hedge_of)
            return False
        logger.warning(
            "request %s: worker %s failed (%s); retrying experts %s on %s",
            job.request_id,
            batch.worker.worker_id,
            reason,
            list(batch.experts),
            ", ".join(b.worker.worker_id for b in retry_batches),
        )
        if self.metrics is not None:
            self.metrics.retried()
        return await self._send_all(job, retry_batches, attempt + 1, excluded, hedge_of=hedge_of)

    async def _give_up(self, job: DispatchJob, error: MoEServeError, hedge_of: _Flight | None) -> None:
        """These rows cannot be delivered: the request fails, unless they hedge a late call that has
        delivered them or may still."""
        if hedge_of is not None and hedge_of.settled:
            return
        if hedge_of is not None and hedge_of.waiting:
            logger.warning("request %s: a hedge failed (%s); the late call may still deliver", job.request_id, error)
            return
        await self._fail(job, error)

    async def _fail(self, job: DispatchJob, error: MoEServeError) -> None:
        """Tell the gateway the request cannot complete (at most once per request)."""
        if job.failed:
            return
        job.failed = True
        logger.warning("request %s failed: %s", job.request_id, error.message)
        if job.local is not None:
            job.local.fail(job.request_id, error)
            return
        remaining = job.remaining()
        timeout = None if remaining is None else max(remaining, 0.5)
        failure = moe_pb2.Delivery(request_id=job.request_id, failure=failure_of(error), timeout_s=timeout or 0.0)
        with contextlib.suppress(MoEServeError), client_span(self.tracer, DELIVERY_STREAM):
            inject_context(failure.trace_context)
            await self._gateways.get(job.delivery_address).call(failure, timeout)


@dataclass(frozen=True)
class _LentRows:
    """A batch's region of a worker stream's shared arena: its rows, then room for the outputs."""

    arena: Arena
    offset: int
    rows_bytes: int
    shape: tuple[int, int]
    dtype: torch.dtype

    @property
    def output_offset(self) -> int:
        return self.offset + aligned(self.rows_bytes)

    def release(self) -> None:
        self.arena.release(self.offset)

    def outputs(self, result: moe_pb2.ComputeResult) -> torch.Tensor:
        if list(result.rows.shape) != list(self.shape) or result.rows.datatype != codec.datatype_name(self.dtype):
            raise InvalidInput(f"outputs {result.rows.datatype} {list(result.rows.shape)} for rows {list(self.shape)}")
        return self.arena.tensor(self.output_offset, self.dtype, self.shape)


def _lend_rows(
    arena: Arena | None, request: moe_pb2.ComputeRequest, job: DispatchJob, batch: WorkerBatch
) -> _LentRows | None:
    """Gather the batch's rows straight into the stream's arena and point the request at them (and,
    when the worker answers with rows, at room for its outputs); None: no arena, or no room in it."""
    if arena is None or not arena.usable:
        return None
    hidden = job.hidden_states
    shape = (batch.num_rows, hidden.shape[1])
    rows_bytes = shape[0] * shape[1] * hidden.element_size()
    offset = arena.allocate(aligned(rows_bytes) + (rows_bytes if job.local is not None else 0))
    if offset is None:
        return None
    lent = _LentRows(arena, offset, rows_bytes, shape, hidden.dtype)
    index = token_indices(batch.positions, job.slots_per_token)
    torch.index_select(hidden, 0, index, out=arena.tensor(offset, hidden.dtype, shape))
    request.rows.datatype = codec.datatype_name(hidden.dtype)
    request.rows.shape.extend(shape)
    request.rows_region.CopyFrom(arena.region(offset, rows_bytes))
    if job.local is not None:
        request.output_region.CopyFrom(arena.region(lent.output_offset, rows_bytes))
    return lent


def _accept_rows(
    job: DispatchJob, local: LocalDelivery, result: moe_pb2.ComputeResult, lent: _LentRows | None
) -> MoEServeError | None:
    """Hand the rows a worker answered with to the gateway in this process; the error if refused."""
    try:
        positions = codec.from_proto(result.positions, "positions")
        if result.rows_in_region:
            if lent is None:
                raise InvalidInput("the worker wrote its outputs to shared memory this batch did not lend it")
            rows = lent.outputs(result)
        else:
            rows = codec.from_proto(result.rows, "rows")
        local.deliver(job.request_id, positions, rows)  # copies them: the region is free after this
    except MoEServeError as error:  # NOT_FOUND: the gateway answered already; INVALID_ARGUMENT: bad rows
        return error
    return None


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():  # a waiter that went away cancels it
        future.set_result(None)
