"""Rows to a worker on another host by one-sided transfers: NIXL, NVIDIA's inference transfer library
(UCX underneath: RDMA between hosts, shared memory or CMA on one, GPU memory where registered).

The sender of ComputeRequests registers each worker stream's arena (moe_serve/runtime/shared_arena.py)
with its process's NIXL agent and offers the agent's metadata and the arena's address beside the
same-host offer. A worker that cannot map the arena (another host) but has NIXL accepts: it READs a
batch's rows by the (offset, size) the message already carries into the same offset of a mirror of
its own, and, when it answers with rows, WRITEs its outputs into the output region before it answers.
The gRPC stream still carries every control message; only row bytes move through NIXL.

- The worker initiates every transfer and polls it from its event loop; the sender only has to let its
  agent progress (connection set-up, and the transfers of transports without hardware RMA, such as
  TCP). NIXL's progress thread spins a core, so it is off: the sender's loop progresses the agent every
  PROGRESS_PERIOD_S while any of its regions is lent out, and never otherwise.
- Small batches (under EAGER_BYTES: decode steps) stay inside the message; a transfer pays off above it.
- Bounds: a worker's mirror has its stream's arena size, and every region is checked as the same-host
  path checks it before a transfer is made; the sender's allocator keeps lent regions apart.
- Failures: a transfer that errors or does not finish within TRANSFER_TIMEOUT_S answers UNAVAILABLE (the
  router retries elsewhere); a stream's end deregisters its memory on both sides and drops the peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import torch

from moe_serve.protos import moe_serve_pb2 as moe_pb2
from moe_serve.runtime import codec
from moe_serve.runtime.errors import ServiceUnavailable
from moe_serve.runtime.shared_arena import Arena, checked_region

logger = logging.getLogger(__name__)
TRANSPORT = "nixl"
OFFER_KEY = "x-moe-serve-nixl"  # agent name, arena address, size and id
METADATA_KEY = "x-moe-serve-nixl-bin"  # the sender agent's metadata (binary: a -bin key)
PROGRESS_PERIOD_S = 0.0005
# batches under this size go inside the message (eager), larger ones by transfer (rendezvous), as UCX
# and MPI split them: a decode step's rows cost less as bytes than as a READ and a WRITE
EAGER_BYTES = 64 << 10
TRANSFER_TIMEOUT_S = 10.0
# `pip install nixl` installs a dispatcher package; nixl-cu12 / nixl-cu13 install their builds directly
_MODULES = ("nixl._api", "nixl_cu12._api", "nixl_cu13._api")
_agent: NixlAgent | None = None
_unavailable: str | None = None


def _api() -> ModuleType:
    errors = []
    for name in _MODULES:
        try:
            return importlib.import_module(name)
        except ImportError as error:
            errors.append(f"{name}: {error}")
    raise ImportError("; ".join(errors))


def process_agent() -> NixlAgent | None:
    """This process's NIXL agent, made at first use; None (said once) where NIXL is not installed."""
    global _agent, _unavailable
    if _agent is None and _unavailable is None:
        try:
            _agent = NixlAgent(_api())
        except Exception as error:
            _unavailable = str(error)
            logger.warning("NIXL is not available (%s): rows go by shared memory or as bytes", error)
    return _agent


