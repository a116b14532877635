"""KServe v2 GRPCInferenceService: translates protobuf and calls the DataPlane, nothing more."""

from __future__ import annotations

import uuid

from grpc import aio

import moe_serve
from gateway.converters import build_infer_response, model_metadata, parse_infer_request
from gateway.dataplane import DataPlane
from moe_serve.protos import grpc_predict_v2_pb2 as kserve_pb2
from moe_serve.protos import grpc_predict_v2_pb2_grpc as kserve_grpc

SERVER_NAME = "moe-serve"


class InferenceServicer(kserve_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dataplane: DataPlane, default_timeout_s: float) -> None:
        self.dataplane, self.default_timeout_s = dataplane, default_timeout_s

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
        return kserve_pb2.ServerMetadataResponse(name=SERVER_NAME, version=moe_serve.__version__, extensions=[])

    async def ModelMetadata(
        self, request: kserve_pb2.ModelMetadataRequest, context: aio.ServicerContext
    ) -> kserve_pb2.ModelMetadataResponse:
        self.dataplane.model.check_name(request.name, request.version)
        return model_metadata(self.dataplane.model, self.dataplane.policy.describe())

    async def ModelInfer(
        self, request: kserve_pb2.ModelInferRequest, context: aio.ServicerContext
    ) -> kserve_pb2.ModelInferResponse:
        model = self.dataplane.model
        inference = parse_infer_request(request, model, request_id=uuid.uuid4().hex)
        remaining = context.time_remaining()
        timeout = self.default_timeout_s if remaining is None else min(remaining, self.default_timeout_s)
        result = await self.dataplane.infer(inference, timeout)
        return build_infer_response(request, inference, result, model)
