"""The compute hop's transport seam (moe_serve/runtime/transports.py) and its NIXL backend
(moe_serve/runtime/nixl_transport.py) in one process: two real NIXL agents (UCX over host memory)
stand for the router's and a worker's, as on two hosts; no process is started."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
import torch

from moe_serve.config import CommonSettings
from moe_serve.protos import moe_serve_pb2 as moe_pb2
from moe_serve.runtime import nixl_transport
from moe_serve.runtime.errors import InvalidInput, MoEServeError, ServiceUnavailable
from moe_serve.runtime.nixl_transport import METADATA_KEY, OFFER_KEY, NixlAgent, NixlArenaView, NixlOffer
from moe_serve.runtime.shared_arena import ACCEPT_KEY, Arena, ArenaView
from moe_serve.runtime.shared_arena import OFFER_KEY as SHM_OFFER_KEY
from moe_serve.runtime.transports import attach, stream_arena

MIB = 1 << 20


@pytest.fixture(scope="module")
def agents() -> tuple[NixlAgent, NixlAgent]:
    """A sender's agent and a worker's: what two hosts' processes would each have."""
    api = nixl_transport._api()
    return NixlAgent(api), NixlAgent(api)


class Link:
    """A sender's arena registered with NIXL, and the worker's view of it, as one stream has them."""

    def __init__(self, agents: tuple[NixlAgent, NixlAgent], size: int = MIB) -> None:
        sender, worker = agents
        self.arena = Arena(size, offer_shared_memory=False)
        self.arena.remote = NixlOffer.register(self.arena, sender)
        assert self.arena.remote is not None
        self.arena.remote.eager_bytes = 0  # these tests transfer small regions too
        offer = dict(self.arena.metadata())
        view, reason = NixlArenaView.attach(str(offer[OFFER_KEY]), offer[METADATA_KEY], worker)  # type: ignore[arg-type]
        assert view is not None, reason
        self.view = view
        self.arena.opened(((ACCEPT_KEY, view.transport),))

    def lend(self, values: torch.Tensor, room_for_outputs: bool = True) -> tuple[int, moe_pb2.SharedRegion]:
        offset = self.arena.allocate(values.nbytes * (2 if room_for_outputs else 1))
        assert offset is not None
        self.arena.tensor(offset, values.dtype, values.shape).copy_(values)
        return offset, self.arena.region(offset, values.nbytes)

    def close(self) -> None:
        self.view.close()
        self.arena.closed()


@pytest.fixture
def link(agents: tuple[NixlAgent, NixlAgent]) -> Iterator[Link]:
    made = Link(agents)
    yield made
    made.close()


