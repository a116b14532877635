"""The same-host side channel of a stream (moe_serve/runtime/local_socket.py, used by
moe_serve/runtime/streams.py): frames, the token handshake, and a stream whose messages take a Unix
socket beside gRPC, in one process (an in-process aio server, real sockets)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest
from grpc import aio

from moe_serve.protos import moe_serve_pb2 as moe_pb2
from moe_serve.runtime import local_socket
from moe_serve.runtime.errors import MoEServeError, ServiceUnavailable
from moe_serve.runtime.local_socket import FrameError, FrameReader, SideChannelListener, frame
from moe_serve.runtime.streams import StreamClient, serve_stream
from tests.helpers import loopback_stream_server

SERVICE, METHOD = "moe_serve.test.Side", "Compute"
Handle = Callable[[moe_pb2.ComputeRequest], Awaitable[moe_pb2.ComputeResult]]
LIMIT = 1 << 20


# ---------------------------------------------------------------------------------- frames


def test_frames_split_across_reads_and_packed_in_one_read_come_out_whole() -> None:
    reader = FrameReader(LIMIT)
    stream = frame(b"first") + frame(b"") + frame(b"x" * 1000)
    pieces = [stream[i : i + 7] for i in range(0, len(stream), 7)]
    frames = []
    for piece in pieces:
        reader.feed(piece)
        while (payload := reader.next_frame()) is not None:
            frames.append(payload)
    assert frames == [b"first", b"", b"x" * 1000]


def test_a_frame_over_the_limit_is_refused_before_its_bytes_are_buffered() -> None:
    reader = FrameReader(16)
    reader.feed(frame(b"y" * 17)[:4])  # the length alone
    with pytest.raises(FrameError, match="exceeds the limit of 16"):
        reader.next_frame()


# ---------------------------------------------------------------------------------- handshake


async def _connection_closed(sock: socket.socket, timeout: float = 3.0) -> bool:
    """True once the peer closed `sock` (read returns EOF)."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            return await loop.sock_recv(sock, 1) == b""
    except TimeoutError:
        return False


async def _raw_connect(listener: SideChannelListener) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, "\0" + listener.name)
    return sock


def test_only_the_offered_token_opens_a_side_channel_and_only_once() -> None:
    async def scenario() -> None:
        listener = SideChannelListener(LIMIT)
        await listener.start()
        received: list[bytes] = []
        try:
            offer, waiting, forget = listener.offer(received.append)
            # a stranger with a wrong token is closed, and the offer stays open
            stranger = await _raw_connect(listener)
            stranger.send(frame(b"\0" * local_socket.TOKEN_BYTES))
            assert await _connection_closed(stranger)
            stranger.close()
            assert not waiting.channel.done()
            # the token holder's frames reach the stream, in order, even sent with the token at once
            channel = await local_socket.connect(offer, LIMIT, lambda _: None)
            request = moe_pb2.ComputeRequest(request_id="r", layer=3)
            channel.send(request)
            channel.send(moe_pb2.ComputeRequest(request_id="s"))
            server_end = await asyncio.wait_for(waiting.channel, 3)
            for _ in range(100):
                if len(received) == 2:
                    break
                await asyncio.sleep(0.01)
            assert [moe_pb2.ComputeRequest.FromString(p).request_id for p in received] == ["r", "s"]
            # the token is spent: a second connection with it is refused
            replay = await _raw_connect(listener)
            replay.send(frame(bytes.fromhex(offer.rpartition(":")[2])))
            assert await _connection_closed(replay)
            replay.close()
            # the stream's end closes its channel
            forget()
            await asyncio.wait_for(channel.closed, 3)
            assert not server_end.open
        finally:
            await listener.close()

    asyncio.run(scenario())


def test_silent_and_oversized_peers_are_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local_socket, "HANDSHAKE_TIMEOUT_S", 0.2)

    async def scenario() -> None:
        listener = SideChannelListener(64)
        await listener.start()
        try:
            silent = await _raw_connect(listener)  # connects, never presents a token
            assert await _connection_closed(silent)
            silent.close()
            offer, waiting, _ = listener.offer(lambda _: None)
            channel = await local_socket.connect(offer, LIMIT, lambda _: None)
            await asyncio.wait_for(waiting.channel, 3)
            channel.send(moe_pb2.ComputeRequest(request_id="z" * 100))  # over the listener's 64-byte limit
            await asyncio.wait_for(channel.closed, 3)
        finally:
            await listener.close()

    asyncio.run(scenario())


# ---------------------------------------------------------------------------------- a stream with one


