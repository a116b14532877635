"""The shared internal streams (moe_serve/runtime/streams.py) survive callers that go away mid-write.

Every concurrent call to one address rides one bidirectional stream, and grpc.aio cancels the
whole stream when a write is interrupted. A gateway request whose client cancels (or whose
deadline passes) while its message is being written must therefore not take the stream, and
every other request on it, down: found by the soak (UNAVAILABLE "stream ... was closed").
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from grpc import aio

from moe_serve.runtime.errors import MoEServeError
from moe_serve.runtime.streams import StreamClient, serve_stream
from tests.helpers import loopback_stream_server

METHOD = "/moe_serve.test.Echo/Stream"
PAYLOAD_BYTES = 1 << 20  # large enough that a write waits on flow control, so cancels land mid-write
CALLS = 120


@dataclass
class Message:
    call_id: int
    payload: bytes


def serialize(message: Message) -> bytes:
    return struct.pack("<Q", message.call_id) + message.payload


def deserialize(data: bytes) -> Message:
    return Message(struct.unpack("<Q", data[:8])[0], data[8:])


async def echo(message: Message) -> Message:
    await asyncio.sleep(0.001)
    return Message(0, message.payload[:16])


def error_reply(message: Message, error: MoEServeError) -> Message:
    return Message(0, b"error")


@contextlib.asynccontextmanager
async def echo_server() -> AsyncIterator[str]:
    """An aio server answering every message of its stream with `serve_stream` (as the services do)."""

    async def stream(requests: object, context: aio.ServicerContext) -> None:
        await serve_stream(context, echo, error_reply)

    handler = grpc.stream_stream_rpc_method_handler(
        stream, request_deserializer=deserialize, response_serializer=serialize
    )
    options = [("grpc.max_receive_message_length", 4 * PAYLOAD_BYTES)]
    async with loopback_stream_server("moe_serve.test.Echo", "Stream", handler, options) as address:
        yield address


def open_echo(channel: aio.Channel) -> object:
    return channel.stream_stream(METHOD, request_serializer=serialize, response_deserializer=deserialize)


async def cancel_half_mid_write(address: str) -> None:
    client: StreamClient[Message, Message] = StreamClient(address, open_echo, 4 * PAYLOAD_BYTES)
    try:
        await client.call(Message(0, b"warm-up"), timeout=10)
        stream = client._stream
        rng = random.Random(0)
        calls = [
            asyncio.create_task(client.call(Message(0, bytes([i % 256]) * PAYLOAD_BYTES), timeout=30))
            for i in range(CALLS)
        ]
        cancelled = set(rng.sample(range(CALLS), CALLS // 2))
        for index in sorted(cancelled):
            await asyncio.sleep(rng.uniform(0, 0.002))
            calls[index].cancel()
        outcomes = await asyncio.gather(*calls, return_exceptions=True)

        survivors = [outcome for i, outcome in enumerate(outcomes) if i not in cancelled]
        failures = [outcome for outcome in survivors if isinstance(outcome, BaseException)]
        assert not failures, failures[:3]
        assert [reply.payload[:1] for reply in survivors] == [
            bytes([i % 256]) for i in range(CALLS) if i not in cancelled
        ]
        assert client._stream is stream  # the one stream carried everything, never reopened
        assert not client._pending  # nothing left behind by the callers that went away
    finally:
        await client.close()


def test_callers_cancelled_mid_write_leave_the_shared_stream_to_the_others() -> None:
    async def scenario() -> None:
        async with echo_server() as address:
            await cancel_half_mid_write(address)

    asyncio.run(scenario())
