"""gRPC servicer of an expert worker: compute the rows it is sent, deliver them to the gateway."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NoReturn

import torch
from grpc import aio
from opentelemetry.trace import SpanKind

from expert_service.experts import ExpertStore
from expert_service.load import LoadTracker
from expert_service.metrics import WorkerMetrics
from moe_serve.cluster.placement import ExpertKey
from moe_serve.protos import moe_serve_pb2 as moe_pb2
from moe_serve.protos import moe_serve_pb2_grpc as moe_grpc
from moe_serve.runtime import codec
from moe_serve.runtime.errors import (
    ConfigurationError,
    DeadlineExceeded,
    DeliveryFailed,
    ExpertNotHere,
    InvalidInput,
    ServiceUnavailable,
    error_of,
    failure_of,
    listed,
)
from moe_serve.runtime.local_socket import SideChannelListener
from moe_serve.runtime.security import INSECURE_INTERNAL, ClusterCredentials
from moe_serve.runtime.streams import StreamClientPool, serve_stream
from moe_serve.runtime.telemetry import (
    COMPUTE_STREAM,
    DELIVERY_STREAM,
    Telemetry,
    child_span,
    client_span,
    extract_context,
    inject_context,
    record_soon,
    rpc_span,
)
from moe_serve.runtime.transports import (
    ACCEPT_KEY,
    DEFAULT_TRANSPORTS,
    RegionAccess,
    attach,
    lend_tensor,
    received_tensor,
    stream_arena,
)
from moe_serve.worker_record import WorkerRecord

logger = logging.getLogger(__name__)
# after a worker stops announcing an expert, rows routed just before routers saw it may still come
UNLOAD_SETTLE_S = 0.5
# an idle worker computes one segment of at most this many rows on its event loop (see
# _compute_segments); decode steps send a few rows per expert, prefill hundreds
INLINE_MAX_ROWS = 4
# ... and every segment of such a batch there when one small segment computes faster than this: a
# hand-off to a compute thread and back costs 0.2-0.4 ms on a busy 2-core host (thin experts, or
# few rows of small ones), while a decode step of large experts keeps them in parallel on threads
INLINE_ALL_BELOW_MS = 0.1


class ExpertWorkerServicer(moe_grpc.ExpertWorkerServicer):
    """Computes rows for the experts it announces; `announced` is what the registry publishes."""

    def __init__(
        self,
        store: ExpertStore,
        identity: WorkerRecord,
        checkpoint_dir: Path,
        compute_threads: int,
        max_message_bytes: int,
        publish: Callable[[], Awaitable[object]] | None = None,
        telemetry: Telemetry | None = None,
        credentials: ClusterCredentials = INSECURE_INTERNAL,
        transports: Sequence[str] = DEFAULT_TRANSPORTS,
        shared_memory_bytes: int = 0,
    ) -> None:
        self.store, self.identity, self.checkpoint_dir = store, identity, checkpoint_dir
        self.transports = tuple(transports)  # the ways rows may reach this worker, best first
        self.telemetry = telemetry or Telemetry("moe-serve-worker")
        self.tracer = self.telemetry.tracer
        self.announced: set[ExpertKey] = set(store.keys)
        self.load = LoadTracker()
        self.publish = publish  # re-registers the worker after its expert set changed
        # compute runs off the event loop so one matmul never stalls the other calls of this
        # worker; one thread per concurrently computed expert (torch releases the GIL)
        self._executor = ThreadPoolExecutor(max_workers=compute_threads, thread_name_prefix="expert-compute")
        # each delivery stream offers the gateway an arena for the outputs, as the router offers rows (transports.py)
        self._deliveries: StreamClientPool[moe_pb2.Delivery, moe_pb2.DeliveryAck] = StreamClientPool(
            lambda channel: moe_grpc.DeliveryServiceStub(channel).DeliveryStream,
            max_message_bytes,
            credentials,
            (lambda: stream_arena(shared_memory_bytes, self.transports)) if shared_memory_bytes > 0 else None,
        )
        self.max_message_bytes = max_message_bytes
        self._side_channels: SideChannelListener | None = None
        self._inflight_by_expert: Counter[ExpertKey] = Counter()
        self._computing = 0  # batches between arrival and computed outputs
        # moving average of one decode-sized segment's compute time (ms); inf until one was measured
        self._small_segment_ms = float("inf")
        self.abandoned_batches = 0
        # (direction, transport): rows received from the router, outputs delivered to the gateway
        self.rows_by_transport: Counter[tuple[str, str]] = Counter()
        self.metrics = WorkerMetrics(
            self.telemetry,
            checkpoint_dir.name,
            identity.worker_id,
            self._inflight_by_expert,
            lambda: self.abandoned_batches,
            self.rows_by_transport,
        )
        if store.offloading:
            self.metrics.observe_offload(store.offload_state)

    def record(self) -> WorkerRecord:
        """This worker as the registry should see it now: announced experts and live load."""
        return WorkerRecord(
            worker_id=self.identity.worker_id,
            address=self.identity.address,
            experts=tuple(sorted(self.announced)),
            node_id=self.identity.node_id,
            gpu_id=self.identity.gpu_id,
            weights_version=self.identity.weights_version,
            compute_datatype=self.identity.compute_datatype,
            load=self.load.snapshot(),
            metrics_address=self.identity.metrics_address,
            offload=self.store.offload_state(),
        )

    async def close(self) -> None:
        if self._side_channels is not None:
            await self._side_channels.close()
        await self._deliveries.close()
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.store.close()

    async def Describe(
        self, request: moe_pb2.DescribeWorkerRequest, context: aio.ServicerContext
    ) -> moe_pb2.WorkerInfo:
        return self.record().to_proto()

    async def ComputeStream(self, requests: object, context: aio.ServicerContext) -> None:
        # the sender's arena, reached by the first of this worker's transports that works (transports.py)
        arena = attach(context.invocation_metadata(), self.transports, f"worker {self.identity.worker_id}")
        try:
            # same host (the arena is mapped): the stream's messages may take a Unix socket beside it
            await serve_stream(
                context,
                lambda request: self.compute(request, arena),
                lambda _, error: moe_pb2.ComputeResult(failure=failure_of(error)),
                initial_metadata=((ACCEPT_KEY, arena.transport if arena is not None else "0"),),
                side_listener=await self._side_listener() if arena is not None and arena.same_host else None,
                decode_request=moe_pb2.ComputeRequest.FromString,
            )
        finally:
            if arena is not None:
                arena.close()

    async def _side_listener(self) -> SideChannelListener | None:
        """This worker's same-host socket (moe_serve/runtime/local_socket.py), opened at first use;
        None where none can be opened (messages then stay on the gRPC stream)."""
        if self._side_channels is None:
            listener = SideChannelListener(self.max_message_bytes)
            try:
                await listener.start()
            except OSError as error:
                logger.warning("no same-host side channel (%s): messages stay on the gRPC stream", error)
                return None
            self._side_channels = listener
        return self._side_channels

    async def compute(
        self, request: moe_pb2.ComputeRequest, arena: RegionAccess | None = None
    ) -> moe_pb2.ComputeResult:
        """Compute one batch and deliver it; the result says how many rows the gateway accepted.
        `arena`: the stream's arena (shared memory or NIXL), where the request's rows (and outputs) may be."""
        if not request.trace_context and not self.telemetry.samples_roots:
            # outside a trace, and root spans are not sampled: the span would record nothing
            return await self._compute(request, arena)
        with rpc_span(self.tracer, COMPUTE_STREAM, SpanKind.SERVER, extract_context(request.trace_context)) as span:
            if span.is_recording():
                span.set_attributes(
                    {
                        "moe_serve.worker": self.identity.worker_id,
                        "moe_serve.layer": request.layer,
                        "moe_serve.rows": request.rows.shape[0] if request.rows.shape else 0,
                    }
                )
            return await self._compute(request, arena)

    async def _compute(self, request: moe_pb2.ComputeRequest, arena: RegionAccess | None) -> moe_pb2.ComputeResult:
        deadline = time.monotonic() + request.timeout_s if request.timeout_s > 0 else None
        rows, segments = self._validate(request, await self._rows(request, arena))
        self._abandon_if_expired(request, deadline)
        self.load.received(rows.shape[0])
        for key, count in segments:
            self._inflight_by_expert[key] += count
        try:
            with self.store.batch([key for key, _ in segments]):  # offloading: missing experts start loading
                outputs = await self._compute_segments(segments, rows, deadline)
            if outputs is None:  # expired while queued behind other work: nothing was computed
                self._abandon(request)
            if request.reply_with_rows:  # the router is in the gateway's process: the rows ride the reply
                result = await self._reply_with_rows(request, outputs, arena)
            else:
                result = moe_pb2.ComputeResult(rows_delivered=await self._deliver(request, outputs, deadline))
        finally:
            self.load.finished(rows.shape[0])
            for key, count in segments:
                self._inflight_by_expert[key] -= count
        if self.store.offloading:
            result.resident_experts.extend(k.expert for k in self.store.tier.resident() if k.layer == request.layer)
        return result

    async def _rows(self, request: moe_pb2.ComputeRequest, arena: RegionAccess | None) -> torch.Tensor:
        region = request.rows_region if request.HasField("rows_region") else None
        rows = await received_tensor(request.rows, region, arena, "rows")
        transport = "bytes" if region is None or arena is None else arena.transport
        self.rows_by_transport["received", transport] += rows.shape[0] if rows.dim() else 0
        return rows

    def _validate(
        self, request: moe_pb2.ComputeRequest, rows: torch.Tensor
    ) -> tuple[torch.Tensor, list[tuple[ExpertKey, int]]]:
        if rows.dim() != 2 or rows.shape[1] != self.store.hidden_size or rows.dtype != self.store.dtype:
            raise InvalidInput(
                f"rows must be {codec.datatype_name(self.store.dtype)} [n, {self.store.hidden_size}], "
                f"got {request.rows.datatype} {list(request.rows.shape)}"
            )
        segments = [(ExpertKey(request.layer, s.expert), int(s.num_rows)) for s in request.segments]
        if not segments:
            raise InvalidInput("a compute request needs at least one expert segment")
        if sum(count for _, count in segments) != rows.shape[0] or any(count < 0 for _, count in segments):
            raise InvalidInput(f"segments cover {sum(c for _, c in segments)} rows, the request has {rows.shape[0]}")
        for key, _ in segments:
            if not self.store.owns(key):
                raise ExpertNotHere(
                    f"worker {self.identity.worker_id} does not hold expert {key.expert} of layer {key.layer}"
                )
        return rows, segments

    async def _compute_segments(
        self, segments: list[tuple[ExpertKey, int]], rows: torch.Tensor, deadline: float | None
    ) -> torch.Tensor | None:
        """Outputs of every segment, in order; None when the deadline passed before one was computed.

        Segments are computed in parallel on the compute threads. When this worker is otherwise idle
        and the batch is decode-sized, the last segment is computed on the event loop instead: the
        hand-off to a thread and back costs two thread wake-ups (0.2-0.4 ms on a busy 2-core host),
        which is most of what a single token's expert costs beside its matmul. When such segments
        compute in well under that (INLINE_ALL_BELOW_MS), all of them are computed there, one after
        the other. A busy worker never does this, so its loop keeps accepting and dispatching work;
        offloading workers neither, as a segment may wait for its expert to load.
        """
        loop = asyncio.get_running_loop()
        inline = self._computing == 0 and rows.shape[0] <= INLINE_MAX_ROWS and not self.store.offloading
        inline_from = len(segments) - 1 if self._small_segment_ms >= INLINE_ALL_BELOW_MS else 0
        self._computing += 1
        try:
            # the segments before `inline_from` go to the threads, the rest (if inline) to the loop
            threaded: list[asyncio.Future[torch.Tensor | None]] = []
            on_loop: list[tuple[ExpertKey, torch.Tensor]] = []
            start = 0
            for index, (key, count) in enumerate(segments):
                piece = rows[start : start + count]
                start += count
                if inline and index >= inline_from:
                    on_loop.append((key, piece))
                    continue
                # the compute thread continues this request's trace (executors do not copy the context)
                task = functools.partial(contextvars.copy_context().run, self._timed_compute, key, piece, deadline)
                threaded.append(loop.run_in_executor(self._executor, task))
            # the loop's share runs now, beside the threads' (no task of its own: one loop turn fewer)
            computed = [self._timed_compute(key, piece, deadline) for key, piece in on_loop]
            results = [*await asyncio.gather(*threaded), *computed]  # in segment order: threads' come first
        finally:
            self._computing -= 1
        if any(result is None for result in results):
            return None
        return results[0] if len(results) == 1 else torch.cat(results, dim=0)

    def _timed_compute(self, key: ExpertKey, rows: torch.Tensor, deadline: float | None) -> torch.Tensor | None:
        self.load.started(rows.shape[0])
        if deadline is not None and time.monotonic() >= deadline:
            return None  # a queue of expired work is skipped, not computed: the gateway has answered
        with child_span(self.tracer, "worker.expert", **{"moe_serve.expert": key.expert}):
            started = time.perf_counter()
            output = self.store.compute(key, rows)
            seconds = time.perf_counter() - started
        if rows.shape[0] <= INLINE_MAX_ROWS:
            previous = self._small_segment_ms
            self._small_segment_ms = seconds * 1000 if previous == float("inf") else 0.8 * previous + 200 * seconds
        self.load.computed(rows.shape[0], seconds * 1000)
        record_soon(self.metrics.computed, key, seconds)
        return output

    def _abandon_if_expired(self, request: moe_pb2.ComputeRequest, deadline: float | None) -> None:
        """Work for a request whose client deadline passed is dropped here, not computed or delivered."""
        if deadline is not None and time.monotonic() >= deadline:
            self._abandon(request)

    def _abandon(self, request: moe_pb2.ComputeRequest) -> NoReturn:
        self.abandoned_batches += 1
        raise DeadlineExceeded(
            f"request {request.request_id} expired before worker {self.identity.worker_id} "
            "got to it; its rows were abandoned"
        )

    async def _reply_with_rows(
        self, request: moe_pb2.ComputeRequest, outputs: torch.Tensor, arena: RegionAccess | None
    ) -> moe_pb2.ComputeResult:
        result = moe_pb2.ComputeResult(rows_delivered=outputs.shape[0], positions=request.positions)
        if request.HasField("output_region") and arena is not None:  # into the sender's memory, mapped or not
            datatype = codec.datatype_name(outputs.dtype)
            await arena.write(request.output_region, outputs, "outputs")
            result.rows.datatype, result.rows_in_region = datatype, True
            result.rows.shape.extend(outputs.shape)
            payload = codec.payload_bytes(request.positions)
        else:
            payload = codec.fill_proto(result.rows, outputs) + codec.payload_bytes(request.positions)
        record_soon(self.metrics.wire, "worker_to_gateway", "sent", payload)
        return result

    async def _deliver(self, request: moe_pb2.ComputeRequest, outputs: torch.Tensor, deadline: float | None) -> int:
        self._abandon_if_expired(request, deadline)
        remaining = None if deadline is None else deadline - time.monotonic()
        delivery = moe_pb2.Delivery(
            request_id=request.request_id,
            positions=request.positions,  # echoed as received: the gateway places rows by them
            worker_id=self.identity.worker_id,
            timeout_s=remaining or 0.0,
        )
        gateway = self._deliveries.get(request.delivery_address)
        lent = lend_tensor(gateway.session, outputs)  # the gateway maps or transfers it: no bytes
        if lent is None:
            payload = codec.fill_proto(delivery.rows, outputs)
            self.rows_by_transport["delivered", "bytes"] += outputs.shape[0]
        else:
            delivery.rows.datatype, payload = codec.datatype_name(outputs.dtype), 0
            delivery.rows.shape.extend(outputs.shape)
            delivery.rows_region.CopyFrom(lent.region)
            self.rows_by_transport["delivered", lent.arena.transport] += outputs.shape[0]
        self.metrics.wire("worker_to_gateway", "sent", payload + codec.payload_bytes(request.positions))
        with client_span(self.tracer, DELIVERY_STREAM):
            inject_context(delivery.trace_context)  # the gateway's span continues this one
            try:
                ack = await gateway.call(delivery, remaining, release=lent.release if lent is not None else None)
            except ServiceUnavailable as error:
                message = f"could not deliver to gateway {request.delivery_address}: {error.message}"
                raise DeliveryFailed(message) from None
            if lent is not None:  # answered: the gateway has copied the outputs out of the region
                lent.release()
            if ack.HasField("failure"):
                raise error_of(ack.failure)  # NOT_FOUND: the gateway has dropped the request
            return ack.rows_accepted

    # ------------------------------------------------------------------ replicas moved while serving

    async def LoadExperts(self, request: moe_pb2.ExpertSet, context: aio.ServicerContext) -> moe_pb2.WorkerInfo:
        keys = [
            ExpertKey(k.layer, k.expert) for k in request.experts if not self.store.owns(ExpertKey(k.layer, k.expert))
        ]
        if keys:
            # reading weights is blocking I/O: keep it off the event loop
            try:
                await asyncio.get_running_loop().run_in_executor(None, self.store.load, keys)
            except ConfigurationError as error:
                raise InvalidInput(f"cannot load {listed(tuple(k) for k in keys)}: {error}") from None
        self.announced.update(ExpertKey(k.layer, k.expert) for k in request.experts)
        await self._announce()
        logger.info("worker %s now serves %d expert(s) (+%d)", self.identity.worker_id, len(self.announced), len(keys))
        return self.record().to_proto()

    async def UnloadExperts(self, request: moe_pb2.ExpertSet, context: aio.ServicerContext) -> moe_pb2.WorkerInfo:
        keys = [ExpertKey(k.layer, k.expert) for k in request.experts]
        self.announced.difference_update(keys)
        await self._announce()  # routers stop choosing this replica for these experts
        await asyncio.sleep(UNLOAD_SETTLE_S)
        while any(self._inflight_by_expert[key] for key in keys):
            await asyncio.sleep(0.02)
        self.store.remove([key for key in keys if key not in self.announced])
        logger.info("worker %s now serves %d expert(s) (-%d)", self.identity.worker_id, len(self.announced), len(keys))
        return self.record().to_proto()

    async def Prefetch(self, request: moe_pb2.ExpertSet, context: aio.ServicerContext) -> moe_pb2.PrefetchReply:
        """The router's hint: load these experts now if there is room (never blocks, never evicts work)."""
        keys = [ExpertKey(k.layer, k.expert) for k in request.experts]
        return moe_pb2.PrefetchReply(loads_started=self.store.prefetch(keys))

    async def _announce(self) -> None:
        if self.publish is not None:
            await self.publish()
