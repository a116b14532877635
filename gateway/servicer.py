"""KServe v2 GRPCInferenceService (with Triton's stream, config, statistics, index and system
shared-memory extensions):
translates protobuf and calls the DataPlane; records each request's outcome (metrics, statistics)
and opens its trace (continuing the client's W3C trace context, if it sent one)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import grpc
from grpc import aio
from opentelemetry.trace import SpanKind, Tracer

import moe_serve
from gateway.converters import build_infer_response, model_metadata, parse_infer_request
from gateway.dataplane import DataPlane
from gateway.metrics import GatewayMetrics
from gateway.shared_memory import SharedMemoryRegistry
from gateway.stream_infer import UnwrittenAnswers, answer_stream
from gateway.triton_extensions import InferenceStatistics, model_config, repository_index, shared_memory_status
from moe_serve.errors import MoEServeError, Unimplemented
from moe_serve.protos import grpc_predict_v2_pb2 as kserve_pb2
from moe_serve.protos import grpc_predict_v2_pb2_grpc as kserve_grpc
from moe_serve.telemetry import attach, detach, metadata_context, rpc_span

SERVER_NAME = "moe-serve"
# the protocol extensions offered, by the names Triton reports in ServerMetadata
EXTENSIONS = ["parameters", "model_configuration", "statistics"]
SHARED_MEMORY_EXTENSION = "system_shared_memory"
NO_CUDA_SHARED_MEMORY = (
    "CUDA shared memory is not offered: the gateway has no GPU and keeps tensors in host memory; "
    "use system shared memory (SystemSharedMemoryRegister) or send tensors in the message"
)


class InferenceServicer(kserve_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        dataplane: DataPlane,
        default_timeout_s: float,
        metrics: GatewayMetrics,
        tracer: Tracer,
        shared_memory: SharedMemoryRegistry,
    ) -> None:
        self.dataplane, self.default_timeout_s, self.metrics, self.tracer = (
            dataplane,
            default_timeout_s,
            metrics,
            tracer,
        )
        self.shared_memory = shared_memory
        self.statistics = InferenceStatistics()
        dataplane.record_stages = self._record_dispatch_stages
        self.unwritten_stream_answers = UnwrittenAnswers()

    async def ServerLive(
        self, request: kserve_pb2.ServerLiveRequest, context: aio.ServicerContext
    ) -> kserve_pb2.ServerLiveResponse:
        return kserve_pb2.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: kserve_pb2.ServerReadyRequest, context: aio.ServicerContext
    ) -> kserve_pb2.ServerReadyResponse:
        return kserve_pb2.ServerReadyResponse(ready=await self.dataplane.ready())

    async def ModelReady(
        self, request: kserve_pb2.ModelReadyRequest, context: aio.ServicerContext
    ) -> kserve_pb2.ModelReadyResponse:
        self.dataplane.model.check_name(request.name, request.version)
        return kserve_pb2.ModelReadyResponse(ready=await self.dataplane.ready())

    async def ServerMetadata(
        self, request: kserve_pb2.ServerMetadataRequest, context: aio.ServicerContext
    ) -> kserve_pb2.ServerMetadataResponse:
        # shared memory is listed only where a client can register a region (--allow-client-shm)
        extensions = [*EXTENSIONS, SHARED_MEMORY_EXTENSION] if self.shared_memory.enabled else EXTENSIONS
        return kserve_pb2.ServerMetadataResponse(name=SERVER_NAME, version=moe_serve.__version__, extensions=extensions)

    async def ModelMetadata(
        self, request: kserve_pb2.ModelMetadataRequest, context: aio.ServicerContext
    ) -> kserve_pb2.ModelMetadataResponse:
        self.dataplane.model.check_name(request.name, request.version)
        return model_metadata(self.dataplane.model, self.dataplane.policy.describe())

    async def ModelInfer(
        self, request: kserve_pb2.ModelInferRequest, context: aio.ServicerContext
    ) -> kserve_pb2.ModelInferResponse:
        return await self._infer(request, context, "ModelInfer")

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[kserve_pb2.ModelInferRequest], context: aio.ServicerContext
    ) -> None:
        await answer_stream(
            request_iterator,
            context,
            lambda request: self._infer(request, context, "ModelStreamInfer"),
            self.unwritten_stream_answers,
        )

    async def ModelConfig(
        self, request: kserve_pb2.ModelConfigRequest, context: aio.ServicerContext
    ) -> kserve_pb2.ModelConfigResponse:
        self.dataplane.model.check_name(request.name, request.version)
        return model_config(self.dataplane.model, self.dataplane.policy.describe())

    async def ModelStatistics(
        self, request: kserve_pb2.ModelStatisticsRequest, context: aio.ServicerContext
    ) -> kserve_pb2.ModelStatisticsResponse:
        # an empty name asks for every model: this one
        if request.name or request.version:
            self.dataplane.model.check_name(request.name, request.version)
        stats = self.statistics.to_proto(self.dataplane.model, self.dataplane.counters.dispatches)
        return kserve_pb2.ModelStatisticsResponse(model_stats=[stats])

    async def RepositoryIndex(
        self, request: kserve_pb2.RepositoryIndexRequest, context: aio.ServicerContext
    ) -> kserve_pb2.RepositoryIndexResponse:
        return repository_index(self.dataplane.model, await self.dataplane.ready(), request.ready)

    def _record_dispatch_stages(self, route_s: float, collect_s: float, combine_s: float) -> None:
        for stage, seconds in (("route", route_s), ("collect", collect_s), ("combine", combine_s)):
            self.metrics.stage(stage, seconds)

    def _record_request_stages(self, arrived: float, decoded: float, inferred: float, encoded: float) -> None:
        """decode: protobuf to tensors; encode: tensors to protobuf; total: the whole request here."""
        self.metrics.stage("decode", decoded - arrived)
        self.metrics.stage("encode", encoded - inferred)
        self.metrics.stage("total", encoded - arrived)

    async def SystemSharedMemoryStatus(
        self, request: kserve_pb2.SystemSharedMemoryStatusRequest, context: aio.ServicerContext
    ) -> kserve_pb2.SystemSharedMemoryStatusResponse:
        return shared_memory_status(self.shared_memory.status(request.name))

    async def SystemSharedMemoryRegister(
        self, request: kserve_pb2.SystemSharedMemoryRegisterRequest, context: aio.ServicerContext
    ) -> kserve_pb2.SystemSharedMemoryRegisterResponse:
        self.shared_memory.register(request.name, request.key, request.offset, request.byte_size)
        return kserve_pb2.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(
        self, request: kserve_pb2.SystemSharedMemoryUnregisterRequest, context: aio.ServicerContext
    ) -> kserve_pb2.SystemSharedMemoryUnregisterResponse:
        self.shared_memory.unregister(request.name)
        return kserve_pb2.SystemSharedMemoryUnregisterResponse()

    async def CudaSharedMemoryStatus(
        self, request: kserve_pb2.CudaSharedMemoryStatusRequest, context: aio.ServicerContext
    ) -> kserve_pb2.CudaSharedMemoryStatusResponse:
        raise Unimplemented(NO_CUDA_SHARED_MEMORY)

    async def CudaSharedMemoryRegister(
        self, request: kserve_pb2.CudaSharedMemoryRegisterRequest, context: aio.ServicerContext
    ) -> kserve_pb2.CudaSharedMemoryRegisterResponse:
        raise Unimplemented(NO_CUDA_SHARED_MEMORY)

    async def CudaSharedMemoryUnregister(
        self, request: kserve_pb2.CudaSharedMemoryUnregisterRequest, context: aio.ServicerContext
    ) -> kserve_pb2.CudaSharedMemoryUnregisterResponse:
        raise Unimplemented(NO_CUDA_SHARED_MEMORY)

    async def _infer(
        self, request: kserve_pb2.ModelInferRequest, context: aio.ServicerContext, method: str
    ) -> kserve_pb2.ModelInferResponse:
        arrived, status, tokens = time.monotonic(), grpc.StatusCode.OK, 0
        token = attach(metadata_context(context.invocation_metadata()))
        # the regions the request reads and writes stay open until it is answered, even if unregistered
        shared_memory = self.shared_memory.lease()
        try:
            with rpc_span(self.tracer, f"inference.GRPCInferenceService/{method}", SpanKind.SERVER) as span:
                model = self.dataplane.model
                inference = parse_infer_request(request, model, uuid.uuid4().hex, shared_memory)
                decoded = time.monotonic()
                # tensor bytes on the wire: what came through shared memory did not
                received = inference.hidden_states.nbytes - shared_memory.bytes_read
                self.metrics.wire("client_to_gateway", "received", received)
                tokens = inference.num_tokens
                span.set_attributes(
                    {"moe_serve.model": model.name, "moe_serve.layer": inference.layer, "moe_serve.tokens": tokens}
                )
                remaining = context.time_remaining()
                timeout = self.default_timeout_s if remaining is None else min(remaining, self.default_timeout_s)
                result = await self.dataplane.infer(inference, timeout)
                inferred = time.monotonic()
                response = build_infer_response(request, inference, result, model, shared_memory)
                self._record_request_stages(arrived, decoded, inferred, time.monotonic())
                sent = sum(t.nbytes for t in result.tensors.values()) - shared_memory.bytes_written
                self.metrics.wire("gateway_to_client", "sent", sent)
                self.statistics.record_success(arrived, decoded, result.dispatched_at, inferred, time.monotonic())
                return response
        except MoEServeError as error:
            status = error.status_code
            if status == grpc.StatusCode.RESOURCE_EXHAUSTED:
                self.metrics.rejected(error.reason or "unspecified")
            raise
        except asyncio.CancelledError:
            status = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            status = grpc.StatusCode.INTERNAL
            raise
        finally:
            shared_memory.release()
            detach(token)
            seconds = time.monotonic() - arrived
            succeeded = status == grpc.StatusCode.OK
            self.metrics.request_done(status.name, seconds, tokens, tokens if succeeded else 0)
            if succeeded:
                self.dataplane.window.record_request(seconds, tokens)
            else:
                self.statistics.record_failure(seconds)
