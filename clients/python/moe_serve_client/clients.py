"""Clients of the gateway's KServe v2 gRPC API: `MoEClient` (blocking) and `AsyncMoEClient` (asyncio).

Each client owns one channel for its lifetime (gRPC multiplexes concurrent calls over it), so a
request costs no connection set-up. Failed calls raise `GatewayError` with the gRPC status code
and the gateway's message.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Self

import grpc
from grpc import aio

from moe_serve_client import codec
from moe_serve_client.channel import DEFAULT_MAX_MESSAGE_BYTES, ClientCredentials, channel_options
from moe_serve_client.codec import Array
from moe_serve_client.protocol import (
    GatewayError,
    ServedModelMetadata,
    build_infer_request,
    decode_infer_response,
    metadata_request,
    requested_outputs,
)
from moe_serve_client.protos import grpc_predict_v2_pb2 as kserve_pb2
from moe_serve_client.protos import grpc_predict_v2_pb2_grpc as kserve_grpc

DEFAULT_OUTPUTS = ("output",)


class MoEClient:
    """Blocking client; thread-safe (calls from several threads share the channel).

    Args:
        address: the gateway's "host:port".
        max_message_bytes: largest message sent or received; must cover T * d * itemsize of a request.
        token: bearer token, for a gateway started with --auth-tokens-file.
        tls: connect with TLS (implied by root_certificates or certificate_chain); root_certificates:
            PEM of the CA that signed the gateway's certificate (default: the system's roots);
            certificate_chain / private_key: a client certificate, for a gateway with --tls-client-ca.
    """

    def __init__(
        self,
        address: str,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        *,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
    ) -> None:
        self.address = address
        credentials = ClientCredentials(tls, root_certificates, certificate_chain, private_key, token)
        self._metadata = credentials.metadata()
        self._channel = credentials.channel(address, channel_options(max_message_bytes))
        self._stub = kserve_grpc.GRPCInferenceServiceStub(self._channel)

    def server_ready(self, timeout: float | None = None) -> bool:
        """Whether the gateway reports ready (router reachable, every expert placed)."""
        try:
            return self._stub.ServerReady(
                kserve_pb2.ServerReadyRequest(), timeout=timeout, metadata=self._metadata
            ).ready
        except grpc.RpcError as error:
            raise GatewayError.from_rpc_error(error, "ServerReady") from None

    def model_metadata(self, model: str, timeout: float | None = None) -> ServedModelMetadata:
        """ModelMetadata of `model` (NOT_FOUND when the gateway serves another name; its message names it)."""
        try:
            response = self._stub.ModelMetadata(metadata_request(model), timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise GatewayError.from_rpc_error(error, "ModelMetadata") from None
        return ServedModelMetadata.from_response(response)

    def infer(
        self,
        model: str,
        hidden_states: Array,
        layer: int = 0,
        outputs: Sequence[str] | str = DEFAULT_OUTPUTS,
        timeout: float | None = None,
    ) -> dict[str, Array]:
        """Run MoE layer `layer` of `model` on hidden_states [T, d] or [B, S, d]: a torch tensor (FP32, FP16
        or BF16) or a numpy array (float32 or float16).

        Returns the requested outputs by name, torch tensors on the CPU for a torch input and numpy
        arrays for a numpy input, as read-only views of the response bytes:
        `output` (hidden_states' shape and dtype), `router_logits` float32 [T, E], `expert_ids` int32
        [T, k], `expert_weights` float32 [T, k], `dropped_mask` bool [T, k], with T = all tokens.
        `timeout` is the call's deadline in seconds (None: the gateway's default).
        """
        outputs = requested_outputs(outputs)
        request = build_infer_request(model, hidden_states, layer, outputs)
        try:
            response = self._stub.ModelInfer(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise GatewayError.from_rpc_error(error, "ModelInfer") from None
        return decode_infer_response(response, outputs, codec.is_torch_tensor(hidden_states))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MoEClient({self.address!r})"


class AsyncMoEClient:
    """asyncio client, the same calls as MoEClient as coroutines; concurrent calls share one channel.

    The channel is opened on the first call, inside the event loop that makes it (a grpc.aio channel
    belongs to one loop), and stays open until `close()`; use one client per event loop.
    """

    def __init__(
        self,
        address: str,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        *,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
    ) -> None:
        self.address = address
        self._credentials = ClientCredentials(tls, root_certificates, certificate_chain, private_key, token)
        self._metadata = self._credentials.metadata()
        self._options = channel_options(max_message_bytes)
        self._channel: aio.Channel | None = None
        self._stub: kserve_grpc.GRPCInferenceServiceStub | None = None

    def _connected_stub(self) -> kserve_grpc.GRPCInferenceServiceStub:
        if self._stub is None:
            self._channel = self._credentials.aio_channel(self.address, self._options)
            self._stub = kserve_grpc.GRPCInferenceServiceStub(self._channel)
        return self._stub

    async def server_ready(self, timeout: float | None = None) -> bool:
        """Whether the gateway reports ready (router reachable, every expert placed)."""
        try:
            response = await self._connected_stub().ServerReady(
                kserve_pb2.ServerReadyRequest(), timeout=timeout, metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise GatewayError.from_rpc_error(error, "ServerReady") from None
        return response.ready

    async def model_metadata(self, model: str, timeout: float | None = None) -> ServedModelMetadata:
        """ModelMetadata of `model`; see MoEClient.model_metadata."""
        try:
            response = await self._connected_stub().ModelMetadata(
                metadata_request(model), timeout=timeout, metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise GatewayError.from_rpc_error(error, "ModelMetadata") from None
        return ServedModelMetadata.from_response(response)

    async def infer(
        self,
        model: str,
        hidden_states: Array,
        layer: int = 0,
        outputs: Sequence[str] | str = DEFAULT_OUTPUTS,
        timeout: float | None = None,
    ) -> dict[str, Array]:
        """Run MoE layer `layer` of `model`; arguments and results as MoEClient.infer."""
        outputs = requested_outputs(outputs)
        request = build_infer_request(model, hidden_states, layer, outputs)
        try:
            response = await self._connected_stub().ModelInfer(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise GatewayError.from_rpc_error(error, "ModelInfer") from None
        return decode_infer_response(response, outputs, codec.is_torch_tensor(hidden_states))

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        self._channel = self._stub = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncMoEClient({self.address!r})"
