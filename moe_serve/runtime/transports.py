"""The transport seam: how tensors move on the streams that carry them, chosen once per stream when it
opens. On the compute hop the router sends a batch's rows to a worker (and, with the router in the
gateway, gets its outputs back the same way); on the delivery hop a worker sends its outputs to the
gateway. The sender of the stream offers an arena; the receiver reaches it or declines.

gRPC always carries the control messages (plan, descriptors, completions, errors, deadlines). The rows go:
- "shm": through a shared-memory arena the worker maps (same host; moe_serve/runtime/shared_arena.py);
- "nixl": through the same arena, registered with NIXL, which the worker READs and WRITEs by one-sided
  transfers (any host; moe_serve/runtime/nixl_transport.py; needs the nixl package on both ends);
- as bytes in the messages, always possible, and the fall-back when a batch does not fit.

The sender offers every transport it has on; the worker takes the first of its own `transports` setting
that works from where it runs and names it in its initial metadata. Both sides read the same setting
(MOE_SERVE_TRANSPORTS), so one value configures a stack.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from moe_serve.config import DEFAULT_TRANSPORTS
from moe_serve.protos import moe_serve_pb2 as moe_pb2
from moe_serve.runtime import codec, nixl_transport
from moe_serve.runtime.errors import ServiceUnavailable
from moe_serve.runtime.shared_arena import ACCEPT_KEY, OFFER_KEY, Arena, ArenaView, new_arena

logger = logging.getLogger(__name__)
__all__ = [
    "ACCEPT_KEY",
    "DEFAULT_TRANSPORTS",
    "LentTensor",
    "RegionAccess",
    "attach",
    "lend_tensor",
    "received_tensor",
    "start_engines",
    "stream_arena",
]


class RegionAccess(Protocol):
    """The worker's side of a stream's arena, whatever reaches it."""

    transport: str
    same_host: bool  # the stream's messages may then take a Unix socket beside it

    async def read(
        self, region: moe_pb2.SharedRegion, datatype: str, shape: Sequence[int], what: str
    ) -> torch.Tensor: ...

    async def write(self, region: moe_pb2.SharedRegion, values: torch.Tensor, what: str) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class LentTensor:
    """A tensor copied into a region of a stream's arena, lent to the peer until its answer is read."""

    arena: Arena
    offset: int
    region: moe_pb2.SharedRegion

    def release(self) -> None:
        self.arena.release(self.offset)


def lend_tensor(arena: Arena | None, values: torch.Tensor) -> LentTensor | None:
    """`values` copied into a region of the stream's arena; None when the stream has no usable arena
    or it has no room (or the batch is under its transport's eager size): then they go as bytes."""
    if arena is None or not arena.usable:
        return None
    offset = arena.allocate(values.nbytes)
    if offset is None:
        return None
    arena.tensor(offset, values.dtype, values.shape).copy_(values)
    return LentTensor(arena, offset, arena.region(offset, values.nbytes))


async def received_tensor(
    message_tensor: moe_pb2.Tensor, region: moe_pb2.SharedRegion | None, arena: RegionAccess | None, what: str
) -> torch.Tensor:
    """A tensor a message carries: its bytes, or, when it names a region of the stream's arena, the
    region's contents (mapped, or transferred); `message_tensor` gives the datatype and shape either way."""
    if region is None:
        return codec.from_proto(message_tensor, what)
    if arena is None:
        raise ServiceUnavailable(f"{what} in an arena region, but this stream reaches no arena")
    return await arena.read(region, message_tensor.datatype, list(message_tensor.shape), what)


def start_engines(transports: Sequence[str]) -> None:
    """Start this process's transfer engines now, at service start, not at a stream's first request
    (a NIXL agent takes 0.05-0.7 s to import and create); one that cannot start is logged, and its
    transport is then declined or not offered."""
    if "nixl" in transports:
        nixl_transport.process_agent()


def stream_arena(size: int, transports: Sequence[str]) -> Arena | None:
    """The sender's arena for one worker stream, offered by every transport in `transports` that is on
    here; None when none is (rows then go as bytes)."""
    if not transports:
        return None
    arena = new_arena(size, offer_shared_memory="shm" in transports)
    if arena is not None and "nixl" in transports:
        arena.remote = nixl_transport.NixlOffer.register(arena)
        if arena.remote is None and "shm" not in transports:
            arena.closed()
            return None
    return arena


def attach(
    invocation_metadata: Sequence[tuple[str, str | bytes]] | None, transports: Sequence[str], who: str
) -> RegionAccess | None:
    """The first of `transports` that reaches the sender's offered arena from here; None: bytes.
    Its name goes back in the stream's initial metadata (ACCEPT_KEY)."""
    metadata = dict(invocation_metadata or ())
    reasons = []
    for transport in transports:
        access: RegionAccess | None = None
        if transport == "shm" and OFFER_KEY in metadata:
            access, reason = ArenaView.attach(str(metadata[OFFER_KEY]))
        elif transport == "nixl" and nixl_transport.OFFER_KEY in metadata:
            binary = metadata.get(nixl_transport.METADATA_KEY)
            access, reason = nixl_transport.NixlArenaView.attach(
                str(metadata[nixl_transport.OFFER_KEY]), binary if isinstance(binary, bytes) else None
            )
        else:
            reason = "not offered"
        if access is not None:
            return access
        reasons.append(f"{transport}: {reason}")
    if OFFER_KEY in metadata or nixl_transport.OFFER_KEY in metadata:
        logger.info("%s: rows come as bytes on this stream (%s)", who, "; ".join(reasons))
    return None
