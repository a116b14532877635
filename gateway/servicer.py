"""KServe v2 GRPCInferenceService (with Triton's stream, config, statistics, index and system
shared-memory extensions):
answers the metadata calls from the DataPlane and hands inferences to the InferenceHandler (shared with
the REST transport), which records each request's outcome and opens its trace."""

from __future__ import annotations

from collections.abc import AsyncIterator

from grpc import aio

import moe_serve
from gateway.converters import model_metadata
from gateway.inference import InferenceHandler
from gateway.stream_infer import UnwrittenAnswers, answer_stream
from gateway.triton_extensions import model_config, repository_index, shared_memory_status
from moe_serve.runtime.errors import Unimplemented
from moe_serve_client.protos import grpc_predict_v2_pb2 as kserve_pb2
from moe_serve_client.protos import grpc_predict_v2_pb2_grpc as kserve_grpc

SERVER_NAME = "moe-serve"
# the protocol extensions offered, by the names Triton reports in ServerMetadata
EXTENSIONS = ["parameters", "model_configuration", "statistics"]
SHARED_MEMORY_EXTENSION = "system_shared_memory"
NO_CUDA_SHARED_MEMORY = (
    "CUDA shared memory is not offered: the gateway has no GPU and keeps tensors in host memory; "
    "use system shared memory (SystemSharedMemoryRegister) or send tensors in the message"
)


class InferenceServicer(kserve_grpc.GRPCInferenceServiceServicer):
    def __init__(self, handler: InferenceHandler) -> None:
        self.handler = handler
        self.dataplane, self.shared_memory = handler.dataplane, handler.shared_memory
        self.statistics = handler.statistics
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
        return await self.handler.infer(
            request,
            f"inference.GRPCInferenceService/{method}",
            context.invocation_metadata(),
            context.time_remaining(),
        )
