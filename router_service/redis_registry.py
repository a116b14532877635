"""Registry shared through a Redis server: the routers' side (the workers' is
expert_service.registration.RedisRegistration; moe_serve.redis_keys names the keys).

Workers write `<prefix>workers:<id>` (a JSON WorkerRecord) with a TTL and refresh it on a
heartbeat; an entry whose worker stops heartbeating expires by itself. Every change is announced
on the `<prefix>events` channel, which routers subscribe to; they re-read the entries on each
announcement and, as a slow safety net for silent expiries, once per half TTL.
When Redis is unreachable both sides keep their last state and retry (routers with backoff,
workers on their heartbeat); a worker re-registers by itself once Redis is back. Redis may come
back empty (restarted without persistence): the workers a router knew are then kept for one TTL,
as their entries would have lived, so it keeps serving until they have re-registered.

Entries are signed with the cluster secret (moe_serve.registry_trust) and checked like registrations
through the RPC: an entry that fails is ignored, never routed to. When an entry a router trusted is
overwritten with one that fails, the router keeps the last good record until that record's own
signed expiry, so a forged write cannot take a live worker out of service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from moe_serve.redis_keys import DEFAULT_TTL_S, events_channel, worker_key
from moe_serve.registry_trust import RecordPolicy, RejectedRecord
from moe_serve.runtime.outage import OutageLog
from moe_serve.worker_record import WorkerRecord
from router_service.registry import Registry

logger = logging.getLogger(__name__)


class RedisRegistry(Registry):
    """Router-side view of the workers registered in Redis."""

    def __init__(self, url: str, prefix: str, ttl_s: float = DEFAULT_TTL_S, policy: RecordPolicy | None = None) -> None:
        super().__init__(policy)
        self.url, self.prefix, self.ttl_s = url, prefix, ttl_s
        self._client = aioredis.Redis.from_url(url)
        self._task: asyncio.Task[None] | None = None
        self._outage = OutageLog(f"registry watcher, Redis at {url}")
        # after an outage: the workers known before it and not seen in Redis since, kept until then
        self._carried: set[str] = set()
        self._carry_until = 0.0
        self._trusted: dict[str, tuple[WorkerRecord, float]] = {}  # worker id -> last good record, its expiry

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._follow(), name="redis-registry-watch")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._client.aclose()

    async def refresh(self, deregistered: frozenset[str] = frozenset()) -> bool:
        """Re-read every registered worker; False (state kept) when Redis is unreachable.

        A worker gone from Redis expired (missed its heartbeats) unless `deregistered` names it.
        """
        try:
            keys = [key async for key in self._client.scan_iter(match=worker_key(self.prefix, "*"), count=500)]
            values = await self._client.mget(keys) if keys else []
        except (RedisError, OSError) as error:
            self._outage.failed(error)
            return False
        if self._outage.down:
            self._carried, self._carry_until = set(self._workers), time.monotonic() + self.ttl_s
        self._outage.recovered()
        records = self._accepted(keys, values, time.time())
        self._carried -= {record.worker_id for record in records}
        if self._carried and time.monotonic() < self._carry_until:
            records += [self._workers[worker_id] for worker_id in self._carried if worker_id in self._workers]
        gone = self._workers.keys() - {record.worker_id for record in records}
        self._replace_all(records, expired=gone - deregistered)
        return True

    def _accepted(self, keys: list[bytes], values: list[bytes | None], now: float) -> list[WorkerRecord]:
        """The records of the entries that pass the policy; for one that fails, the last good record
        of that worker while its signed expiry has not passed."""
        records, trusted, refused = [], {}, set()
        id_offset = len(worker_key(self.prefix, ""))
        for key, value in zip(keys, values, strict=True):
            if value is None:  # expired between SCAN and MGET
                continue
            worker_id = key.decode(errors="replace")[id_offset:]
            try:
                record, expires_at = self.policy.verify(value, worker_id, now)
            except RejectedRecord as rejection:
                source = f"Redis entry {key.decode(errors='replace')[:120]!r}"
                self.refused(source, rejection)
                refused.add(source)
                record, expires_at = self._trusted.get(worker_id, (None, 0.0))
                if record is None or expires_at < now:
                    continue
            trusted[worker_id] = (record, expires_at)
            records.append(record)
        self._trusted = trusted
        self.forget_refusals(refused)
        return records

    async def _follow(self) -> None:
        backoff = 0.1
        while True:
            pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(events_channel(self.prefix))
                await self.refresh()  # catch up on what happened while not subscribed
                backoff = 0.1
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=self.ttl_s / 2)
                    await self.refresh(_deregistered(message))
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as error:
                self._outage.failed(error)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.ttl_s / 2)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()


def _deregistered(message: dict[str, Any] | None) -> frozenset[str]:
    """The worker a `deregister <id>` announcement names (none for other messages)."""
    data = message["data"] if message is not None else b""
    verb, _, worker_id = (data.decode() if isinstance(data, bytes) else str(data)).partition(" ")
    return frozenset({worker_id}) if verb == "deregister" else frozenset()
