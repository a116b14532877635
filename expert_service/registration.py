"""Worker side of the registry: keep this worker's record registered, with fresh load, on a heartbeat.

Two transports, same duty (publish at start and after a change of experts, re-publish every third
of the TTL, deregister on stop, keep serving while the registry is unreachable):
- `RouterRegistration`: into the registry the router hosts, through its `WorkerRegistry` RPC
  (router_service.registry).
- `RedisRegistration`: a signed entry with a TTL in a shared Redis (moe_serve.redis_keys names it;
  routers follow it with router_service.redis_registry).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import grpc
import redis.asyncio as aioredis
from grpc import aio
from redis.exceptions import RedisError

from moe_serve.cluster.placement import ExpertKey
from moe_serve.protos import moe_serve_pb2 as moe_pb2
from moe_serve.protos import moe_serve_pb2_grpc as moe_grpc
from moe_serve.redis_keys import DEFAULT_TTL_S, events_channel, worker_key
from moe_serve.registry_trust import signed_entry
from moe_serve.runtime.grpc_utils import QUICK_RECONNECT
from moe_serve.runtime.outage import OutageLog
from moe_serve.runtime.security import ClusterCredentials, open_aio_channel
from moe_serve.worker_record import WorkerRecord

logger = logging.getLogger(__name__)


FIRST_REGISTRATION_RETRY_S = 0.2


class Registration:
    """Worker side: keeps this worker's record registered, re-publishing it (with fresh load) on a heartbeat.

    `snapshot` returns the record to publish now. Subclasses implement `_write` and `_remove` and
    name the errors that mean "the registry is unreachable" (kept serving, retried on the next beat);
    any other error is a bug and propagates.
    """

    transport_errors: tuple[type[Exception], ...] = ()

    def __init__(self, snapshot: Callable[[], WorkerRecord], ttl_s: float, what: str) -> None:
        self.snapshot, self.ttl_s = snapshot, ttl_s
        self._task: asyncio.Task[None] | None = None
        self._outage = OutageLog(what)
        self.registered_once = False

    async def start(self) -> None:
        await self.publish()
        self._task = asyncio.create_task(self._heartbeat(), name="registration-heartbeat")

    async def publish(self) -> bool:
        """Write the current record now (after a change of experts, and on every heartbeat)."""
        try:
            await self._write(self.snapshot())
        except Exception as error:
            self._outage.failed(error)
            return False
        self._outage.recovered()
        self.registered_once = True
        return True

    async def stop(self) -> None:
        """Deregister now, so routers stop sending work before the TTL would expire."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        try:
            await self._remove(self.snapshot().worker_id)
        except Exception as error:
            # a registry that is gone (a stack stopping as a whole) routes nothing to this worker any more
            log = logger.info if self._registry_gone(error) else logger.warning
            log("could not deregister (%s); the entry expires in %.0f s", error, self.ttl_s)
        await self._close()

    def _registry_gone(self, error: Exception) -> bool:
        """`error` says the registry no longer listens, rather than that it refused or failed."""
        return False

    async def _heartbeat(self) -> None:
        while True:
            # until the first registration succeeds, retry at once: the registry may be starting
            # beside this worker (launcher.launch_stack), and serving begins with the registration
            await asyncio.sleep(self.ttl_s / 3 if self.registered_once else FIRST_REGISTRATION_RETRY_S)
            await self.publish()

    async def _write(self, record: WorkerRecord) -> None:
        raise NotImplementedError

    async def _remove(self, worker_id: str) -> None:
        raise NotImplementedError

    async def _close(self) -> None:
        """Release the connection."""


class RouterRegistration(Registration):
    """Registers into the router-hosted registry through its WorkerRegistry RPC."""

    transport_errors = (aio.AioRpcError,)

    def __init__(
        self,
        router_address: str,
        snapshot: Callable[[], WorkerRecord],
        ttl_s: float,
        credentials: ClusterCredentials,
    ) -> None:
        super().__init__(snapshot, ttl_s, f"registration at router {router_address}")
        self._channel = open_aio_channel(router_address, QUICK_RECONNECT, credentials)
        self._stub = moe_grpc.WorkerRegistryStub(self._channel)

    async def _write(self, record: WorkerRecord) -> None:
        # until the first registration succeeds, wait for the router to listen (it may be starting
        # beside this worker) rather than fail at once
        request = moe_pb2.RegisterRequest(worker=record.to_proto(), ttl_s=self.ttl_s)
        await self._stub.Register(request, timeout=5, wait_for_ready=not self.registered_once)

    async def _remove(self, worker_id: str) -> None:
        await self._stub.Deregister(moe_pb2.DeregisterRequest(worker_id=worker_id), timeout=5)

    def _registry_gone(self, error: Exception) -> bool:
        # the router hosts the registry: an embedded one stops with its gateway, before the workers
        return isinstance(error, aio.AioRpcError) and error.code() == grpc.StatusCode.UNAVAILABLE

    async def _close(self) -> None:
        await self._channel.close()


class RedisRegistration(Registration):
    """Worker side: keeps the worker's record in Redis (SET with a TTL; announced when new)."""

    transport_errors = (RedisError, OSError)

    def __init__(
        self,
        url: str,
        prefix: str,
        snapshot: Callable[[], WorkerRecord],
        ttl_s: float = DEFAULT_TTL_S,
        record_key: bytes | None = None,
    ) -> None:
        super().__init__(snapshot, ttl_s, f"registration in Redis at {url}")
        self.prefix, self._record_key = prefix, record_key
        self._client = aioredis.Redis.from_url(url)
        self._announced: tuple[ExpertKey, ...] | None = None

    async def _write(self, record: WorkerRecord) -> None:
        key = worker_key(self.prefix, record.worker_id)
        # SET ... GET tells whether the entry existed: a new entry (first start, or Redis came back
        # empty after a restart) or a changed expert set is announced; a plain heartbeat is not
        entry = signed_entry(record, self._record_key, self.ttl_s)
        previous = await self._client.set(key, entry, px=max(100, int(self.ttl_s * 1000)), get=True)
        if previous is None or self._announced != record.experts:
            await self._client.publish(events_channel(self.prefix), f"register {record.worker_id}")
            self._announced = record.experts

    async def _remove(self, worker_id: str) -> None:
        await self._client.delete(worker_key(self.prefix, worker_id))
        await self._client.publish(events_channel(self.prefix), f"deregister {worker_id}")

    async def _close(self) -> None:
        await self._client.aclose()
