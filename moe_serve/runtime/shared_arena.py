"""Same-host zero-copy: one shared-memory arena per stream that carries tensors (to a worker, to a gateway).

The sender of ComputeRequests (the router; inside the gateway when embedded) creates an anonymous
memory file (memfd) for each worker stream and offers it in the stream's metadata. A worker on the
same host maps it through /proc/<pid>/fd/<fd> and says so in its initial metadata; from then on a
batch's rows are written into a region of the arena (gathered there directly, no intermediate copy)
and the message carries only (arena, offset, size). The worker reads them in place and, when it
answers with its rows (embedded router), writes its outputs into the region's second part. On
another host, in another container, or where /proc is closed to it, the worker declines and rows
stay bytes on the stream: decided once per stream, when it opens.

The delivery hop (the router as its own service) works the same way round the other side: a worker
offers the gateway an arena on its delivery stream and writes its outputs there; the gateway reads
them in place and copies them into the request's combine buffer before it acknowledges.

Lifetime and safety:
- The arena lives as long as its stream. A memfd has no name: once both processes have unmapped it
  or died, the kernel frees it, so a peer that dies leaves no segment behind.
- A region is released when the reply to its message has been read, or when its stream ends; never
  at the caller's timeout, when the worker may still be writing into it. A stream that ends retires
  its arena whole: nothing in it is handed out again, so a late write lands in memory nobody reads.
- Memory is bounded by the arena's size; a batch that does not fit goes as bytes.
- The offer names this host's boot id and the file's inode: a worker that opens some other file
  under the same /proc path (another PID namespace, another host) sees the mismatch and declines.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import mmap
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch

from moe_serve.protos import moe_serve_pb2 as moe_pb2
from moe_serve.runtime import codec
from moe_serve.runtime.errors import InvalidInput, ServiceUnavailable

logger = logging.getLogger(__name__)
OFFER_KEY = "x-moe-serve-arena"
ACCEPT_KEY = "x-moe-serve-arena-accepted"
# regions start on 64-byte boundaries: CPU BLAS rounds differently on unaligned rows (see gating.py)
ALIGNMENT = 64
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def host_identity() -> str:
    """This kernel's boot id: processes that share it share memory files."""
    try:
        return _BOOT_ID.read_text().strip()
    except OSError:
        return ""


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


class RemoteOffer(Protocol):
    """Another way for the stream's receiver to reach the arena's memory (moe_serve/runtime/transports.py):
    an engine that moves its regions to and from another host by one-sided transfers."""

    transport: str
    eager_bytes: int  # smaller batches go inside the message: a transfer would cost them more

    def metadata(self) -> tuple[tuple[str, str | bytes], ...]: ...

    def lend(self) -> None: ...  # a region is out: the worker may transfer to or from it

    def give_back(self) -> None: ...

    def close(self) -> None: ...


