"""Long-lived gRPC channels and stubs, one per remote address (never one per request)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from grpc import aio

from moe_serve.runtime.grpc_utils import channel_options
from moe_serve.runtime.security import ClusterCredentials, open_aio_channel

StubT = TypeVar("StubT")


class StubPool(Generic[StubT]):
    """Caches one channel and one stub per address."""

    def __init__(
        self, stub_class: Callable[[aio.Channel], StubT], max_message_bytes: int, credentials: ClusterCredentials
    ) -> None:
        self._stub_class, self._credentials = stub_class, credentials
        self._options = channel_options(max_message_bytes)
        self._channels: dict[str, aio.Channel] = {}
        self._stubs: dict[str, StubT] = {}

    def get(self, address: str) -> StubT:
        stub = self._stubs.get(address)
        if stub is None:
            channel = open_aio_channel(address, self._options, self._credentials)
            self._channels[address] = channel
            stub = self._stubs[address] = self._stub_class(channel)
        return stub

    async def discard(self, address: str) -> None:
        """Close the channel to an address that is gone."""
        self._stubs.pop(address, None)
        channel = self._channels.pop(address, None)
        if channel is not None:
            await channel.close()

    async def close(self) -> None:
        channels = list(self._channels.values())
        self._channels.clear()
        self._stubs.clear()
        await asyncio.gather(*(channel.close() for channel in channels), return_exceptions=True)


def remaining_timeout(context: Any, default: float | None = None) -> float | None:
    """Seconds left before the incoming call's deadline (so the next hop inherits it), else `default`."""
    remaining = context.time_remaining() if context is not None else None
    if remaining is None:
        return default
    return max(0.0, remaining)
