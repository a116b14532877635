"""Same-host zero-copy on the compute and delivery hops (moe_serve/runtime/shared_arena.py): the allocator,
the receiver's checks of every region, region lifetimes on a real stream, and no memory left behind by a
dead peer."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from grpc import aio

from moe_serve.bench.transports import rows_by_transport
from moe_serve.protos import moe_serve_pb2 as moe_pb2
from moe_serve.runtime.errors import InvalidInput, MoEServeError, ServiceUnavailable
from moe_serve.runtime.shared_arena import ACCEPT_KEY, ALIGNMENT, OFFER_KEY, Arena, ArenaView
from moe_serve.runtime.streams import StreamClient, serve_stream
from tests.helpers import (
    infer_request,
    kserve_stub,
    loopback_stream_server,
    reference_blocks,
    reference_forward,
    response_tensors,
    start_process_stack,
    wait_until,
)

MIB = 1 << 20


def attached(arena: Arena) -> ArenaView:
    view, reason = ArenaView.attach(arena.metadata()[0][1])
    assert view is not None, reason
    return view


# ------------------------------------------------------------------ the allocator (no process)


def test_regions_are_aligned_bounded_and_coalesce_when_released() -> None:
    arena = Arena(4 * 4096)
    first, second, third = arena.allocate(100), arena.allocate(4096), arena.allocate(1)
    assert (first, second, third) == (0, 128, 128 + 4096)
    assert all(offset % ALIGNMENT == 0 for offset in (first, second, third))
    assert arena.allocate(4 * 4096) is None  # no room: the batch goes as bytes
    for offset in (second, first, third):
        arena.release(offset)
    assert arena.in_use() == 0
    assert arena.allocate(4 * 4096) == 0  # the free neighbours merged back into one region
    arena.closed()


def test_a_retired_arena_hands_out_nothing_and_ignores_late_releases() -> None:
    arena = Arena(MIB)
    offset = arena.allocate(1000)
    assert offset is not None
    arena.closed()
    assert arena.allocate(10) is None and not arena.usable
    arena.release(offset)  # the late reply of a batch written before the stream ended
    assert arena.allocate(10) is None


# ------------------------------------------------------------------ the worker's side (no process)


def test_the_worker_reads_what_the_sender_wrote_and_writes_back_in_place() -> None:
    arena = Arena(MIB)
    view = attached(arena)
    rows = torch.randn(3, 16)
    offset = arena.allocate(rows.nbytes * 2)
    assert offset is not None
    arena.tensor(offset, torch.float32, (3, 16)).copy_(rows)
    seen = view.tensor(arena.region(offset, rows.nbytes), "FP32", [3, 16], "rows")
    assert torch.equal(seen, rows)
    view.tensor(arena.region(offset + rows.nbytes, rows.nbytes), "FP32", [3, 16], "outputs").copy_(rows * 2)
    assert torch.equal(arena.tensor(offset + rows.nbytes, torch.float32, (3, 16)), rows * 2)
    del seen
    view.close()
    arena.closed()


@pytest.mark.parametrize(
    ("region", "shape", "error", "message"),
    [
        (dict(offset=0, byte_size=4 * 16), [2, 16], InvalidInput, "region of 64 bytes for FP32"),
        (dict(offset=MIB - 64, byte_size=128), [2, 16], InvalidInput, "outside the arena"),
        (dict(offset=MIB, byte_size=128), [2, 16], InvalidInput, "outside the arena"),
        (dict(offset=8, byte_size=128), [2, 16], InvalidInput, "outside the arena"),  # unaligned
        (dict(offset=0, byte_size=128), [-2, -16], InvalidInput, "region of 128 bytes"),
    ],
    ids=["size differs from the shape", "past the end", "starts past the end", "unaligned", "negative shape"],
)
def test_a_region_outside_the_arena_or_of_the_wrong_size_is_refused(
    region: dict, shape: list[int], error: type[MoEServeError], message: str
) -> None:
    arena = Arena(MIB)
    view = attached(arena)
    with pytest.raises(error, match=message):
        view.tensor(moe_pb2.SharedRegion(arena=arena.id, **region), "FP32", shape, "rows")
    with pytest.raises(ServiceUnavailable, match="not this stream's"):  # retried, never read
        view.tensor(moe_pb2.SharedRegion(arena=arena.id + 1, offset=0, byte_size=128), "FP32", [2, 16], "rows")
    view.close()
    arena.closed()


def test_offers_from_elsewhere_are_declined_with_the_reason() -> None:
    arena = Arena(MIB)
    host, pid, fd, inode, size, arena_id = arena.metadata()[0][1].rsplit(":", 5)
    for offer, reason in (
        ("garbage", "malformed"),
        (f"another-boot-id:{pid}:{fd}:{inode}:{size}:{arena_id}", "another host"),
        (f"{host}:{pid}:{fd}:{int(inode) + 1}:{size}:{arena_id}", "not the offered file"),
        (f"{host}:{2**22 + 7}:{fd}:{inode}:{size}:{arena_id}", "cannot open"),
    ):
        view, why = ArenaView.attach(offer)
        assert view is None and reason in why, (offer, why)
    arena.closed()


# ------------------------------------------------------------------ region lifetimes on a real stream


@dataclass
class Message:
    call_id: int
    delay_ms: int


def serialize(message: Message) -> bytes:
    return struct.pack("<QI", message.call_id, message.delay_ms)


def deserialize(data: bytes) -> Message:
    return Message(*struct.unpack("<QI", data))


@contextlib.asynccontextmanager
async def arena_server() -> AsyncIterator[tuple[str, list[ArenaView | None]]]:
    """A stream server that maps offered arenas (as the worker does) and answers after `delay_ms`."""
    views: list[ArenaView | None] = []

    async def stream(requests: object, context: aio.ServicerContext) -> None:
        offer = dict(context.invocation_metadata() or ()).get(OFFER_KEY)
        view, _ = ArenaView.attach(str(offer))
        views.append(view)
        await context.send_initial_metadata(((ACCEPT_KEY, "1" if view else "0"),))

        async def answer(message: Message) -> Message:
            await asyncio.sleep(message.delay_ms / 1000)
            return Message(0, 0)

        await serve_stream(context, answer, lambda message, error: Message(0, 0))

    handler = grpc.stream_stream_rpc_method_handler(
        stream, request_deserializer=deserialize, response_serializer=serialize
    )
    async with loopback_stream_server("moe_serve.test.Arena", "Stream", handler) as address:
        yield address, views


def open_arena_stream(channel: aio.Channel):
    return channel.stream_stream(
        "/moe_serve.test.Arena/Stream", request_serializer=serialize, response_deserializer=deserialize
    )


def test_a_region_outlives_its_callers_timeout_until_the_late_reply_and_the_stream_end_retires_the_arena() -> None:
    async def scenario() -> None:
        async with arena_server() as (address, views):
            client: StreamClient[Message, Message] = StreamClient(
                address, open_arena_stream, 1 << 20, new_session=lambda: Arena(MIB)
            )
            await client.call(Message(0, 0), timeout=5)  # opens the stream; the offer is answered
            arena = client.session
            assert arena.usable and views[0] is not None
            answered = arena.allocate(1000)
            await client.call(Message(0, 10), timeout=5, release=lambda: arena.release(answered))
            assert arena.in_use() == 1024  # answered: the caller releases once it has read the region
            arena.release(answered)
            late = arena.allocate(1000)
            with pytest.raises(MoEServeError):  # the caller leaves; the worker may still write there
                await client.call(Message(0, 300), timeout=0.05, release=lambda: arena.release(late))
            assert arena.in_use() == 1024
            await asyncio.sleep(0.5)  # the late reply arrived: now it is free
            assert arena.in_use() == 0
            stuck = arena.allocate(1000)
            caller = asyncio.create_task(
                client.call(Message(0, 5000), timeout=0.05, release=lambda: arena.release(stuck))
            )
            with pytest.raises(MoEServeError):
                await caller
            await client.close()  # the stream ends with the reply outstanding
            assert arena.retired and arena.allocate(1) is None

    asyncio.run(scenario())


# ------------------------------------------------------------------ real processes


def arena_mappings(pid: int) -> int:
    return sum("memfd:moe-serve-arena" in line for line in Path(f"/proc/{pid}/maps").read_text().splitlines())


def test_rows_pass_through_shared_memory_exactly_and_a_killed_gateway_leaves_no_memory_mapped(checkpoints) -> None:
    checkpoint = checkpoints(torch.float32)
    shm_before = set(os.listdir("/dev/shm"))
    stack = start_process_stack(checkpoint, [["--experts", "0-3"], ["--experts", "4-7"]], router_mode="embedded")
    try:
        block = reference_blocks(checkpoint, torch.float32)[0]
        gateway_pid, workers = stack.gateway.process.pid, [worker.process.pid for worker in stack.workers]
        channel, stub = kserve_stub(stack.address)
        fds = []
        with channel:
            for seed in range(120):
                hidden = torch.randn(1 + seed % 40, 64, generator=torch.Generator().manual_seed(seed))
                output = response_tensors(stub.ModelInfer(infer_request(stack.model, hidden), timeout=30))["output"]
                torch.testing.assert_close(output, reference_forward(block, hidden)[0], rtol=1e-5, atol=1e-5)
                if seed in (59, 119):
                    fds.append(len(os.listdir(f"/proc/{gateway_pid}/fd")))
        assert fds[0] == fds[1]  # nothing opened per request
        assert arena_mappings(gateway_pid) == 2  # one arena per worker stream, however many requests
        assert all(arena_mappings(pid) == 1 for pid in workers)  # each worker mapped its stream's arena
        stack.gateway.process.send_signal(signal.SIGKILL)
        stack.gateway.process.wait(10)
        # the streams broke: each worker unmapped the dead gateway's arena, and the kernel freed it
        wait_until(lambda: all(arena_mappings(pid) == 0 for pid in workers), 10, "workers unmapped the arena")
        assert set(os.listdir("/dev/shm")) == shm_before  # a memfd never had a name to leak
    finally:
        stack.stop()


def test_outputs_reach_a_separate_gateway_through_the_workers_arenas_and_a_killed_worker_unmaps(checkpoints) -> None:
    """Router as its own service: each worker offers the gateway an arena on its delivery stream and
    writes its outputs there; the gateway maps it, reads them in place, and unmaps it when the stream ends."""
    checkpoint = checkpoints(torch.float32)
    workers_args = [["--experts", "0-7", "--metrics-port", "0"], ["--experts", "0-7", "--metrics-port", "0"]]
    stack = start_process_stack(checkpoint, workers_args, router_mode="service")
    try:
        block = reference_blocks(checkpoint, torch.float32)[0]
        channel, stub = kserve_stub(stack.address)
        with channel:
            for seed in range(30):
                hidden = torch.randn(1 + seed * 13, 64, generator=torch.Generator().manual_seed(seed))
                output = response_tensors(stub.ModelInfer(infer_request(stack.model, hidden), timeout=30))["output"]
                torch.testing.assert_close(output, reference_forward(block, hidden)[0], rtol=1e-5, atol=1e-5)
        for worker in stack.workers:
            delivered = rows_by_transport([str(worker.ready["metrics_address"])], "delivered")
            # every delivery but each stream's first (sent with the offer, before the gateway answered it)
            assert delivered["shm"] > 3000 and delivered.get("bytes", 0) <= 64, delivered
        gateway_pid = stack.gateway.process.pid
        assert arena_mappings(gateway_pid) == 2  # one per worker's delivery stream
        stack.workers[0].process.send_signal(signal.SIGKILL)
        stack.workers[0].process.wait(10)
        wait_until(lambda: arena_mappings(gateway_pid) == 1, 10, "the gateway unmapped the dead worker's arena")
    finally:
        stack.stop()
