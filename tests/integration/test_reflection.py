"""Server reflection through the error-mapping interceptor, and error mapping of streamed responses.

grpc-reflection's servicer is an async generator; the interceptor must keep that shape (a wrapper
that awaits it fails every reflection call with INTERNAL). Driven with a plain reflection client.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc import aio
from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from gateway.server import PUBLIC_SERVICE
from moe_serve.runtime.errors import InvalidInput
from moe_serve.runtime.grpc_utils import add_health_and_reflection, create_server

MAX_MESSAGE_BYTES = 4 << 20


def reflect(address: str) -> tuple[set[str], str]:
    """The services `address` lists through reflection, and ModelInfer's input type resolved through it."""
    with grpc.insecure_channel(address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        pool = descriptor_pool.DescriptorPool(database)
        # FindMethodByName does not consult the pool's database; FindServiceByName does
        model_infer = pool.FindServiceByName(PUBLIC_SERVICE).methods_by_name["ModelInfer"]
        return services, model_infer.input_type.full_name


def test_reflection_lists_services_and_resolves_a_method_in_process() -> None:
    async def scenario() -> tuple[set[str], str]:
        server, port = create_server("127.0.0.1", 0, MAX_MESSAGE_BYTES)
        add_health_and_reflection(server, [PUBLIC_SERVICE])
        await server.start()
        try:
            # the reflection client is synchronous: off the loop that serves it
            return await asyncio.to_thread(reflect, f"127.0.0.1:{port}")
        finally:
            await server.stop(0)

    services, input_type = asyncio.run(scenario())
    assert services == {PUBLIC_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME}
    assert input_type == "inference.ModelInferRequest"


async def yield_then_fail(request: bytes | AsyncIterator[bytes], context: aio.ServicerContext) -> AsyncIterator[bytes]:
    yield b"first"
    raise InvalidInput("second response refused")


async def write_then_fail(request: bytes | AsyncIterator[bytes], context: aio.ServicerContext) -> None:
    await context.write(b"first")
    raise InvalidInput("second response refused")


@pytest.mark.parametrize("behavior", [yield_then_fail, write_then_fail], ids=["async-generator", "writer"])
@pytest.mark.parametrize("shape", ["unary_stream", "stream_stream"])
def test_streamed_responses_keep_their_shape_and_error_mapping(behavior, shape: str) -> None:
    make_handler = getattr(grpc, f"{shape}_rpc_method_handler")
    service = grpc.method_handlers_generic_handler("test.Streams", {"Call": make_handler(behavior)})

    async def scenario() -> tuple[list[bytes], grpc.StatusCode, str]:
        server, port = create_server("127.0.0.1", 0, MAX_MESSAGE_BYTES)
        server.add_generic_rpc_handlers([service])
        await server.start()
        received: list[bytes] = []
        try:
            async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                if shape == "unary_stream":
                    call = channel.unary_stream("/test.Streams/Call")(b"request", timeout=10)
                else:
                    call = channel.stream_stream("/test.Streams/Call")(iter([b"request"]), timeout=10)
                with pytest.raises(aio.AioRpcError) as failure:
                    async for response in call:
                        received.append(response)
                return received, failure.value.code(), failure.value.details()
        finally:
            await server.stop(0)

    received, code, details = asyncio.run(scenario())
    assert received == [b"first"]
    assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, "second response refused")


def test_gateway_public_port_answers_reflection(fp32_stack) -> None:
    services, input_type = reflect(fp32_stack.address)
    assert PUBLIC_SERVICE in services and reflection.SERVICE_NAME in services
    assert input_type == "inference.ModelInferRequest"