class NixlAgent:
    """One NIXL agent (UCX backend) per process, used from its event loop's thread only."""

    def __init__(self, api: ModuleType) -> None:
        if not os.getenv("NIXL_LOG_LEVEL"):  # NIXL's own logger prints an INFO line per agent to stdout
            logging.getLogger("nixl").setLevel(logging.WARNING)
        self.name = f"moe-serve-{os.uname().nodename}-{os.getpid()}-{random.getrandbits(32):08x}"
        self.agent = api.nixl_agent(self.name, api.nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
        self._peers: Counter[str] = Counter()  # streams using each remote agent
        self._lent = 0  # this process's regions out to workers that transfer by themselves
        self._progress: asyncio.Task[None] | None = None
        self.transfers = Counter[str]()  # completed READs and WRITEs, for tests and metrics

    # ---------------------------------------------------------------- memory

    def register(self, address: int, size: int) -> Any:
        return self.agent.register_memory([(address, size, 0, "")], "DRAM")

    def deregister(self, registration: Any) -> None:
        try:
            self.agent.deregister_memory(registration)
        except Exception as error:
            logger.warning("NIXL could not deregister memory: %s", error)

    def metadata(self) -> bytes:
        return bytes(self.agent.get_agent_metadata())

    # ---------------------------------------------------------------- the sender's side: progress

    def lend(self) -> None:
        self._lent += 1
        if self._progress is None or self._progress.done():
            self._progress = asyncio.get_running_loop().create_task(self._progress_while_lent(), name="nixl-progress")

    def give_back(self, count: int = 1) -> None:
        self._lent = max(0, self._lent - count)

    async def _progress_while_lent(self) -> None:
        while self._lent > 0:
            self.agent.get_new_notifs()  # runs the UCX worker: connection requests, emulated RMA
            await asyncio.sleep(PROGRESS_PERIOD_S)

    # ---------------------------------------------------------------- the worker's side: transfers

    def connect(self, metadata: bytes) -> str:
        """The remote agent named in `metadata` (loaded again: its registrations may have grown)."""
        name = self.agent.add_remote_agent(metadata)
        peer = name.decode() if isinstance(name, bytes) else str(name)
        self._peers[peer] += 1
        return peer

    def disconnect(self, peer: str) -> None:
        self._peers[peer] -= 1
        if self._peers[peer] <= 0:
            del self._peers[peer]
            with contextlib.suppress(Exception):  # a dead peer is gone already
                self.agent.remove_remote_agent(peer)

    async def transfer(
        self, operation: str, local: int, remote: int, size: int, peer: str, timeout_s: float, what: str
    ) -> None:
        """READ `size` bytes at `remote` of `peer` into `local`, or WRITE them there; UNAVAILABLE when
        the transfer fails or outlasts `timeout_s`."""
        try:
            handle = self.agent.initialize_xfer(
                operation,
                self.agent.get_xfer_descs([(local, size, 0)], "DRAM"),
                self.agent.get_xfer_descs([(remote, size, 0)], "DRAM"),
                peer,
            )
        except Exception as error:
            raise ServiceUnavailable(f"{what}: NIXL cannot {operation} the sender's memory ({error})") from None
        finished = False
        try:
            await self._until_done(handle, operation, timeout_s, what)
            finished = True
            self.transfers[operation] += 1
        finally:
            try:
                self.agent.release_xfer_handle(handle)
            except Exception as error:  # in flight and not cancellable: it is left to NIXL
                if finished:
                    logger.warning("NIXL could not release a transfer handle: %s", error)

    async def _until_done(self, handle: Any, operation: str, timeout_s: float, what: str) -> None:
        deadline, polls = time.monotonic() + timeout_s, 0
        try:
            state = self.agent.transfer(handle)
            while state == "PROC":
                polls += 1
                if time.monotonic() > deadline:
                    raise ServiceUnavailable(f"{what}: NIXL {operation} took over {timeout_s:g} s (the sender gone?)")
                await asyncio.sleep(0 if polls < 64 else PROGRESS_PERIOD_S)  # short ones finish within a few turns
                state = self.agent.check_xfer_state(handle)
        except ServiceUnavailable:
            raise
        except Exception as error:  # NIXL raises its own types (a disconnected peer, a UCX error)
            raise ServiceUnavailable(f"{what}: NIXL {operation} of the sender's memory failed ({error})") from None
        if state != "DONE":
            raise ServiceUnavailable(f"{what}: NIXL {operation} of the sender's memory failed")


class NixlOffer:
    """The sender's side of one arena: its memory registered with the process agent, and the offer."""

    transport = TRANSPORT
    eager_bytes = EAGER_BYTES

    def __init__(self, agent: NixlAgent, arena: Arena) -> None:
        self.agent, self.arena_id, self.size = agent, arena.id, arena.size
        self.address = arena.tensor(0, torch.uint8, (arena.size,)).data_ptr()
        self.registration: Any = agent.register(self.address, arena.size)
        self._lent = 0

    @classmethod
    def register(cls, arena: Arena, agent: NixlAgent | None = None) -> NixlOffer | None:
        """`arena` registered with `agent` (this process's by default); None when that cannot be."""
        agent = agent or process_agent()
        if agent is None:
            return None
        try:
            return cls(agent, arena)
        except Exception as error:
            logger.warning("NIXL could not register a stream's arena (%s): it is not offered", error)
            return None

    def metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        offer = f"{self.agent.name}:{self.address}:{self.size}:{self.arena_id}"
        return ((OFFER_KEY, offer), (METADATA_KEY, self.agent.metadata()))

    def lend(self) -> None:
        self._lent += 1
        self.agent.lend()

    def give_back(self) -> None:
        self._lent -= 1
        self.agent.give_back()

    def close(self) -> None:
        self.agent.give_back(self._lent)
        self._lent = 0
        if self.registration is not None:
            self.agent.deregister(self.registration)
            self.registration = None


class NixlArenaView:
    """The worker's side: the sender's arena reached by transfers, through a mirror of the same size."""

    transport = TRANSPORT
    same_host = False

    def __init__(self, agent: NixlAgent, peer: str, remote_address: int, size: int, arena_id: int) -> None:
        self.agent, self.peer, self.remote_address = agent, peer, remote_address
        self.id, self.size = arena_id, size
        self.mirror: torch.Tensor | None = torch.empty(size, dtype=torch.uint8)  # pages come as rows land
        self.registration: Any = agent.register(self.mirror.data_ptr(), size)
        self.timeout_s = TRANSFER_TIMEOUT_S

    @classmethod
    def attach(
        cls, offer: str, metadata: bytes | None, agent: NixlAgent | None = None
    ) -> tuple[NixlArenaView | None, str]:
        """Reach the offered arena through NIXL, with `agent` (this process's by default); (None, why)
        when it cannot be."""
        try:
            name, address, size, arena_id = offer.rsplit(":", 3)
            remote_address, arena_size, identifier = int(address), int(size), int(arena_id)
        except ValueError:
            return None, "malformed NIXL offer"
        if not metadata or arena_size <= 0:
            return None, "NIXL offer without the agent's metadata"
        agent = agent or process_agent()
        if agent is None:
            return None, "NIXL is not available here"
        try:
            peer = agent.connect(metadata)
        except Exception as error:
            return None, f"NIXL cannot load the sender's metadata ({error})"
        if peer != name:
            agent.disconnect(peer)
            return None, f"the NIXL metadata is agent {peer}'s, the offer names {name}"
        try:
            return cls(agent, peer, remote_address, arena_size, identifier), ""
        except Exception as error:
            agent.disconnect(peer)
            return None, f"NIXL cannot register a mirror of {arena_size} bytes ({error})"

    def _local(self, region: moe_pb2.SharedRegion, dtype: torch.dtype, shape: Sequence[int], what: str) -> torch.Tensor:
        if self.mirror is None:
            raise ServiceUnavailable(f"{what}: the stream's NIXL mirror is closed")
        count = codec.element_count(shape)
        piece = self.mirror[region.offset : region.offset + region.byte_size]
        return piece.view(dtype).view(tuple(shape)) if count else torch.empty(tuple(shape), dtype=dtype)

    async def read(self, region: moe_pb2.SharedRegion, datatype: str, shape: Sequence[int], what: str) -> torch.Tensor:
        """The region's tensor, READ from the sender's memory into this stream's mirror."""
        dtype = checked_region(region, datatype, shape, what, self.id, self.size)
        local = self._local(region, dtype, shape, what)
        if region.byte_size:
            await self._transfer("READ", region, local, what)
        return local

    async def write(self, region: moe_pb2.SharedRegion, values: torch.Tensor, what: str) -> None:
        """`values` WRITTEN into the sender's region; done when this returns."""
        dtype = checked_region(region, codec.datatype_name(values.dtype), list(values.shape), what, self.id, self.size)
        local = self._local(region, dtype, list(values.shape), what)
        if region.byte_size:
            local.copy_(values)
            await self._transfer("WRITE", region, local, what)

    async def _transfer(self, operation: str, region: moe_pb2.SharedRegion, local: torch.Tensor, what: str) -> None:
        await self.agent.transfer(
            operation,
            local.data_ptr(),
            self.remote_address + region.offset,
            region.byte_size,
            self.peer,
            self.timeout_s,
            what,
        )

    def close(self) -> None:
        """The stream ended: the mirror is deregistered and the peer dropped once no stream uses it."""
        if self.registration is not None:
            self.agent.deregister(self.registration)
            self.registration = None
            self.agent.disconnect(self.peer)
        self.mirror = None
