"""The cluster secret on internal hops, in one process: real aio servers on loopback, no stack."""

from __future__ import annotations

import asyncio
import logging
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import SecretStr

from moe_serve.config import CommonSettings
from moe_serve.protos.moe_serve_pb2 import DeliveryAck as Ack
from moe_serve.runtime.errors import ServiceUnavailable
from moe_serve.runtime.grpc_utils import add_health_and_reflection, create_server
from moe_serve.runtime.security import (
    CLUSTER_TOKEN_METADATA,
    INSECURE_INTERNAL,
    ClusterCredentials,
    open_aio_channel,
    open_channel,
    read_secret_file,
    write_secret_file,
)
from moe_serve.runtime.streams import StreamClient

SECRET = "a-cluster-secret-of-this-test-0123456789"
OTHER = "the-secret-of-another-cluster-9876543210"
UNARY = "/test.Echo/Say"
STREAM = "/test.Echo/Chat"


def credentials(secret: str | None) -> ClusterCredentials:
    return INSECURE_INTERNAL if secret is None else ClusterCredentials(secret.encode())


async def echo_server(server_credentials: ClusterCredentials) -> tuple[aio.Server, str]:
    """An aio server with a unary and a stream echo, health, and the cluster check `server_credentials` asks for."""

    async def say(request: bytes, context: aio.ServicerContext) -> bytes:
        return request

    async def chat(requests: AsyncIterator[bytes], context: aio.ServicerContext) -> None:
        async for request in requests:
            await context.write(request)

    server, port = create_server("127.0.0.1", 0, 1 << 20, None, server_credentials.server_interceptors())
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "test.Echo",
                {"Say": grpc.unary_unary_rpc_method_handler(say), "Chat": grpc.stream_stream_rpc_method_handler(chat)},
            )
        ]
    )
    health = add_health_and_reflection(server, ["test.Echo"])
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, f"127.0.0.1:{port}"


async def unary_status(address: str, caller: ClusterCredentials, metadata: tuple = ()) -> grpc.StatusCode:
    async with open_aio_channel(address, [], caller) as channel:
        try:
            assert await channel.unary_unary(UNARY)(b"ping", metadata=metadata or None, timeout=5) == b"ping"
        except aio.AioRpcError as error:
            return error.code()
    return grpc.StatusCode.OK


def test_internal_calls_need_the_cluster_token() -> None:
    async def scenario() -> None:
        server, address = await echo_server(credentials(SECRET))
        try:
            assert await unary_status(address, credentials(SECRET)) == grpc.StatusCode.OK
            assert await unary_status(address, credentials(None)) == grpc.StatusCode.UNAUTHENTICATED
            assert await unary_status(address, credentials(OTHER)) == grpc.StatusCode.UNAUTHENTICATED
            # the token of another cluster, or a guess, given by hand: refused all the same
            forged = ((CLUSTER_TOKEN_METADATA, "0" * 64),)
            assert await unary_status(address, credentials(None), forged) == grpc.StatusCode.UNAUTHENTICATED
            # health stays open for orchestrators' probes, which carry no credentials
            async with open_aio_channel(address, [], INSECURE_INTERNAL) as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            await server.stop(0)

    asyncio.run(scenario())


def test_stream_clients_carry_the_token_once_per_stream() -> None:
    async def scenario() -> None:
        server, address = await echo_server(credentials(SECRET))

        def open_chat(channel: aio.Channel) -> object:
            return channel.stream_stream(
                STREAM, request_serializer=Ack.SerializeToString, response_deserializer=Ack.FromString
            )

        try:
            client = StreamClient(address, open_chat, 1 << 20, credentials(SECRET))
            replies = [await client.call(Ack(rows_accepted=rows), timeout=5) for rows in (1, 2, 3)]
            assert [reply.rows_accepted for reply in replies] == [1, 2, 3]
            await client.close()
            stranger = StreamClient(address, open_chat, 1 << 20, credentials(None))
            with pytest.raises(ServiceUnavailable, match="UNAUTHENTICATED"):
                await stranger.call(Ack(rows_accepted=1), timeout=5)
            await stranger.close()
        finally:
            await server.stop(0)

    asyncio.run(scenario())


def test_blocking_channels_carry_the_token() -> None:
    async def scenario() -> None:
        server, address = await echo_server(credentials(SECRET))
        try:

            def call(caller: ClusterCredentials) -> grpc.StatusCode:
                with open_channel(address, [], caller) as channel:
                    try:
                        channel.unary_unary(UNARY)(b"ping", timeout=5)
                    except grpc.RpcError as error:
                        return error.code()
                return grpc.StatusCode.OK

            codes = await asyncio.to_thread(lambda: [call(credentials(SECRET)), call(credentials(None))])
            assert codes == [grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED]
        finally:
            await server.stop(0)

    asyncio.run(scenario())


def test_a_refused_call_is_answered_before_its_body_is_read() -> None:
    """A stranger's 256 MiB request to an internal unary method: refused without the server buffering it."""

    async def scenario() -> float:
        server, address = await echo_server(credentials(SECRET))
        options = [("grpc.max_send_message_length", 512 << 20)]
        try:
            async with aio.insecure_channel(address, options=options) as channel:
                loop = asyncio.get_running_loop()
                started = loop.time()
                with pytest.raises(aio.AioRpcError) as raised:
                    await channel.unary_unary(UNARY)(bytes(256 << 20), timeout=30)
                assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
                return loop.time() - started
        finally:
            await server.stop(0)

    # a server that read the body first would answer RESOURCE_EXHAUSTED (over its 1 MiB limit), not UNAUTHENTICATED
    assert asyncio.run(scenario()) < 5.0


def settings(**values: object) -> CommonSettings:
    return CommonSettings(**{"cluster_secret": None, **values})


def test_credentials_from_settings(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ValueError, match="MOE_SERVE_CLUSTER_SECRET") as missing:
        ClusterCredentials.from_settings(settings())
    assert "--insecure-internal" in str(missing.value)
    with pytest.raises(ValueError, match="at least 16 characters"):
        ClusterCredentials.from_settings(settings(cluster_secret=SecretStr("short")))
    assert ClusterCredentials.from_settings(settings(cluster_secret=SecretStr(SECRET))).secret == SECRET.encode()
    path = write_secret_file(tmp_path / "cluster.secret", SECRET)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    from_file = ClusterCredentials.from_settings(settings(cluster_secret_file=path))
    assert from_file.call_token == credentials(SECRET).call_token
    assert from_file.call_token != credentials(OTHER).call_token and SECRET not in from_file.call_token
    assert from_file.record_key != bytes.fromhex(from_file.call_token)  # a token seen on the wire signs nothing
    with caplog.at_level(logging.WARNING):
        insecure = ClusterCredentials.from_settings(settings(insecure_internal=True))
    assert insecure.insecure and insecure.call_metadata() is None and not insecure.server_interceptors()
    assert "INSECURE" in caplog.text
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        assert read_secret_file(path) == SECRET
    assert "readable by other users" in caplog.text
    assert SECRET not in repr(from_file)
