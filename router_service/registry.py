"""Registry of expert-worker replicas: which worker serves which (layer, expert), where, under what load.

Routers read it on every request, so lookups are local dictionary reads; each implementation
keeps that local view current. Two backends, same semantics (register, heartbeat, expire after a
TTL without heartbeat, deregister):
- `InProcessRegistry`: hosted by the router itself (single host, the default); workers register
  through the router's `WorkerRegistry` RPC (`RegistryServicer`, here).
- `RedisRegistry` (router_service.redis_registry): a shared Redis server.
The worker side of both is expert_service.registration; what both sides share (WorkerRecord, the
checks and signatures of records, the Redis key names) is in the core: moe_serve.worker_record,
moe_serve.registry_trust, moe_serve.redis_keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection, Iterable

from grpc import aio

from moe_serve.cluster.placement import ExpertKey
from moe_serve.protos import moe_serve_pb2 as moe_pb2
from moe_serve.protos import moe_serve_pb2_grpc as moe_grpc
from moe_serve.registry_trust import RecordPolicy, RejectedRecord
from moe_serve.runtime.errors import InvalidInput
from moe_serve.worker_record import WorkerRecord

logger = logging.getLogger(__name__)


class Registry:
    """Read side: the current replicas of every expert, as a local snapshot.

    Only records that pass `policy` (moe_serve.registry_trust) ever enter the snapshot.
    """

    def __init__(self, policy: RecordPolicy | None = None) -> None:
        self.policy = policy or RecordPolicy()
        self._refusals: dict[str, str] = {}  # source -> the last refusal logged for it (one warning per change)
        self._workers: dict[str, WorkerRecord] = {}
        self._replicas: dict[ExpertKey, tuple[WorkerRecord, ...]] = {}
        self._listeners: list[Callable[[], None]] = []
        # the workers the latest change dropped because their heartbeats stopped (not deregistered):
        # a listener fails at once what still waits on them, while a deregistered worker finishes its batches
        self.expired: tuple[WorkerRecord, ...] = ()

    def replicas(self, key: ExpertKey) -> tuple[WorkerRecord, ...]:
        """Live replicas serving `key` (empty when none)."""
        return self._replicas.get(key, ())

    def workers(self) -> list[WorkerRecord]:
        return sorted(self._workers.values(), key=lambda record: record.worker_id)

    def covers(self, keys: Iterable[ExpertKey]) -> bool:
        """True when every key has at least one replica."""
        return all(self._replicas.get(key) for key in keys)

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call `listener` after every change of the replica set."""
        self._listeners.append(listener)

    async def start(self) -> None:
        """Begin following the source of registrations."""

    async def close(self) -> None:
        """Stop following; the last snapshot stays readable."""

    def refused(self, source: str, rejection: RejectedRecord) -> None:
        """Count a refused record and warn, once until what `source` holds changes (`forget_refusals`
        keeps that memory to the sources still refused)."""
        self.policy.rejected[rejection.reason] += 1
        if self._refusals.get(source) != rejection.message:
            self._refusals[source] = rejection.message
            logger.warning("registry: ignoring %s: %s", source, rejection.message)

    def forget_refusals(self, keep: set[str]) -> None:
        """Forget the refusals of sources not in `keep` (entries gone from Redis): a stranger writing
        ever new keys must not grow this memory without bound."""
        self._refusals = {source: message for source, message in self._refusals.items() if source in keep}

    def _replace_all(self, records: Iterable[WorkerRecord], expired: Collection[str] = ()) -> None:
        """Make `records` the current workers; `expired` names those dropped for missing heartbeats."""
        workers = {record.worker_id: record for record in records}
        self.expired = tuple(self._workers[w] for w in expired if w in self._workers and w not in workers)
        # load changes with every heartbeat; only a change of placement is announced
        placement_changed = {k: (r.address, r.experts) for k, r in workers.items()} != {
            k: (r.address, r.experts) for k, r in self._workers.items()
        }
        self._workers = workers
        replicas: dict[ExpertKey, list[WorkerRecord]] = {}
        for record in workers.values():
            for key in record.experts:
                replicas.setdefault(key, []).append(record)
        self._replicas = {key: tuple(sorted(rs, key=lambda r: r.worker_id)) for key, rs in replicas.items()}
        if placement_changed:
            logger.info("registry: %d worker replica(s): %s", len(workers), ", ".join(sorted(workers)) or "none")
            for listener in self._listeners:
                listener()


class InProcessRegistry(Registry):
    """Single-host registry kept by the router: entries expire `ttl` seconds after their last heartbeat."""

    def __init__(self, policy: RecordPolicy | None = None) -> None:
        super().__init__(policy)
        self._expires_at: dict[str, float] = {}
        self._sweeper: asyncio.Task[None] | None = None

    def register(self, record: WorkerRecord, ttl_s: float = float("inf")) -> None:
        """Add or refresh a worker (a heartbeat is a register of the same id)."""
        self._expires_at[record.worker_id] = time.monotonic() + ttl_s
        self._replace_all([*(r for r in self._workers.values() if r.worker_id != record.worker_id), record])

    def deregister(self, worker_id: str, expired: bool = False) -> None:
        """Drop a worker: it said goodbye, or (`expired`) it missed its heartbeats."""
        self._expires_at.pop(worker_id, None)
        self._replace_all(
            (r for r in self._workers.values() if r.worker_id != worker_id), (worker_id,) if expired else ()
        )

    async def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep(), name="registry-expiry")

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper

    async def _sweep(self, period_s: float = 0.25) -> None:
        while True:
            await asyncio.sleep(period_s)
            now = time.monotonic()
            expired = [worker_id for worker_id, deadline in self._expires_at.items() if deadline <= now]
            for worker_id in expired:
                logger.warning("registry: worker %s missed its heartbeats; dropping it", worker_id)
                self.deregister(worker_id, expired=True)


class RegistryServicer(moe_grpc.WorkerRegistryServicer):
    """The router's WorkerRegistry RPC, writing into its InProcessRegistry."""

    def __init__(self, registry: InProcessRegistry) -> None:
        self.registry = registry

    async def Register(self, request: moe_pb2.RegisterRequest, context: aio.ServicerContext) -> moe_pb2.RegistryAck:
        """Refuse (INVALID_ARGUMENT) a registration routers could not use: it would be chosen as a
        replica and fail every batch sent to it, or compute other weights, until its TTL expired."""
        record = WorkerRecord.from_proto(request.worker)
        try:
            self.registry.policy.check(record, request.ttl_s)
        except RejectedRecord as rejection:
            self.registry.refused(f"the registration of {record.worker_id[:80]!r}", rejection)
            raise InvalidInput(f"registration refused: {rejection.message}") from None
        self.registry.register(record, request.ttl_s or float("inf"))
        return moe_pb2.RegistryAck()

    async def Deregister(self, request: moe_pb2.DeregisterRequest, context: aio.ServicerContext) -> moe_pb2.RegistryAck:
        if not request.worker_id:
            raise InvalidInput("deregistration names no worker_id")
        self.registry.deregister(request.worker_id)
        return moe_pb2.RegistryAck()