@contextlib.asynccontextmanager
async def side_server(
    offer_side: bool, hold: asyncio.Event | None = None, handle: Handle | None = None
) -> AsyncIterator[tuple[str, list[str]]]:
    """An aio server whose stream answers ComputeRequests (by default rows_delivered = layer * 10,
    after `hold` for request "hold"; errors answer -1), offering a side channel when asked; yields
    its address and the ids of the requests answered, in order."""
    listener = SideChannelListener(LIMIT)
    await listener.start()
    origins: list[str] = []

    async def answer(request: moe_pb2.ComputeRequest) -> moe_pb2.ComputeResult:
        if hold is not None and request.request_id == "hold":
            await hold.wait()
        origins.append(request.request_id)
        return moe_pb2.ComputeResult(rows_delivered=request.layer * 10)

    async def stream(requests: object, context: aio.ServicerContext) -> None:
        await serve_stream(
            context,
            handle or answer,
            lambda _, error: moe_pb2.ComputeResult(rows_delivered=-1),
            side_listener=listener if offer_side else None,
            decode_request=moe_pb2.ComputeRequest.FromString,
        )

    handler = grpc.stream_stream_rpc_method_handler(
        stream,
        request_deserializer=moe_pb2.ComputeRequest.FromString,
        response_serializer=moe_pb2.ComputeResult.SerializeToString,
    )
    try:
        async with loopback_stream_server(SERVICE, METHOD, handler) as address:
            yield address, origins
    finally:
        await listener.close()


def _client(address: str) -> StreamClient[moe_pb2.ComputeRequest, moe_pb2.ComputeResult]:
    return StreamClient(
        address,
        lambda channel: channel.stream_stream(
            f"/{SERVICE}/{METHOD}",
            request_serializer=moe_pb2.ComputeRequest.SerializeToString,
            response_deserializer=moe_pb2.ComputeResult.FromString,
        ),
        LIMIT,
        decode_reply=moe_pb2.ComputeResult.FromString,
    )


async def _side_taken(client: StreamClient, timeout: float = 3.0) -> bool:
    for _ in range(int(timeout / 0.01)):
        if client.side is not None:
            return True
        await asyncio.sleep(0.01)
    return False


@pytest.mark.parametrize("offer_side", [True, False])
def test_calls_get_their_own_answers_over_the_side_channel_or_the_stream(offer_side: bool) -> None:
    async def scenario() -> None:
        async with side_server(offer_side) as (address, origins):
            client = _client(address)
            try:
                first = await client.call(moe_pb2.ComputeRequest(request_id="first", layer=1), timeout=5)
                assert first.rows_delivered == 10
                assert await _side_taken(client, 1.0 if offer_side else 0.3) == offer_side
                sent_on_side = client.side[1] if client.side is not None else None
                replies = await asyncio.gather(
                    *(client.call(moe_pb2.ComputeRequest(request_id=f"c{i}", layer=i), timeout=5) for i in range(50))
                )
                assert [reply.rows_delivered for reply in replies] == [10 * i for i in range(50)]
                assert sorted(origins[1:]) == sorted(f"c{i}" for i in range(50))
                if offer_side:  # the channel carried them, and it is still the one in use
                    assert client.side is not None and client.side[1] is sent_on_side and sent_on_side.open
            finally:
                await client.close()

    asyncio.run(scenario())


def test_a_broken_side_channel_fails_waiting_calls_at_once_and_the_next_call_recovers() -> None:
    async def scenario() -> None:
        hold = asyncio.Event()
        async with side_server(True, hold) as (address, _):
            client = _client(address)
            try:
                await client.call(moe_pb2.ComputeRequest(request_id="warm", layer=1), timeout=5)
                assert await _side_taken(client)
                waiting = asyncio.ensure_future(client.call(moe_pb2.ComputeRequest(request_id="hold"), timeout=30))
                await asyncio.sleep(0.1)
                assert client.side is not None
                client.side[1].transport.abort()  # the socket breaks under a call in flight
                started = asyncio.get_running_loop().time()
                with pytest.raises(ServiceUnavailable):
                    await waiting
                assert asyncio.get_running_loop().time() - started < 2  # not its 30 s deadline
                hold.set()
                # a new stream (and side channel) serves the next call
                reply = await client.call(moe_pb2.ComputeRequest(request_id="after", layer=2), timeout=5)
                assert reply.rows_delivered == 20
                assert await _side_taken(client)
            finally:
                await client.close()

    asyncio.run(scenario())


def test_errors_on_the_side_channel_are_replies_and_the_stream_keeps_serving() -> None:
    async def refuse_negative(request: moe_pb2.ComputeRequest) -> moe_pb2.ComputeResult:
        if request.layer < 0:
            raise MoEServeError("negative layer")
        return moe_pb2.ComputeResult(rows_delivered=request.layer)

    async def scenario() -> None:
        async with side_server(True, handle=refuse_negative) as (address, _):
            client = _client(address)
            try:
                await client.call(moe_pb2.ComputeRequest(layer=1), timeout=5)
                assert await _side_taken(client)
                bad = await client.call(moe_pb2.ComputeRequest(layer=-1), timeout=5)
                good = await client.call(moe_pb2.ComputeRequest(layer=7), timeout=5)
                assert (bad.rows_delivered, good.rows_delivered) == (-1, 7)
            finally:
                await client.close()

    asyncio.run(scenario())