@pytest.mark.parametrize(("dtype", "datatype"), [(torch.float32, "FP32"), (torch.bfloat16, "BF16")])
def test_rows_read_and_outputs_written_by_nixl_are_exact(link: Link, dtype: torch.dtype, datatype: str) -> None:
    async def scenario() -> None:
        assert link.arena.transport == "nixl" and link.arena.usable
        for rows_count in (1, 7, 300):
            rows = torch.randn(rows_count, 64, generator=torch.Generator().manual_seed(rows_count)).to(dtype)
            offset, region = link.lend(rows)
            seen = await link.view.read(region, datatype, [rows_count, 64], "rows")
            assert torch.equal(seen, rows)
            outputs = seen * 3 + 1
            output_offset = offset + rows.nbytes  # rows.nbytes is a multiple of 64 here
            await link.view.write(link.arena.region(output_offset, rows.nbytes), outputs, "outputs")
            assert torch.equal(
                link.arena.tensor(output_offset, dtype, outputs.shape), outputs
            )  # in the sender's memory
            link.arena.release(offset)
        empty = await link.view.read(moe_pb2.SharedRegion(arena=link.arena.id), datatype, [0, 64], "rows")
        assert empty.shape == (0, 64)

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("region", "shape", "message"),
    [
        (dict(offset=0, byte_size=100), [2, 16], "region of 100 bytes"),
        (dict(offset=MIB - 64, byte_size=128), [2, 16], "outside the arena"),
        (dict(offset=2 * MIB, byte_size=128), [2, 16], "outside the arena"),
        (dict(offset=8, byte_size=128), [2, 16], "outside the arena"),
        (dict(offset=0, byte_size=128), [-2, -16], "region of 128 bytes"),
    ],
    ids=["size differs from the shape", "past the end", "starts past the end", "unaligned", "negative shape"],
)
def test_nixl_checks_every_region_as_shared_memory_does_before_any_transfer(
    link: Link, region: dict, shape: list[int], message: str
) -> None:
    async def scenario() -> None:
        mapped, why = ArenaView.attach(Arena(MIB).metadata()[0][1])
        assert mapped is not None, why
        reads_before = link.view.agent.transfers["READ"]
        for view in (link.view, mapped):
            arena_id = view.id
            with pytest.raises(InvalidInput, match=message):
                await view.read(moe_pb2.SharedRegion(arena=arena_id, **region), "FP32", shape, "rows")
            with pytest.raises(ServiceUnavailable, match="not this stream's"):  # retried elsewhere, never read
                await view.read(moe_pb2.SharedRegion(arena=arena_id + 1, byte_size=128), "FP32", [2, 16], "rows")
        assert link.view.agent.transfers["READ"] == reads_before  # nothing was transferred for a refused region
        mapped.close()

    asyncio.run(scenario())


def test_a_sender_that_stalls_times_out_unavailable_and_one_that_left_fails_at_once(
    agents: tuple[NixlAgent, NixlAgent],
) -> None:
    async def scenario() -> None:
        sender, _ = agents
        link = Link(agents)
        # nothing lent yet, so the sender's loop does not progress its agent: the first transfer, which
        # needs the connection set up, stalls, and the worker gives up after its limit
        link.view.timeout_s = 0.3
        started = time.monotonic()
        with pytest.raises(ServiceUnavailable, match=r"took over 0\.3 s"):
            await link.view.read(link.arena.region(0, 64), "FP32", [1, 16], "rows")
        assert time.monotonic() - started < 2
        link.view.timeout_s = 10
        _, region = link.lend(torch.ones(1, 16))  # lent: the sender's loop progresses its agent
        assert torch.equal(await link.view.read(region, "FP32", [1, 16], "rows"), torch.ones(1, 16))
        link.arena.closed()  # the sender's stream ended: its memory is deregistered and unmapped
        assert sender._lent == 0  # what was lent is given back with it
        started = time.monotonic()
        with pytest.raises(ServiceUnavailable, match="NIXL READ"):
            await link.view.read(region, "FP32", [1, 16], "rows")
        assert time.monotonic() - started < 2
        link.view.close()
        with pytest.raises(ServiceUnavailable, match="closed"):
            await link.view.read(region, "FP32", [1, 16], "rows")

    asyncio.run(scenario())


def test_the_sender_progresses_its_agent_only_while_regions_are_lent(link: Link) -> None:
    async def scenario() -> None:
        sender = link.arena.remote.agent  # type: ignore[union-attr]
        first, _ = link.lend(torch.ones(4, 16))
        second, _ = link.lend(torch.ones(4, 16))
        await asyncio.sleep(0.01)
        assert sender._lent == 2 and sender._progress is not None and not sender._progress.done()
        link.arena.release(first)
        link.arena.release(second)
        await asyncio.sleep(0.01)
        assert sender._lent == 0 and sender._progress is not None and sender._progress.done()

    asyncio.run(scenario())