class Arena:
    """The sender's side: a memfd, its mapping, and a first-fit allocator of aligned regions."""

    _ids = itertools.count(random.getrandbits(40) << 16)

    def __init__(self, size: int, offer_shared_memory: bool = True) -> None:
        self.size = size
        self.offer_shared_memory = offer_shared_memory
        self.remote: RemoteOffer | None = None  # set by transports.stream_arena when another engine is on
        self.id = next(Arena._ids)
        self.fd = os.memfd_create("moe-serve-arena", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)  # sparse: pages are backed as they are first written
        self.map: mmap.mmap | None = mmap.mmap(self.fd, size)
        self._free: list[tuple[int, int]] = [(0, size)]  # (offset, length), by offset
        self._used: dict[int, int] = {}
        self.transport = ""  # how the worker reaches it ("shm", "nixl"); "" until it says, or when it declined
        self.retired = False

    def metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        offers: tuple[tuple[str, str | bytes], ...] = ()
        if self.offer_shared_memory:
            inode = os.fstat(self.fd).st_ino
            offers = ((OFFER_KEY, f"{host_identity()}:{os.getpid()}:{self.fd}:{inode}:{self.size}:{self.id}"),)
        return offers + (self.remote.metadata() if self.remote is not None else ())

    def opened(self, initial_metadata: Sequence[tuple[str, str | bytes]] | None) -> None:
        answer = next((value for key, value in initial_metadata or () if key == ACCEPT_KEY), "0")
        self.transport = "shm" if answer == "1" else str(answer) if answer != "0" else ""
        if self.remote is not None and self.transport != self.remote.transport:
            self.remote.close()  # not taken: the engine's registration is freed now
            self.remote = None

    @property
    def accepted(self) -> bool:
        """The worker reaches this arena's memory, mapped or through a transfer engine."""
        return self.transport != ""

    @property
    def _lends_remotely(self) -> bool:
        return self.remote is not None and self.transport == self.remote.transport

    @property
    def usable(self) -> bool:
        return self.accepted and not self.retired

    def allocate(self, nbytes: int) -> int | None:
        """Offset of a free region of at least `nbytes`, or None when none is left (send bytes then)."""
        if self.retired or (self._lends_remotely and nbytes < self.remote.eager_bytes):  # type: ignore[union-attr]
            return None
        wanted = aligned(max(nbytes, 1))
        for index, (offset, length) in enumerate(self._free):
            if length >= wanted:
                if length == wanted:
                    del self._free[index]
                else:
                    self._free[index] = (offset + wanted, length - wanted)
                self._used[offset] = wanted
                if self._lends_remotely:
                    self.remote.lend()  # type: ignore[union-attr]
                return offset
        return None

    def release(self, offset: int) -> None:
        length = self._used.pop(offset, None)
        if length is None or self.retired:
            return
        if self._lends_remotely:
            self.remote.give_back()  # type: ignore[union-attr]
        self._free.append((offset, length))
        self._free.sort()
        merged: list[tuple[int, int]] = []
        for start, size in self._free:  # coalesce neighbours
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1] = (merged[-1][0], merged[-1][1] + size)
            else:
                merged.append((start, size))
        self._free = merged

    def in_use(self) -> int:
        return sum(self._used.values())

    def tensor(self, offset: int, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
        if self.map is None:
            raise ServiceUnavailable("the stream's shared-memory arena is closed")
        return _view(self.map, offset, dtype, shape)

    def region(self, offset: int, nbytes: int) -> moe_pb2.SharedRegion:
        return moe_pb2.SharedRegion(arena=self.id, offset=offset, byte_size=nbytes)

    def closed(self) -> None:
        """The stream ended: nothing here is handed out again; the memory goes with the last mapping."""
        self.retired = True
        self._free.clear()
        if self.remote is not None:  # the engine forgets the memory before it is unmapped
            self.remote.close()
            self.remote = None
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.map = None  # unmapped once the last tensor viewing it goes (see _view)


def new_arena(size: int, offer_shared_memory: bool = True) -> Arena | None:
    """An arena of `size` bytes, or None where this system has no memfd (rows then go as bytes)."""
    if size <= 0 or not hasattr(os, "memfd_create"):
        return None
    try:
        return Arena(size, offer_shared_memory)
    except OSError as error:
        logger.warning("no shared-memory arena (%s): rows to workers go as bytes", error)
        return None


class ArenaView:
    """The worker's side: the sender's arena, mapped in this process for one stream."""

    transport = "shm"
    same_host = True  # the stream's messages may take a Unix socket beside it (local_socket.py)

    def __init__(self, arena_id: int, mapping: mmap.mmap) -> None:
        self.id, self.size = arena_id, len(mapping)
        self.map: mmap.mmap | None = mapping

    @classmethod
    def attach(cls, offer: str) -> tuple[ArenaView | None, str]:
        """Map the offered arena; (None, why) when it is not reachable from here."""
        try:
            host, pid, fd, inode, size, arena_id = offer.rsplit(":", 5)
            pid_number, fd_number, expected_inode, expected_size = int(pid), int(fd), int(inode), int(size)
        except ValueError:
            return None, "malformed offer"
        if host != host_identity():
            return None, "another host"
        try:
            handle = os.open(f"/proc/{pid_number}/fd/{fd_number}", os.O_RDWR)
        except OSError as error:
            return None, f"cannot open the sender's file ({error.strerror})"
        try:
            status = os.fstat(handle)
            if status.st_ino != expected_inode or status.st_size != expected_size:
                return None, "not the offered file (another PID namespace?)"
            return cls(int(arena_id), mmap.mmap(handle, expected_size)), ""
        finally:
            os.close(handle)

    def tensor(self, region: moe_pb2.SharedRegion, datatype: str, shape: Sequence[int], what: str) -> torch.Tensor:
        """The tensor a region holds, after checking it lies inside this arena and has the tensor's size."""
        dtype = checked_region(region, datatype, shape, what, self.id, self.size)
        if self.map is None:
            raise ServiceUnavailable(f"{what}: the stream's shared-memory arena is closed")
        return _view(self.map, region.offset, dtype, shape)

    async def read(self, region: moe_pb2.SharedRegion, datatype: str, shape: Sequence[int], what: str) -> torch.Tensor:
        return self.tensor(region, datatype, shape, what)  # mapped: the rows are already here

    async def write(self, region: moe_pb2.SharedRegion, values: torch.Tensor, what: str) -> None:
        self.tensor(region, codec.datatype_name(values.dtype), list(values.shape), what).copy_(values)

    def close(self) -> None:
        """The stream ended; a compute still running on a view keeps the mapping until it finishes."""
        self.map = None  # see _view


def checked_region(
    region: moe_pb2.SharedRegion, datatype: str, shape: Sequence[int], what: str, arena_id: int, arena_size: int
) -> torch.dtype:
    """The dtype of a region's tensor, once the region is this stream's arena's, lies inside it, starts
    aligned and has exactly the tensor's size; every transport that reads regions checks them here."""
    if region.arena != arena_id:
        raise ServiceUnavailable(f"{what}: arena {region.arena} is not this stream's; resend")
    dtype = codec.torch_dtype(datatype)
    expected = codec.element_count(shape) * dtype.itemsize
    if region.byte_size != expected or any(dim < 0 for dim in shape):
        raise InvalidInput(f"{what}: region of {region.byte_size} bytes for {datatype} {list(shape)}")
    if region.offset % ALIGNMENT or region.offset + region.byte_size > arena_size:
        raise InvalidInput(f"{what}: region [{region.offset}, +{region.byte_size}) outside the arena")
    return dtype


def _view(buffer: mmap.mmap, offset: int, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    """A tensor viewing `buffer`. An arena is never mmap.close()d: torch.frombuffer keeps a reference
    to the mmap object but holds no buffer export, so close() would succeed and unmap memory a view
    still reads (a worker computing while its stream ended died of SIGSEGV). Dropping the arena's own
    reference unmaps it when the last view is freed, and at once when there is none."""
    count = codec.element_count(shape)
    if count == 0:
        return torch.empty(tuple(shape), dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype, count=count, offset=offset).view(tuple(shape))