def test_batches_under_the_eager_size_stay_in_the_message_and_larger_ones_are_lent(link: Link) -> None:
    async def lend() -> None:  # lending starts the sender's progress on its loop
        link.arena.remote.eager_bytes = nixl_transport.EAGER_BYTES  # type: ignore[union-attr]
        assert link.arena.allocate(nixl_transport.EAGER_BYTES - 1) is None  # a decode step: rows as bytes
        offset = link.arena.allocate(nixl_transport.EAGER_BYTES)
        assert offset is not None
        link.arena.release(offset)

    asyncio.run(lend())
    shared = Arena(MIB)  # a mapped arena has no such limit: nothing is transferred
    shared.opened(((ACCEPT_KEY, "shm"),))
    assert shared.allocate(1) is not None
    shared.closed()


def test_nixl_offers_that_cannot_be_reached_are_declined_with_the_reason(agents: tuple[NixlAgent, NixlAgent]) -> None:
    sender, worker = agents
    arena = Arena(MIB, offer_shared_memory=False)
    arena.remote = NixlOffer.register(arena, sender)
    offer = dict(arena.metadata())
    name, address, size, arena_id = str(offer[OFFER_KEY]).rsplit(":", 3)
    for text, metadata, reason in (
        ("garbage", offer[METADATA_KEY], "malformed"),
        (str(offer[OFFER_KEY]), None, "without the agent's metadata"),
        (f"another-agent:{address}:{size}:{arena_id}", offer[METADATA_KEY], "the offer names another-agent"),
        (f"{name}:{address}:0:{arena_id}", offer[METADATA_KEY], "without the agent's metadata"),
    ):
        view, why = NixlArenaView.attach(text, metadata, worker)  # type: ignore[arg-type]
        assert view is None and reason in why, (text, why)
    assert not worker._peers  # a declined offer leaves no peer behind
    arena.closed()


def test_the_seam_offers_what_is_on_and_the_worker_takes_its_first_that_reaches(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert stream_arena(MIB, ()) is None  # bytes only
    shm_only = stream_arena(MIB, ("shm",))
    assert shm_only is not None and shm_only.remote is None
    assert [key for key, _ in shm_only.metadata()] == [SHM_OFFER_KEY]
    both = stream_arena(MIB, ("shm", "nixl"))
    assert both is not None and both.remote is not None
    assert {key for key, _ in both.metadata()} == {SHM_OFFER_KEY, OFFER_KEY, METADATA_KEY}
    view = attach(both.metadata(), ("shm", "nixl"), "worker w")  # same host: the mapping comes first
    assert view is not None and view.transport == "shm" and view.same_host
    both.opened(((ACCEPT_KEY, view.transport),))
    assert both.transport == "shm" and both.remote is None  # NIXL not taken: its registration is freed
    view.close()
    with caplog.at_level("INFO"):
        assert attach(shm_only.metadata(), ("nixl",), "worker w") is None  # offered nothing it takes: bytes
    assert "rows come as bytes" in caplog.text and "nixl: not offered" in caplog.text
    shm_only.opened(((ACCEPT_KEY, "0"),))
    assert not shm_only.usable
    for arena in (shm_only, both):
        arena.closed()


def test_transports_are_one_setting_read_from_flags_lists_or_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert CommonSettings().transports == ("shm",)
    assert CommonSettings(transports="shm, nixl").transports == ("shm", "nixl")  # a flag's value
    assert CommonSettings(transports=["nixl"]).transports == ("nixl",)  # a parent's settings JSON
    monkeypatch.setenv("MOE_SERVE_TRANSPORTS", "nixl,shm")
    assert CommonSettings().transports == ("nixl", "shm")
    monkeypatch.setenv("MOE_SERVE_TRANSPORTS", "")
    assert CommonSettings().transports == ()  # always bytes
    with pytest.raises(ValueError, match="'shm' or 'nixl'"):
        CommonSettings(transports="rdma")


def test_a_transfer_engine_error_is_a_status_not_a_crash(link: Link) -> None:
    async def scenario() -> None:
        link.view.remote_address = 1 << 40  # memory the sender never registered
        _, region = link.lend(torch.ones(2, 16))
        with pytest.raises(MoEServeError, match="NIXL cannot READ"):
            await link.view.read(region, "FP32", [2, 16], "rows")

    asyncio.run(scenario())
